"""The lb service's number pools in a real Redis: stable, unique, all-or-nothing, batched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from membrane.servers import ServerProcess
from services.lb import ids
from shared.errors import ResourceExhausted
from shared.redis_store import make_redis

POOL = ids.Pool("test", 100, 109)


@pytest.fixture
async def allocator(redis_server: ServerProcess) -> AsyncIterator[ids.Allocator]:
    client = make_redis(redis_server.url)
    bulk = make_redis(redis_server.url, socket_timeout=ids.BULK_SECONDS)  # as the lb service's
    yield ids.Allocator(client, bulk=bulk)
    await client.aclose()
    await bulk.aclose()


async def script_calls(allocator: ids.Allocator) -> int:
    stats = await allocator.client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha")
    )


async def owners_and_values(allocator: ids.Allocator, pool: ids.Pool) -> tuple[dict, dict]:
    owners, values, _ = pool.keys()
    return (
        await allocator.client.hgetall(owners),
        await allocator.client.hgetall(values),
    )


async def test_values_are_stable_and_unique(allocator: ids.Allocator) -> None:
    first = await allocator.allocate(POOL, [("a", 0), ("b", 0), ("c", 0)])
    assert first == [100, 101, 102]
    again = await allocator.allocate(POOL, [("c", 0), ("d", 0), ("a", 0)])
    assert again == [102, 103, 100]  # known owners keep theirs, the new one is next
    owners, values = await owners_and_values(allocator, POOL)
    assert len(owners) == len(values) == 4
    assert {v: k for k, v in owners.items()} == values


async def test_an_asked_for_value_is_given_and_skipped_by_fresh_ones(
    allocator: ids.Allocator,
) -> None:
    # "b" asks for 101, which the cursor would hand to "a" in the same call
    assert await allocator.allocate(POOL, [("a", 0), ("b", 101), ("c", 0)]) == [100, 101, 102]
    # moving an owner to another value frees its old one
    assert await allocator.allocate(POOL, [("b", 105)]) == [105]
    owners, values = await owners_and_values(allocator, POOL)
    assert b"101" not in values and values[b"105"] == b"b" and owners[b"b"] == b"105"


async def test_a_conflict_allocates_nothing(allocator: ids.Allocator) -> None:
    await allocator.allocate(POOL, [("a", 104)])
    before = await owners_and_values(allocator, POOL)
    with pytest.raises(ids.Conflict) as caught:
        await allocator.allocate(POOL, [("x", 0), ("y", 0), ("z", 104)])
    assert (caught.value.index, caught.value.holder) == (2, "a")
    with pytest.raises(ids.Conflict) as caught:  # two owners asking for one value at once
        await allocator.allocate(POOL, [("x", 107), ("y", 107)])
    assert (caught.value.index, caught.value.holder) == (1, "x")
    assert await owners_and_values(allocator, POOL) == before


async def test_exhaustion_allocates_nothing_and_released_values_come_back(
    allocator: ids.Allocator,
) -> None:
    assert len(await allocator.allocate(POOL, [(f"o{i}", 0) for i in range(8)])) == 8
    with pytest.raises(ResourceExhausted):
        await allocator.allocate(POOL, [("p", 0), ("q", 0), ("r", 0)])
    owners, _ = await owners_and_values(allocator, POOL)
    assert len(owners) == 8
    await allocator.release(POOL, ["o3", "o5"])
    # the cursor wraps around to the freed values
    got = await allocator.allocate(POOL, [("p", 0), ("q", 0), ("r", 0), ("s", 0)])
    assert sorted(got) == [103, 105, 108, 109]


async def test_a_bulk_is_one_call(allocator: ids.Allocator) -> None:
    pool = ids.Pool("bulk", 1, ids.MAX_ID)
    owners = [(f"10.1.{i // 250}.{i % 250}:80/TCP", 0) for i in range(40_000)]
    await allocator.allocate(POOL, [("warm", 0)])  # the script loaded (EVALSHA, then EVAL once)
    before = await script_calls(allocator)
    got = await allocator.allocate(pool, owners)
    assert await script_calls(allocator) == before + 1  # not a command per owner, no retry
    assert got == list(range(1, 40_001))
    assert await allocator.allocate(pool, owners[::-1]) == got[::-1]


async def test_a_bulk_waits_for_a_busy_redis_instead_of_failing(
    allocator: ids.Allocator,
) -> None:
    # Redis runs one script at a time and answers nothing meanwhile; a bulk's own script takes
    # seconds under load. The 1 s read timeout meant for outages must not fail (and retry) it.
    # 4 s busy: longer than the short timeout with its two retries, within Redis's 5 s limit
    busy = (
        "local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end "
        "local start = now() repeat until now() - start >= 4e6"
    )
    blocker = asyncio.create_task(allocator.bulk.eval(busy, 0))
    await asyncio.sleep(0.2)  # the busy script is running
    pool = ids.Pool("busy", 1, ids.MAX_ID)
    owners = [(f"o{i}", 0) for i in range(ids.BULK_OWNERS + 1)]
    got = await allocator.allocate(pool, owners)
    assert got == list(range(1, ids.BULK_OWNERS + 2))
    await blocker
