"""The lb service's side of the ``services`` bucket: records written in shards.

The format is shared/services_bucket.py's (readers in every agent and monitor). Here: which
shards a change touches, writing them, and following what other replicas wrote.

Replicas write shards concurrently, so each write names the revision it started from (KV
``update``, as spec_store.py does): when another replica wrote the shard in between, the write
fails, the shard is read again and this replica's changes are applied to it again. Writes are
not awaited one by one: :meth:`RecordStore.send` starts them (tasks the loop runs while the
caller builds the next chunk of records) and returns them; JetStream stores one connection's
messages in the order sent. A replica's own writes come back through its watch and are
recognised by their bytes, without decoding them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import nats.js.errors
from nats.js.kv import KeyValue
from prometheus_client import Counter

from services.lb.spec_store import read_shard
from shared import log, services_bucket
from shared.bus import KVEvent
from shared.errors import Unavailable
from shared.services_bucket import ServicesView, encode_shard, shard_key, shard_number, shard_of

ATTEMPTS = 20

CONFLICTS = Counter(
    "membrane_lb_record_shard_conflicts_total",
    "services shard writes retried because another replica wrote the shard first",
)

Changes = Mapping[str, bytes | None]  # service key -> encoded record, or None: removed


class RecordStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.contents: dict[int, dict[str, bytes]] = {}  # shard -> service key -> record
        self.revisions: dict[int, int] = {}  # shard -> KV revision of ``contents``
        # shard -> (hash of the payload being written, its content): recognises the echo
        self.own: dict[int, tuple[int, dict[str, bytes]]] = {}
        self.view = ServicesView()  # what the bucket holds, both formats, for the watch
        self.log = log.get("lb.records")

    def has(self, key: str) -> bool:
        """Whether ``key``'s shard holds a record of it (written, or being written)."""
        shard = shard_of(key)
        own = self.own.get(shard)
        content = own[1] if own is not None else self.contents.get(shard, {})
        return key in content

    def legacy_keys(self) -> list[str]:
        """Format-1 keys (one service each) in the bucket: an earlier version's."""
        return sorted(self.view.legacy)

    def send(self, changes: Changes) -> list[asyncio.Task[None]]:
        """Start writing every shard ``changes`` touch; the writes, for the caller to await."""
        by_shard: dict[int, dict[str, bytes | None]] = {}
        for key, value in changes.items():
            by_shard.setdefault(shard_of(key), {})[key] = value
        return [asyncio.ensure_future(self._write_shard(s, by_shard[s])) for s in sorted(by_shard)]

    async def _write_shard(self, shard: int, changes: dict[str, bytes | None]) -> None:
        for _ in range(ATTEMPTS):
            base = self.own.get(shard)
            content = dict(base[1] if base is not None else self.contents.get(shard, {}))
            for key, value in changes.items():
                if value is None:
                    content.pop(key, None)
                else:
                    content[key] = value
            payload = encode_shard(content)
            self.own[shard] = (hash(payload), content)
            try:
                revision = await self.kv.update(
                    shard_key(shard), payload, last=self.revisions.get(shard, 0)
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                CONFLICTS.inc()
                self.own.pop(shard, None)
                await self._reload(shard)  # another replica wrote it: start from theirs
                continue
            except BaseException:
                if self.own.get(shard, (None,))[0] == hash(payload):
                    self.own.pop(shard, None)
                raise
            if revision >= self.revisions.get(shard, 0):  # equal: its echo came first
                self.contents[shard] = content
                self.revisions[shard] = revision
                # the echo, when it comes after this, is passed over (its revision is known)
                self.view.set_shard(shard_key(shard), content)
            if self.own.get(shard, (None,))[0] == hash(payload):
                self.own.pop(shard, None)
            return
        raise Unavailable(f"services {shard_key(shard)} kept changing under this replica")

    async def _reload(self, shard: int) -> None:
        value, self.revisions[shard] = await read_shard(self.kv, shard_key(shard))
        try:
            self.contents[shard] = services_bucket.decode_shard(value) if value else {}
        except ValueError:
            self.contents[shard] = {}  # rewritten whole by this replica's write

    def on_event(self, event: KVEvent) -> list[tuple[str, bytes | None]]:
        """A ``services`` entry as the bucket has it now: the services whose record differs
        from what this replica knew (None: gone). A write of this replica's own gives
        nothing."""
        shard = shard_number(event.key)
        if shard is not None:
            if event.revision and event.revision <= self.revisions.get(shard, 0):
                return []  # this replica wrote it, or already read something newer
            own = self.own.get(shard)
            if own is not None and event.value is not None and own[0] == hash(event.value):
                # its own write, before the acknowledgement arrived
                self.contents[shard] = own[1]
                self.revisions[shard] = event.revision
                self.view.set_shard(event.key, own[1])
                return []
        errors = self.view.errors
        changes = self.view.update(event.key, event.value)
        if self.view.errors != errors:
            self.log.error("services shard does not decode", key=event.key)
        if shard is not None:
            self.contents[shard] = dict(self.view.shards.get(event.key, {}))
            self.revisions[shard] = event.revision
        return changes
