"""Watching a KV bucket: its current entries, a marker once they are all in, then changes.

nats.py's own ``KeyValue.watch`` costs about 17 µs per entry in Python: it parses each
message's JetStream metadata into dataclasses with a ``datetime``, builds an ``Entry``, and
hands it over through a bounded queue read with ``asyncio.wait_for`` (a timer and a task per
entry). Four processes read each of 20,000 service records during a bulk apply, so that was a
large part of the machine's CPU. This watcher subscribes the same ordered push consumer (last
value per subject, flow control, heartbeats and gap recovery stay nats.py's), takes the stream
sequence and the pending count straight from the reply subject, and hands entries over in
batches: about 8 µs per entry.

"Caught up" is decided from the server's side. For an empty bucket: a consumer that has
delivered nothing and has nothing pending (nats.py read its own received count there, which
is 0 while delivered entries still wait in its queue: under load that gave empty snapshots of
full buckets). Otherwise the entry that arrives with nothing pending behind it is not enough:
a key rewritten while the snapshot is delivered (a heartbeat) loses the message the server had
lined up for it and comes again after that entry, so a snapshot ending there missed the key
(nats.py's watch does the same). The watch then reads the stream's last sequence and is caught
up once it has handed on everything up to there.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from shared.runtime import TaskGroup

if TYPE_CHECKING:  # shared.bus imports this module
    from shared.bus import Bus

# KV headers (JetStream's KV convention; nats-server 2.11+ marks TTL expiries differently)
_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_REMOVED = frozenset({"DEL", "PURGE"})
_REMOVED_BY_MARKER = frozenset({"MaxAge", "Purge", "Remove"})

# a consumer this far behind makes the subscription wait (the connection's own limits, then
# the server's flow control, push back from there)
MAX_BUFFERED = 8192
INACTIVE_THRESHOLD_S = 300.0  # the server drops a consumer whose watcher went away
# the consumer's idle heartbeat: nats.py recreates an ordered consumer after two intervals
# without a message. A watch on a connection of Bus.connect is recreated as soon as the
# connection is back (:func:`reconnected`), which is how it comes back after nats-server
# restarted (its consumers gone), so this only catches a consumer lost while the connection
# stayed up. It was 1 s when it was also the restart path; but every watch of every agent gets
# one a second while its bucket is quiet: 10 a second per agent, 10,000 at 1,000 nodes, half
# a core of a simulated fleet's CPU on this machine (docs/scale.md, Fleet)
HEARTBEAT_S = 5.0
DELETE_TIMEOUT_S = 2.0  # closing a watch does not wait longer than this for the server
# a snapshot waiting for the stream's last sequence is caught up after this long without a
# message anyway (only a purge of the stream itself takes messages away without a marker)
CATCH_UP_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change of a KV key; ``value`` is None when the key was deleted or purged."""

    key: str
    value: bytes | None
    revision: int


_CHECK = object()  # the server said nothing is pending: time to see whether the snapshot is in

