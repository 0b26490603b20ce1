"""What was applied, kept in the ``lb-specs`` bucket in a fixed number of shards.

One KV entry per spec made a bulk apply of 20,000 Services (with their EndpointSlices) 40,000
writes, each stored by JetStream and read back by every replica's watch: more than a third of
the CPU of the whole apply. A shard is one entry holding every spec whose key hashes to it, so
a bulk apply writes each shard once (``SHARDS`` writes in all) and a single change writes one
shard of a few dozen specs (about 10 KB at 20,000 services).

Replicas write shards concurrently, so each write names the revision it started from (KV
``update``): when another replica wrote that shard in between, the write fails, the shard is
read again and the same changes are applied to it. A replica's own writes come back through
its watch and are recognised by their bytes, without decoding them.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from prometheus_client import Counter

from shared import log
from shared.bus import KVEvent
from shared.errors import Unavailable

SHARDS = 1024
PREFIX = "shard."


async def read_shard(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """A shard's value (None: none, or deleted or purged by hand) and the revision a
    compare-and-set write of it must name next."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:
        return None, exc.entry.revision if exc.entry is not None else 0
    return entry.value, entry.revision or 0


ATTEMPTS = 20  # a shard contended this often in a row means something is badly wrong

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode

CONFLICTS = Counter(
    "membrane_lb_spec_shard_conflicts_total",
    "lb-specs shard writes retried because another replica wrote the shard first",
)

Changes = Mapping[str, bytes | None]  # spec key -> encoded spec, or None: removed


def shard_of(key: str) -> int:
    """The shard of a spec key: the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32(key.encode()) % SHARDS


def shard_key(shard: int) -> str:
    return f"{PREFIX}{shard}"


class SpecStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.contents: dict[int, dict[str, bytes]] = {}  # shard -> spec key -> encoded spec
        self.revisions: dict[int, int] = {}  # shard -> KV revision of ``contents``
        # shard -> (hash of the payload being written, its content): recognises the echo
        self.own: dict[int, tuple[int, dict[str, bytes]]] = {}
        self.log = log.get("lb.specs")

    async def write(self, changes: Changes) -> None:
        """Put or remove specs; every touched shard is written, concurrently."""
        by_shard: dict[int, dict[str, bytes | None]] = {}
        for key, value in changes.items():
            by_shard.setdefault(shard_of(key), {})[key] = value
        await asyncio.gather(*(self._write_shard(s, c) for s, c in by_shard.items()))

    async def _write_shard(self, shard: int, changes: dict[str, bytes | None]) -> None:
        for _ in range(ATTEMPTS):
            content = dict(self.contents.get(shard, {}))
            for key, value in changes.items():
                if value is None:
                    content.pop(key, None)
                else:
                    content[key] = value
            payload = _encode({k: msgspec.Raw(v) for k, v in content.items()})
            self.own[shard] = (hash(payload), content)
            try:
                revision = await self.kv.update(
                    shard_key(shard), payload, last=self.revisions.get(shard, 0)
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                CONFLICTS.inc()
                await self._reload(shard)  # another replica wrote it: start from theirs
                continue
            if revision >= self.revisions.get(shard, 0):  # equal: its echo came first
                self.contents[shard] = content
                self.revisions[shard] = revision
            return
        raise Unavailable(f"lb-specs {shard_key(shard)} kept changing under this replica")

    async def _reload(self, shard: int) -> None:
        value, self.revisions[shard] = await read_shard(self.kv, shard_key(shard))
        self.contents[shard] = {k: bytes(v) for k, v in _decode(value or b"{}").items()}

    def on_event(self, event: KVEvent) -> dict[str, bytes | None]:
        """A shard as the bucket has it now: the specs that differ from what this replica
        knew (a spec that went is ``None``). A write of this replica's own gives nothing."""
        if not event.key.startswith(PREFIX):
            self.log.warning("not a shard key; ignored", key=event.key)
            return {}
        try:
            shard = int(event.key[len(PREFIX) :])
        except ValueError:
            self.log.warning("not a shard key; ignored", key=event.key)
            return {}
        if event.revision and event.revision <= self.revisions.get(shard, 0):
            return {}  # this replica wrote it, or already read something newer
        own = self.own.get(shard)
        if own is not None and event.value is not None and own[0] == hash(event.value):
            self.contents[shard] = own[1]  # its own write, before the acknowledgement arrived
            self.revisions[shard] = event.revision
            return {}
        try:
            new = (
                {k: bytes(v) for k, v in _decode(event.value).items()}
                if event.value is not None
                else {}
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.log.error("shard does not decode; ignored", key=event.key, error=str(exc))
            return {}
        old = self.contents.get(shard, {})
        changed: dict[str, bytes | None] = {k: v for k, v in new.items() if old.get(k) != v}
        changed.update((k, None) for k in old if k not in new)
        self.contents[shard] = new
        self.revisions[shard] = event.revision
        return changed
