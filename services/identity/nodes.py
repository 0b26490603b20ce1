"""The failure detector, and dead nodes' pods leaving the bus.

Every agent publishes a heartbeat on ``membrane.nodes.heartbeat.<node>`` (its credential may
publish on its own node's subject only); this detector alone subscribes. A node is alive from
its first heartbeat until ``expiry`` passes without one; each change of that verdict is
written to the ``liveness`` bucket, which the agents (routes), the CLI and the UI read. Before,
every agent rewrote its ``nodes`` entry every heartbeat and every agent followed that bucket:
N^2/5 deliveries a second for no change. A node first seen in ``nodes`` counts from then, as
does every node when the detector starts (it cannot know more).

While the detector is cut off from NATS it judges nothing, and counts every node from when it
is back (a NATS restart longer than the expiry would otherwise make every node dead at once).

A node silent for ``expiry + grace`` is gone for good: its pods' ``endpoints`` and ``ipcache``
entries are deleted, so that no reader keeps routing to them or naming them. The agents cannot
do it for each other, since each may write only its own node's keys (shared/roles.py); the
identity service, which holds the nodes' pod CIDRs and identity leases, does. Every replica
runs it: whoever comes first deletes or writes, the rest find nothing or write the same
verdict. A node that heartbeats again is alive again; a graceful leave (its entry deleted)
leaves its pods to its own agent, as before.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from prometheus_client import Counter

from shared import log, subjects
from shared.bus import Bus, KVEvent
from shared.messages import Node, NodeHeartbeat, NodeLiveness

RELEASED = Counter(
    "membrane_identity_dead_node_entries_released_total",
    "endpoints and ipcache entries of dead nodes deleted",
)
BAD_NODES = Counter("membrane_identity_bad_node_entries_total", "nodes entries that do not decode")
HEARTBEATS = Counter(
    "membrane_identity_node_heartbeats_total", "node heartbeats by outcome", ["outcome"]
)
VERDICTS = Counter(
    "membrane_identity_node_verdicts_total", "liveness verdicts written", ["verdict"]
)


class NodeReaper:
    def __init__(
        self,
        endpoints: KeyValue,
        ipcache: KeyValue,
        liveness: KeyValue,
        *,
        expiry: float,
        grace: float,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.buckets = (ipcache, endpoints)
        # while the detector is away from NATS it hears no heartbeat: that silence is not the
        # nodes', so it judges nothing then, and counts every node from when it is back
        self.connected = connected
        self.blind = False
        self.liveness = liveness
        self.expiry = expiry
        self.grace = grace
        self.heartbeats: dict[str, float] = {}  # node -> its last heartbeat (our clock)
        self.verdicts: dict[str, bool] = {}  # node -> alive, as the liveness bucket says
        self.forget: set[str] = set()  # nodes that left whose verdict is still to delete
        self.released: set[str] = set()  # dead nodes whose pods are gone from the bus
        self.synced = False  # the nodes bucket's snapshot is in
        self.left: set[str] = set()  # nodes whose record was deleted (a graceful leave)
        self.log = log.get("identity.nodes")

    async def load(self) -> None:
        """The verdicts already written (a restarted detector writes only changes)."""
        for key, raw in (await Bus.snapshot(self.liveness)).items():
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                self.verdicts[subjects.node_of_token(key)] = msgspec.json.decode(
                    raw, type=NodeLiveness
                ).alive

    def on_node(self, event: KVEvent, now: float | None = None) -> None:
        if event.value is None:
            if self.heartbeats.pop(event.key, None) is not None:
                self.left.add(event.key)
            self.released.discard(event.key)
            if self.verdicts.pop(event.key, None) is not None:
                self.forget.add(event.key)
            return
        self.left.discard(event.key)
        try:
            msgspec.json.decode(event.value, type=Node)
        except (msgspec.ValidationError, msgspec.DecodeError):
            BAD_NODES.inc()
            return
        self.forget.discard(event.key)
        # a member the detector has not heard from yet: its expiry counts from now
        self.heartbeats.setdefault(event.key, time.time() if now is None else now)

    async def on_heartbeat_message(self, msg: Msg) -> None:
        """A heartbeat off the bus: believed only for the node its subject names (the bus
        lets a node publish on its own subject only)."""
        token = msg.subject.rsplit(".", 1)[-1]
        try:
            beat = msgspec.json.decode(msg.data, type=NodeHeartbeat)
        except (msgspec.ValidationError, msgspec.DecodeError):
            HEARTBEATS.labels("bad").inc()
            return
        if subjects.node_token(beat.node) != token:
            HEARTBEATS.labels("refused").inc()
            self.log.warning("heartbeat for another node refused", node=beat.node, subject=token)
            return
        HEARTBEATS.labels("accepted").inc()
        await self.on_heartbeat(beat.node)

    async def on_heartbeat(self, node: str, now: float | None = None) -> None:
        now = time.time() if now is None else now  # our clock: the nodes' may differ
        self.heartbeats[node] = max(now, self.heartbeats.get(node, 0.0))
        self.released.discard(node)
        self.forget.discard(node)
        if self.verdicts.get(node) is not True:
            await self.judge(node, True, now)

    async def judge(self, node: str, alive: bool, now: float) -> None:
        """Write a changed verdict; a failed write (NATS away) is tried again next tick."""
        verdict = NodeLiveness(
            node=node, alive=alive, since=now, heartbeat=self.heartbeats.get(node, 0.0)
        )
        try:
            await self.liveness.put(subjects.node_token(node), msgspec.json.encode(verdict))
        except Exception as exc:
            self.log.warning("liveness not written", node=node, alive=alive, error=str(exc))
            self.verdicts.pop(node, None)
            return
        self.verdicts[node] = alive
        VERDICTS.labels("alive" if alive else "dead").inc()
        self.log.info("node alive" if alive else "node dead", node=node)

    async def tick(self, now: float | None = None) -> None:
        """Once a second: verdicts of nodes whose heartbeats stopped (or came back while a
        write failed), forgotten nodes' verdicts, then the dead nodes' pods."""
        now = time.time() if now is None else now
        if not self.connected():
            self.blind = True
            return
        if self.blind:
            self.blind = False
            self.heartbeats = dict.fromkeys(self.heartbeats, now)
        for node, beat in list(self.heartbeats.items()):
            alive = now - beat <= self.expiry
            if self.verdicts.get(node) is not alive:
                await self.judge(node, alive, now)
        for node in list(self.forget):
            with contextlib.suppress(Exception):  # NATS away: next tick
                await self.liveness.delete(subjects.node_token(node))
                self.forget.discard(node)
        await self.reap(now)

    def on_synced(self) -> None:
        self.synced = True

    def alive(self, node: str, now: float | None = None) -> bool:
        """Not gone for good: its record is there and its heartbeat within ``expiry + grace``
        (before the snapshot is in, every node counts as alive)."""
        if not self.synced:
            return True
        beat = self.heartbeats.get(node)
        now = time.time() if now is None else now
        return beat is not None and now - beat <= self.expiry + self.grace

    def seen(self, node: str) -> bool:
        """Whether the node has a record, or had one this service saw deleted."""
        return node in self.heartbeats or node in self.left

    def due(self, now: float) -> list[str]:
        """Dead nodes past the grace whose pods are still to release."""
        limit = self.expiry + self.grace
        return sorted(
            name
            for name, beat in self.heartbeats.items()
            if name not in self.released and now - beat > limit
        )

    async def reap(self, now: float | None = None) -> None:
        """Release every node that is due. A failure (NATS away) leaves the node due for the
        next pass."""
        for name in self.due(time.time() if now is None else now):
            try:
                count = await self.release(name)
            except Exception as exc:
                self.log.warning("releasing a dead node's pods failed", node=name, error=str(exc))
                continue
            self.released.add(name)
            self.log.warning("released a dead node's pods", node=name, entries=count)

    async def release(self, node: str) -> int:
        count = 0
        for kv in self.buckets:
            for key in await Bus.snapshot(kv, subjects.node_keys(node)):
                with contextlib.suppress(Exception):  # deleted by another replica meanwhile
                    await kv.delete(key)
                    count += 1
        RELEASED.inc(count)
        return count