# a connection -> what its watches do when it has reconnected
_on_reconnect: weakref.WeakKeyDictionary[Client, set[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def reconnected(nc: Client) -> None:
    """``nc`` is connected again (Bus.connect's reconnect callback): every watch on it makes
    its consumer again from the next sequence at once. A restarted nats-server has lost the
    watches' consumers; waiting for two missed idle heartbeats to notice took up to
    2 x HEARTBEAT_S. A consumer that outlived a short disconnection is deleted: the messages
    it pushed meanwhile are lost anyway (an ordered consumer is not acknowledged)."""
    for restart in list(_on_reconnect.get(nc, ())):
        restart()


async def _last_sequence(kv: KeyValue) -> int:
    """The bucket's last stream sequence; 0 (trust the server's pending count, as nats.py
    does) when it cannot be read."""
    try:
        info = await kv._js.stream_info(kv._stream)
    except Exception:  # NATS away for a moment: the pending count alone, as before
        return 0
    return int(info.state.last_seq or 0)


def _sequence_and_pending(reply: str) -> tuple[int, int]:
    """The stream sequence and the pending count from a JetStream ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the
    12-token form with domain and account hash)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[Msg.Ack.StreamSeq]), int(tokens[Msg.Ack.NumPending])


async def watch(kv: KeyValue, keys: str = ">") -> AsyncGenerator[KVEvent | None, None]:
    """Yield the current value of every key, then ``None`` once caught up, then changes.

    A consumer that restarts gets the whole current state again, so it resyncs by itself.
    Close it (``contextlib.aclosing``) when done: that removes the subscription and its
    consumer.

    Over 80 lines on purpose: the message callback and the generator share their state (the
    buffer, the caught-up flags, the target sequence) as closure variables; split into
    functions, that state would have to travel through every call of a hot path.
    """
    prefix = kv._pre  # "$KV.<bucket>.": nats.py keeps the bucket's names private
    cut = len(prefix)
    # KV events, stream sequences of messages that are not (progress only), _CHECK
    buffered: deque[KVEvent | int | object] = deque()
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    caught_up = False
    check_queued = False

    def hand_over(item: KVEvent | int | object) -> None:
        buffered.append(item)
        arrived.set()

    async def on_message(msg: Msg) -> None:
        nonlocal check_queued
        if len(buffered) >= MAX_BUFFERED:
            room.clear()
            await room.wait()
        sequence, pending = _sequence_and_pending(msg.reply)
        headers = msg.headers
        removed = unknown = False
        if headers:
            operation = headers.get(_OPERATION)
            reason = headers.get(_MARKER_REASON)
            if operation is not None:
                removed = operation in _REMOVED
            elif reason is not None:
                removed = reason in _REMOVED_BY_MARKER
                unknown = not removed  # a marker of a kind this version does not know
        if unknown:
            hand_over(sequence)  # not a value: only how far the watch has come
        else:
            hand_over(KVEvent(msg.subject[cut:], None if removed else msg.data, sequence))
        if pending == 0 and not caught_up and not check_queued:
            check_queued = True
            hand_over(_CHECK)

    subscription = await kv._js.subscribe(
        prefix + keys,
        stream=kv._stream,
        cb=on_message,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=INACTIVE_THRESHOLD_S,
        idle_heartbeat=HEARTBEAT_S,
    )
    nc = kv._js._nc
    restarts: set[asyncio.Task[None]] = set()

    def restart() -> None:
        task = asyncio.create_task(_restart(subscription))
        restarts.add(task)
        task.add_done_callback(restarts.discard)

    _on_reconnect.setdefault(nc, set()).add(restart)
    try:
        info = await subscription.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if info.num_pending == 0 and not delivered and not check_queued:
            caught_up = True  # nothing there, and nothing on its way
            yield None
        target = -1  # the stream sequence the snapshot must reach (-1: not known yet)
        reached = 0  # the highest stream sequence handed on (or passed over)
        while True:
            if not buffered:
                arrived.clear()
                if caught_up or target < 0:
                    await arrived.wait()
                else:
                    try:  # the messages up to the target are on their way
                        await asyncio.wait_for(arrived.wait(), CATCH_UP_WAIT_S)
                    except TimeoutError:  # a message purged from the stream never comes
                        caught_up = True
                        yield None
                        continue
            while buffered:
                item = buffered.popleft()
                if not room.is_set() and len(buffered) < MAX_BUFFERED // 2:
                    room.set()
                if item is _CHECK:
                    # the server says nothing is pending; but a key rewritten while the
                    # snapshot was delivered lost the message the server had lined up, and
                    # comes again only after this one: caught up is where the stream was now.
                    # (A filtered watch cannot tell: the stream's last message may be another
                    # key's, which it never sees. It trusts the pending count, as nats.py.)
                    target = await _last_sequence(kv) if keys == ">" else 0
                elif isinstance(item, KVEvent):
                    reached = max(reached, item.revision)
                    yield item
                else:
                    assert isinstance(item, int)
                    reached = max(reached, item)
                if not caught_up and 0 <= target <= reached:
                    caught_up = True
                    yield None
    finally:
        _on_reconnect.get(nc, set()).discard(restart)
        for task in restarts:
            task.cancel()
        await subscription.unsubscribe()
        # the consumer goes now rather than after the inactivity threshold (its current name:
        # nats.py renames an ordered consumer when it recreates it after a gap)
        if kv._js._nc.is_connected:  # NATS away: the threshold removes it, nobody waits here
            with contextlib.suppress(Exception):  # gone already: nothing to do
                await asyncio.wait_for(
                    kv._js.delete_consumer(subscription._stream, subscription._consumer),
                    DELETE_TIMEOUT_S,
                )


async def _restart(subscription: JetStreamContext.PushSubscription) -> None:
    """The ordered consumer made again from the stream sequence after the last one received
    (as nats.py does on a gap or missed heartbeats); the former one deleted if it is there."""
    jsi = subscription._sub._jsi
    if jsi is None:
        return
    former = subscription._consumer
    await jsi.reset_ordered_consumer(jsi._sseq + 1)
    with contextlib.suppress(Exception):  # gone with a restarted server: nothing to delete
        await asyncio.wait_for(
            jsi._js.delete_consumer(subscription._stream, former),
            DELETE_TIMEOUT_S,
        )


async def resyncing(
    events: AsyncGenerator[KVEvent | None, None], known: set[str]
) -> AsyncGenerator[KVEvent | None, None]:
    """``events`` of a watch, plus a deletion for every key of ``known`` its snapshot lacks.

    ``known`` is the set of keys the consumer holds, kept by the caller across restarts of its
    watch: a key deleted while the watch was away is simply absent from the new snapshot, and
    its deletion comes just before the caught-up marker. The set is kept current here.
    """
    seen: set[str] | None = set()  # keys in this watch's snapshot, until it ends
    async for event in events:
        if event is None:
            if seen is not None:
                for key in known - seen:
                    known.discard(key)
                    yield KVEvent(key, None, 0)
                seen = None
            yield None
            continue
        if event.value is None:
            known.discard(event.key)
        else:
            known.add(event.key)
            if seen is not None:
                seen.add(event.key)
        yield event


async def follow(
    kv: KeyValue,
    on_event: Callable[[KVEvent], Awaitable[None] | None],
    on_synced: Callable[[], Awaitable[None] | None],
    known: set[str] | None = None,
) -> None:
    """Follow a bucket: every entry of its snapshot, ``on_synced`` once they are all in, then
    every change, until cancelled. The one loop every KV consumer runs.

    ``known``: the keys the consumer holds, kept by the caller across restarts of this call;
    a key deleted while the watch was away then comes as a deletion before ``on_synced`` (see
    :func:`resyncing`). Without it each call starts afresh. Either callback may be a
    coroutine function; an event is handled before the next is read (per-key order).
    """
    async with contextlib.aclosing(watch(kv)) as events:
        async for event in resyncing(events, set() if known is None else known):
            result = on_synced() if event is None else on_event(event)
            if result is not None:
                await result


class BucketWatches:
    """Buckets a service mirrors into handlers of ``(key, value or None)``, each followed by a
    task of ``tasks`` (restarted when it fails, deletions made while it was away replayed), and
    :meth:`synced` once every snapshot is in: what the monitor's caches and the proxy's view
    wait for before they serve."""

    def __init__(self, bus: Bus, tasks: TaskGroup, replicas: int = 1) -> None:
        self.bus = bus
        self.tasks = tasks
        self.replicas = replicas
        self.events: list[asyncio.Event] = []

    async def add(self, bucket: str, handle: Callable[[str, bytes | None], None]) -> None:
        kv = await self.bus.kv(bucket, replicas=self.replicas)
        synced = self.snapshot_event()
        known: set[str] = set()  # outlives a restarted watch
        self.tasks.spawn(
            f"watch-{bucket}",
            lambda: follow(kv, lambda event: handle(event.key, event.value), synced.set, known),
        )

    def snapshot_event(self) -> asyncio.Event:
        """One more snapshot to wait for (a watch started by the caller sets it)."""
        event = asyncio.Event()
        self.events.append(event)
        return event

    async def synced(self) -> None:
        await asyncio.gather(*(event.wait() for event in self.events))
