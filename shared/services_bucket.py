"""The ``services`` bucket's format: service records kept in shards, read back per service.

Format 1 (before): one entry per service, key ``<namespace>.<name>``, value an ``LBService``.
A bulk apply of 20,000 services was 20,000 messages, and every message cost nats-server,
the TLS of five connections, both agents, the monitor and the lb service's own watch a
message each: most of the CPU of the apply that was not the YAML.

Format 2 (now): a fixed number of shards, key ``_shard.<n>`` (a namespace cannot start with
``_``, so no service key looks like one), each holding every record whose service key hashes
to ``n``, encoded exactly as in format 1::

    {"format": 2, "services": {"<namespace>.<name>": <LBService>, ...}}

A bulk writes each shard once; a single change rewrites one shard (about 20 records at
20,000 services, about 7 KB). A reader compares each record's bytes with those it holds and
decodes and applies only those that differ, so its work follows the change, not the shard.
``format`` names the layout: a reader that meets a format it does not know treats the shard as
unreadable (its services go, as an unreadable format-1 record's did: fail closed) and says so.

Readers take both formats (:class:`ServicesView`): a format-1 entry is a shard of one. When a
service is in both (an upgrade: the lb service writes its shard, then deletes the old key),
the shard's record counts, so the upgrade changes nothing in the datapath. The lb service
migrates a bucket written by an earlier version on start. Upgrade order: agents and monitors
first (they read both), then the lb service.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import msgspec

SHARDS = 1024
PREFIX = "_shard."
FORMAT = 2


class ServicesShard(msgspec.Struct, kw_only=True):
    """A format-2 ``services`` value: records by service key, each an encoded ``LBService``."""

    format: int
    services: dict[str, msgspec.Raw] = {}


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ServicesShard).decode


def shard_of(service_key: str) -> int:
    """The shard of a service key: the same in every process (``hash()`` is salted)."""
    return zlib.crc32(service_key.encode()) % SHARDS


def shard_key(shard: int) -> str:
    return f"{PREFIX}{shard}"


def shard_number(key: str) -> int | None:
    """The shard a bucket key names, or None for a format-1 (one service) key."""
    if not key.startswith(PREFIX):
        return None
    try:
        return int(key[len(PREFIX) :])
    except ValueError:
        return None


def encode_shard(content: Mapping[str, bytes]) -> bytes:
    """A shard's value: ``content`` (service key -> encoded record), keys sorted."""
    return _encode(
        ServicesShard(format=FORMAT, services={k: msgspec.Raw(content[k]) for k in sorted(content)})
    )


def decode_shard(value: bytes) -> dict[str, bytes]:
    """Service key -> encoded record; ValueError when it is not a shard of this format."""
    try:
        shard = _decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a services shard: {exc}") from None
    if shard.format != FORMAT:
        raise ValueError(
            f"services shard of format {shard.format} (this version reads {FORMAT}): written "
            "by a newer lb service; upgrade the agents and monitors first"
        )
    return {k: bytes(v) for k, v in shard.services.items()}


class ServicesView:
    """The services a reader holds, by service key, from ``services`` bucket entries of
    either format; :meth:`update` says which changed."""

    def __init__(self) -> None:
        self.shards: dict[str, dict[str, bytes]] = {}  # bucket key -> service key -> record
        self.sharded: dict[str, bytes] = {}  # service key -> record, from any shard
        self.legacy: dict[str, bytes] = {}  # service key -> record, from format-1 keys
        self.errors = 0  # entries that did not decode

    def get(self, service_key: str) -> bytes | None:
        found = self.sharded.get(service_key)
        return found if found is not None else self.legacy.get(service_key)

    def keys(self) -> Iterable[str]:
        return self.sharded.keys() | self.legacy.keys()

    def update(self, key: str, value: bytes | None) -> list[tuple[str, bytes | None]]:
        """A bucket entry changed (``value`` None: deleted): the services whose record
        changed, with the record now (None: gone). Raises nothing: a shard that does not
        decode takes its services out (counted in ``errors``), an unreadable format-1 record
        is passed on for the caller to refuse as before."""
        if shard_number(key) is None:
            return self._legacy(key, value)
        new: dict[str, bytes] = {}
        if value is not None:
            try:
                new = decode_shard(value)
            except ValueError:
                self.errors += 1
                new = {}
        return self.set_shard(key, new)

    def set_shard(self, key: str, new: dict[str, bytes]) -> list[tuple[str, bytes | None]]:
        """Shard ``key`` holds ``new`` now (known without decoding: a writer's own)."""
        old = self.shards.get(key, {})
        if new:
            self.shards[key] = new
        else:
            self.shards.pop(key, None)
        changes: list[tuple[str, bytes | None]] = []
        sharded = self.sharded
        for service, record in new.items():
            if old.get(service) != record:
                before = self.get(service)
                sharded[service] = record
                if before != record:
                    changes.append((service, record))
        for service in old:
            if service not in new:
                sharded.pop(service, None)
                changes.append((service, self.legacy.get(service)))
        return changes

    def _legacy(self, key: str, value: bytes | None) -> list[tuple[str, bytes | None]]:
        before = self.get(key)
        if value is None:
            self.legacy.pop(key, None)
        else:
            self.legacy[key] = value
        after = self.get(key)
        return [] if after == before else [(key, after)]


def count_services(entries: Mapping[str, bytes]) -> int:
    """How many services a snapshot of the bucket holds (its keys are shards, kept when
    emptied, and format-1 records)."""
    view = ServicesView()
    for key, value in entries.items():
        view.update(key, value)
    return len(set(view.keys()))
