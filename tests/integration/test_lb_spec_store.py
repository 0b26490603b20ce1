"""The lb service's sharded spec store on a real JetStream bucket: two replicas writing the
same shards at once lose nothing; each sees the other's changes and not its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from services.lb import spec_store
from services.lb.spec_store import SpecStore
from shared import subjects
from shared.bus import Bus, KVEvent
from tests.conftest import eventually


async def until(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> None:
        assert condition(), what

    await eventually(probe, timeout=10, what=what)


class Replica:
    """A store and what its watch reported as changed by others."""

    def __init__(self, store: SpecStore) -> None:
        self.store = store
        self.seen: dict[str, bytes | None] = {}
        self.events = 0

    async def follow(self) -> None:
        async with contextlib.aclosing(Bus.watch(self.store.kv)) as events:
            async for event in events:
                if event is not None:
                    self.events += 1
                    self.seen.update(self.store.on_event(event))


@pytest.fixture
async def replicas(bus: Bus) -> AsyncIterator[list[Replica]]:
    kv = await bus.kv(subjects.KV_LB_SPECS)
    out = [Replica(SpecStore(kv)), Replica(SpecStore(kv))]
    tasks = [asyncio.create_task(r.follow()) for r in out]
    yield out
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def merged(store: SpecStore) -> dict[str, bytes]:
    return {k: v for content in store.contents.values() for k, v in content.items()}


async def test_a_bulk_is_one_write_per_shard_and_the_other_replica_sees_every_spec(
    replicas: list[Replica],
) -> None:
    a, b = replicas
    specs = {f"service.bench.s{i}": b'{"kind":"Service","n":%d}' % i for i in range(5000)}
    await a.store.write(specs)
    assert len(a.store.revisions) == spec_store.SHARDS  # 5,000 specs: every shard, once each
    await until(lambda: b.seen == specs, "every spec seen by the other replica")
    assert merged(b.store) == specs == merged(a.store)
    await asyncio.sleep(0.2)
    assert a.seen == {}  # its own writes came back and were recognised


async def test_concurrent_writes_to_one_shard_keep_both_changes(replicas: list[Replica]) -> None:
    a, b = replicas
    # keys that all land in one shard, so that every write of one replica races the other's
    keys = [k for k in (f"service.ns.k{i}" for i in range(5000)) if spec_store.shard_of(k) == 7]
    mine, theirs = keys[:20], keys[20:40]
    conflicts = spec_store.CONFLICTS._value.get()
    await asyncio.gather(
        *(a.store.write({k: b'"a"'}) for k in mine),
        *(b.store.write({k: b'"b"'}) for k in theirs),
    )
    entry = await a.store.kv.get(spec_store.shard_key(7))
    stored = spec_store._decode(entry.value or b"")
    assert sorted(stored) == sorted(mine + theirs)
    assert spec_store.CONFLICTS._value.get() > conflicts  # the race did happen
    expected = {k: bytes(v) for k, v in stored.items()}
    await until(lambda: merged(a.store) == merged(b.store) == expected, "both replicas agree")


async def test_a_removal_is_reported_as_none(replicas: list[Replica]) -> None:
    a, b = replicas
    await a.store.write({"service.ns.x": b"1", "service.ns.y": b"2"})
    await until(lambda: b.seen == {"service.ns.x": b"1", "service.ns.y": b"2"}, "both specs seen")
    await a.store.write({"service.ns.x": None})
    await until(lambda: b.seen["service.ns.x"] is None, "the removal seen")
    assert b.seen["service.ns.y"] == b"2"
    assert merged(b.store) == {"service.ns.y": b"2"}


async def test_foreign_keys_and_bad_shards_are_ignored(bus: Bus) -> None:
    store = SpecStore(await bus.kv(subjects.KV_LB_SPECS))
    assert store.on_event(KVEvent(key="service.ns.old", value=b"{}", revision=1)) == {}
    assert store.on_event(KVEvent(key="shard.x", value=b"{}", revision=2)) == {}
    assert store.on_event(KVEvent(key="shard.3", value=b"not json", revision=3)) == {}
    assert store.on_event(KVEvent(key="shard.3", value=b'{"k":1}', revision=4)) == {"k": b"1"}
    assert store.on_event(KVEvent(key="shard.3", value=b'{"k":2}', revision=4)) == {}  # stale
