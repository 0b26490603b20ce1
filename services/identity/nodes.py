"""Dead nodes' pods leave the bus.

A node whose heartbeat (its ``nodes`` entry) is older than ``expiry + grace`` is gone for
good: its pods' ``endpoints`` and ``ipcache`` entries are deleted, so that no reader keeps
routing to them or naming them. The agents cannot do it for each other, since each may write
only its own node's keys (shared/roles.py); the identity service, which holds the nodes' pod
CIDRs and identity leases, does. Every replica runs it: whoever comes first deletes, the rest
find nothing. A node that writes its entry again is alive again; a graceful leave (its entry
deleted) leaves its pods to its own agent, as before.
"""

from __future__ import annotations

import contextlib
import time

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter

from shared import log, subjects
from shared.bus import Bus, KVEvent
from shared.messages import Node

RELEASED = Counter(
    "membrane_identity_dead_node_entries_released_total",
    "endpoints and ipcache entries of dead nodes deleted",
)
BAD_NODES = Counter("membrane_identity_bad_node_entries_total", "nodes entries that do not decode")


class NodeReaper:
    def __init__(
        self, endpoints: KeyValue, ipcache: KeyValue, *, expiry: float, grace: float
    ) -> None:
        self.buckets = (ipcache, endpoints)
        self.expiry = expiry
        self.grace = grace
        self.heartbeats: dict[str, float] = {}  # node -> its last heartbeat
        self.released: set[str] = set()  # dead nodes whose pods are gone from the bus
        self.synced = False  # the nodes bucket's snapshot is in
        self.left: set[str] = set()  # nodes whose record was deleted (a graceful leave)
        self.log = log.get("identity.nodes")

    def on_node(self, event: KVEvent) -> None:
        if event.value is None:
            if self.heartbeats.pop(event.key, None) is not None:
                self.left.add(event.key)
            self.released.discard(event.key)
            return
        self.left.discard(event.key)
        try:
            heartbeat = msgspec.json.decode(event.value, type=Node).heartbeat
        except (msgspec.ValidationError, msgspec.DecodeError):
            BAD_NODES.inc()
            return
        if heartbeat != self.heartbeats.get(event.key):
            self.released.discard(event.key)
        self.heartbeats[event.key] = heartbeat

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
