"""Read flow events from the datapath's ring buffer and publish them in batches on the bus.

The ring buffer is read from the event loop whenever its fd is readable, in bounded chunks so
that the loop keeps turning; publishing runs in its own task behind a bounded queue. When the
bus falls behind, reading pauses and the ring buffer holds the events (what it cannot hold the
datapath counts as lost); when the bus is stuck for longer than the publish timeout, reading
goes on and batches the queue cannot take are dropped. Either way the loss is counted, by
stage, in ``membrane_datapath_flows_dropped_total`` and in the header of the next batch that
goes out, and logged.

A batch the bus took can still reach nobody: core NATS drops a message no monitor replica is
subscribed to (none running, or a replica that reconnected but has not subscribed again yet)
without a word. So every batch carries a reply subject of this publisher's own, which no one
answers, except nats-server when it delivered the batch to no one (the "no responders" status,
503): that batch's flows are then counted as dropped at ``publish`` and its loss counts go in the
next batch, as if its publish had failed. Before this, a batch carrying only loss counts, sent
the moment the agent was back after a nats-server restart, could reach the server before the
monitor had subscribed again, and the counts were lost with it.

Batches are binary (:mod:`shared.flow_wire`): the ring buffer's records copied as they are, one
copy per run of records and nothing per event, so the agent's cost per event is a share of a
memcpy. ``wire="json"`` publishes the former JSON FlowBatch instead (one decoded WireFlow per
event), for monitors that predate the binary batch during an upgrade.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Final, Protocol

import msgspec
from prometheus_client import Counter

from shared import flow_wire, log, subjects
from shared.bus import Bus
from shared.flow_decode import RECORD, Decoder, WireBatch
from shared.unheard import UnheardBatches

# binary batches: 4096 records of 56 bytes are 224 KiB, well under NATS's payload limit
MAX_FLOWS: Final = 4096
# JSON batches, as before (a JSON flow is about 400 bytes)
MAX_FLOWS_JSON: Final = 512
MAX_DELAY_S: Final = 0.05
# The datapath submits events without waking the reader (a wake-up costs the sending packet
# microseconds), so the ring is also drained on this timer.
POLL_INTERVAL_S: Final = 0.01
# records decoded per wake-up: about 10 ms of work, so timers and the sender keep running
DRAIN_CHUNK: Final = 8192
# records copied per wake-up in binary: about a millisecond of memcpy
DRAIN_CHUNK_BINARY: Final = 65536
# batches waiting for the bus: at half of it reading pauses (the ring buffer holds what comes
# meanwhile), at all of it new batches are dropped (and counted)
MAX_QUEUED: Final = 64
PUBLISH_TIMEOUT_S: Final = 2.0
# a flush reads at most this many chunks, in case the datapath writes as fast as it reads
FLUSH_CHUNKS: Final = 128
LOG_EVERY_S: Final = 10.0
NO_SUBSCRIBER: Final = "no monitor replica was subscribed"

FLOWS_PUBLISHED = Counter(
    "membrane_datapath_flows_published_total", "Flows handed to the bus by the flow publisher"
)
FLOW_BATCHES = Counter(
    "membrane_datapath_flow_batches_total", "Flow batches handed to the bus by the flow publisher"
)
FLOWS_DROPPED = Counter(
    "membrane_datapath_flows_dropped_total",
    "Flows read from the ring buffer but not published, by stage (queue: the queue for the bus"
    " was full; publish: the bus did not take the batch, or nats-server delivered it to no"
    " monitor replica)",
    ["stage"],
)
WIRES: Final = ("binary", "json")

_log = log.get("flows")


class RecordSource(Protocol):
    """Where records come from: a :class:`~services.datapath.ringbuf.RingBuffer`."""

    def fileno(self) -> int: ...

    def drain_records(self, stride: int, max_records: int = ...) -> tuple[list[bytes], int]: ...


@dataclasses.dataclass(slots=True)
class _Batch:
    payload: bytes
    flows: int
    lost: int  # the stage counts its header carries, for when it does not go out
    dropped_queue: int
    dropped_publish: int

    def counts(self) -> tuple[int, int, int, int]:
        return self.flows, self.lost, self.dropped_queue, self.dropped_publish


class FlowPublisher:
    """Publishes a node's flows in batches on ``membrane.flows.<node>``.

    A batch goes out once it holds ``max_flows`` flows or ``max_delay`` seconds after its
    first flow, whichever comes first. ``lost_events`` returns the cumulative count of events
    the datapath could not put in the ring buffer; each batch carries the increase since the
    previous one (counted from this publisher's construction), and an increase with no flows
    to carry it goes out in a batch of its own. Binary batches carry the agent's own drops
    the same way, by stage; JSON batches have no place for them (the counter still has them).
    """

    def __init__(
        self,
        bus: Bus,
        node: str,
        ring: RecordSource,
        lost_events: Callable[[], int],
        *,
        wire: str = "binary",
        max_flows: int | None = None,
        max_delay: float = MAX_DELAY_S,
        max_queued: int = MAX_QUEUED,
        publish_timeout: float = PUBLISH_TIMEOUT_S,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        self._bus = bus
        self._node = node
        self._subject = subjects.flows(node)
        self._ring = ring
        self._lost_events = lost_events
        if wire not in WIRES:
            raise ValueError(f"flow wire format {wire!r} is not one of {', '.join(WIRES)}")
        self._json = wire == "json"
        if max_flows is None:
            max_flows = MAX_FLOWS_JSON if self._json else MAX_FLOWS
        self._max_flows = max_flows
        self._max_delay = max_delay
        self._max_queued = max_queued
        self._publish_timeout = publish_timeout
        self._poll_interval = poll_interval
        self._decoder = Decoder(node)
        self._node_bytes = node.encode()
        # records per wake-up: bounded in time, and never more batches than the queue takes
        chunk = DRAIN_CHUNK if self._json else DRAIN_CHUNK_BINARY
        self._chunk = max(1, min(chunk, max_flows * max(1, max_queued // 4)))
        self._pending: list[bytes] = []  # runs of ring buffer records, back to back
        self._pending_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._queue: collections.deque[_Batch] = collections.deque()
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()  # keeps batches in order between sender and flush
        self._lost_seen = self._read_lost() or 0
        self._lost_carry = 0  # lost counts of batches that never made it out
        self._queue_carry = 0  # flows dropped at the full queue, for the next batch's header
        self._publish_carry = 0  # flows (and carried counts) the bus did not take
        self._failure: asyncio.Future[None] | None = None
        self._reading = False  # the ring buffer's fd is (to be) watched by run()
        self._paused_since: float | None = None
        self._unlogged_drops = 0
        self._drop_reason = ""
        self._last_drop_log = -LOG_EVERY_S
        self._lost_read_failed = False
        # batches nats-server delivered to no one (no monitor replica subscribed)
        self._unheard: UnheardBatches[tuple[int, int, int, int]] = UnheardBatches(
            lambda counts: self._not_taken(*counts, NO_SUBSCRIBER), self._forgotten
        )

    async def run(self) -> None:
        """Read and publish until cancelled; what was read by then is published first."""
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        await self._watch_replies()
        sender = asyncio.create_task(self._send_queued(), name=f"flows-send-{self._node}")
        fd = self._ring.fileno()
        loop.add_reader(fd, self._on_readable)
        self._reading = True
        try:
            while True:
                await asyncio.wait({self._failure}, timeout=self._poll_interval)
                if self._failure.done():
                    self._failure.result()  # the reader failed: stop, so a supervisor sees it
                if self._reading and self._paused_since is None:
                    self._on_readable()
                if not self._pending:
                    self._cut()  # only when the lost count moved: no flows to carry it
                paused = self._paused_since
                if paused is not None and time.monotonic() - paused > self._publish_timeout:
                    self._resume()  # the bus is stuck: read on, and drop what it cannot take
                self._log_drops()  # drops that came after the last line
        finally:
            self._reading = False
            loop.remove_reader(fd)
            try:
                await asyncio.wait_for(self.flush(), self._publish_timeout)
            except Exception:
                _log.warning("final flow flush failed", node=self._node, exc_info=True)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await self._unwatch_replies()

    async def flush(self) -> None:
        """Publish every flow read so far and what the ring buffer holds now."""
        for _ in range(FLUSH_CHUNKS):
            read = self._read_ring()
            await self._send_all()
            if read < self._chunk:
                break
        self._cut()
        await self._send_all()

    # --- reading (event loop callbacks: no awaits, bounded work) -------------------------------

    def _on_readable(self) -> None:
        try:
            self._read_ring()
        except Exception as exc:
            # the fd stays readable: retrying would spin; let run() end instead
            asyncio.get_running_loop().remove_reader(self._ring.fileno())
            if self._failure is not None and not self._failure.done():
                self._failure.set_exception(exc)

    def _read_ring(self) -> int:
        """Read a chunk of records into batches; how many records there were."""
        chunks, count = self._ring.drain_records(RECORD.size, self._chunk)
        if not count:
            return 0
        pending = self._pending
        if not pending:
            self._start_timer()
        pending.extend(chunks)
        self._pending_count += count
        size = self._max_flows
        if self._pending_count < size:
            return count
        data = b"".join(pending) if len(pending) > 1 else pending[0]
        stride = RECORD.size
        full = self._pending_count - self._pending_count % size
        for start in range(0, full, size):
            self._enqueue(data[start * stride : (start + size) * stride], size)
        rest = data[full * stride :]
        self._pending = [rest] if rest else []
        self._pending_count -= full
        self._cancel_timer()
        if rest:
            self._start_timer()  # the rest starts a new batch, timed from now
        return count

    def _start_timer(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._cut()

    def _cut(self) -> None:
        """Queue the pending flows as a batch; an empty one only if events were lost."""
        self._cancel_timer()
        records, count = b"".join(self._pending), self._pending_count
        self._pending, self._pending_count = [], 0
        if count or self._carrying() or self._lost_moved():
            self._enqueue(records, count)

    def _carrying(self) -> bool:
        if self._json:
            return bool(self._lost_carry)
        return bool(self._lost_carry or self._queue_carry or self._publish_carry)

    def _enqueue(self, records: bytes, count: int) -> None:
        lost = self._take_lost()
        if len(self._queue) >= self._max_queued:
            self._lost_carry += lost
            self._queue_carry += count
            self._dropped(count, "queue", "the bus is not keeping up")
            return
        if self._json:
            flows = self._decoder.wire(list(RECORD.iter_unpack(records)))
            payload = _json_encode(WireBatch(node=self._node, flows=flows, lost=lost))
            batch = _Batch(payload, count, lost, 0, 0)
        else:
            queue, self._queue_carry = self._queue_carry, 0
            publish, self._publish_carry = self._publish_carry, 0
            head = flow_wire.header(
                self._node_bytes,
                count,
                self._decoder.clock_offset_ns(),  # the kernel's clock is CLOCK_MONOTONIC
                lost,
                queue,
                publish,
            )
            batch = _Batch(head + records, count, lost, queue, publish)
        self._queue.append(batch)
        self._wake.set()
        if len(self._queue) >= self._max_queued // 2:
            self._pause()

    def _pause(self) -> None:
        if self._reading and self._paused_since is None:
            asyncio.get_running_loop().remove_reader(self._ring.fileno())
            self._paused_since = time.monotonic()

    def _resume(self) -> None:
        if self._paused_since is not None:
            self._paused_since = None
            if self._reading:
                asyncio.get_running_loop().add_reader(self._ring.fileno(), self._on_readable)

    # --- lost events ----------------------------------------------------------------------

    def _read_lost(self) -> int | None:
        try:
            value = self._lost_events()
        except Exception:
            if not self._lost_read_failed:  # once per failure streak
                _log.warning("cannot read the lost events counter", exc_info=True)
            self._lost_read_failed = True
            return None
        self._lost_read_failed = False
        return value

    def _lost_moved(self) -> bool:
        value = self._read_lost()
        return value is not None and value != self._lost_seen

    def _take_lost(self) -> int:
        lost, self._lost_carry = self._lost_carry, 0
        value = self._read_lost()
        if value is not None:
            # a smaller value means the map was recreated: all of it is new
            lost += value - self._lost_seen if value >= self._lost_seen else value
            self._lost_seen = value
        return lost

    # --- sending --------------------------------------------------------------------------

    async def _send_queued(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_all()

    async def _send_all(self) -> None:
        async with self._sending:
            while self._queue:
                await self._send(self._queue.popleft())
                if len(self._queue) <= self._max_queued // 4:
                    self._resume()

    async def _send(self, batch: _Batch) -> None:
        reply = self._unheard.reply()
        try:
            await asyncio.wait_for(
                self._bus.nc.publish(self._subject, batch.payload, reply=reply),
                self._publish_timeout,
            )
        except Exception as exc:  # any failure costs this batch, never the publisher
            self._not_taken(*batch.counts(), str(exc) or type(exc).__name__)
            return
        self._unheard.sent(reply, batch.counts())
        FLOWS_PUBLISHED.inc(batch.flows)
        FLOW_BATCHES.inc()

    def _not_taken(self, flows: int, lost: int, queue: int, publish: int, why: str) -> None:
        """A batch that reached no monitor: what its header carried goes in the next one."""
        self._lost_carry += lost
        self._queue_carry += queue
        self._publish_carry += publish + flows
        self._dropped(flows, "publish", why)

    # --- batches no one received ----------------------------------------------------------

    async def _watch_replies(self) -> None:
        """Subscribe to this publisher's reply subjects (once; without them, batches go out
        with no reply subject and one that reaches no subscriber is not noticed)."""
        try:
            await self._unheard.start(self._bus.nc)
        except Exception:
            _log.warning("cannot subscribe to flow batch replies", exc_info=True)

    async def _unwatch_replies(self) -> None:
        await self._unheard.stop()

    def _forgotten(self) -> None:
        # published before the oldest kept: its counts are gone
        _log.warning("flow batch reached no monitor, no longer known", node=self._node)

    def _dropped(self, count: int, stage: str, why: str) -> None:
        if not count:
            return  # a batch of only carried counts: those were carried over, not dropped
        FLOWS_DROPPED.labels(stage).inc(count)
        self._unlogged_drops += count
        self._drop_reason = why
        self._log_drops()

    def _log_drops(self) -> None:
        """One line per LOG_EVERY_S at most, with the flows dropped since the previous one."""
        now = time.monotonic()
        if self._unlogged_drops and now - self._last_drop_log >= LOG_EVERY_S:
            _log.warning(
                "flows dropped",
                node=self._node,
                flows=self._unlogged_drops,
                reason=self._drop_reason,
            )
            self._unlogged_drops = 0
            self._last_drop_log = now


_json_encode = msgspec.json.Encoder().encode
