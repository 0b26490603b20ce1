"""The allocator against a real redis-server: uniqueness, references, leases, GC, quarantine."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from membrane.servers import ServerProcess
from services.identity.allocator import IdentityAllocator
from services.identity.ipam import PodCIDRAllocator
from shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from shared.redis_store import make_redis


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    redis = make_redis(redis_server.url)
    yield redis
    await redis.aclose()


def allocator(client: aioredis.Redis, **kwargs: object) -> IdentityAllocator:
    return IdentityAllocator(client, **kwargs)  # type: ignore[arg-type]


async def test_same_labels_same_id_in_any_order(client: aioredis.Redis) -> None:
    alloc = allocator(client)
    a = await alloc.allocate(["app=web", "tier=front"], "node-1")
    b = await alloc.allocate(["tier=front", "k8s:app=web"], "node-2")
    c = await alloc.allocate(["app=db"], "node-1")
    assert a.new and not b.new and c.new
    assert a.id == b.id == 256
    assert c.id == 257
    assert await alloc.references(a.id) == 2


async def test_replicas_share_an_identity_through_the_label_filter(client: aioredis.Redis) -> None:
    alloc = allocator(client)
    ids = {
        (await alloc.allocate(["app=web", f"pod-template-hash={h}"], "node-1")).id
        for h in ("7d9f8", "abc12", "zz999")
    }
    assert len(ids) == 1


async def test_concurrent_allocators_never_duplicate(client: aioredis.Redis) -> None:
    allocators = [allocator(client) for _ in range(4)]
    label_sets = [[f"app=a{i}", f"team=t{i % 7}"] for i in range(300)]

    async def run(alloc: IdentityAllocator) -> dict[str, int]:
        order = label_sets[:]
        random.shuffle(order)
        seen: dict[str, int] = {}
        for labels in order:
            result = await alloc.allocate(labels, "node-x")
            seen[result.labels.canonical] = result.id
        return seen

    results = await asyncio.gather(*(run(a) for a in allocators))
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == 300


async def test_release_then_gc_after_grace(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=0.3)
    a = await alloc.allocate(["app=web"], "node-1")
    assert await alloc.release(a.id, "node-1") == 0
    assert (await alloc.collect_garbage()).deleted_ids == []  # still inside the grace period
    await asyncio.sleep(0.4)
    assert (await alloc.collect_garbage()).deleted_ids == [a.id]
    with pytest.raises(NotFound):
        await alloc.get(a.id)
    # a new label set does not get the quarantined id; the counter moves on
    b = await alloc.allocate(["app=other"], "node-1")
    assert b.id != a.id


async def test_reallocation_inside_grace_keeps_the_id(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=0.3)
    a = await alloc.allocate(["app=web"], "node-1")
    await alloc.release(a.id, "node-1")
    again = await alloc.allocate(["app=web"], "node-2")
    assert again.id == a.id and not again.new
    await asyncio.sleep(0.4)
    assert (await alloc.collect_garbage()).deleted_ids == []
    assert (await alloc.get(a.id)).canonical == "k8s:app=web"


async def test_freed_ids_are_reused_only_after_quarantine(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=0.3, min_id=256, max_id=257)
    a = await alloc.allocate(["app=a"], "n")
    await alloc.allocate(["app=b"], "n")
    with pytest.raises(ResourceExhausted):
        await alloc.allocate(["app=c"], "n")
    await alloc.release(a.id, "n")
    await asyncio.sleep(0.35)
    assert (await alloc.collect_garbage()).deleted_ids == [a.id]
    with pytest.raises(ResourceExhausted, match="in use or quarantined"):
        await alloc.allocate(["app=c"], "n")  # freed, but still quarantined
    await asyncio.sleep(0.35)
    c = await alloc.allocate(["app=c"], "n")
    assert c.id == a.id and c.new


async def test_lapsed_lease_drops_the_owners_references(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=0.2)
    leased = await alloc.allocate(["app=web"], "node-dead", lease_seconds=0.3)
    shared_id = await alloc.allocate(["app=db"], "node-dead", lease_seconds=0.3)
    await alloc.allocate(["app=db"], "node-alive", lease_seconds=30)
    await asyncio.sleep(0.4)
    result = await alloc.collect_garbage()
    assert result.expired_owners == ["node-dead"]
    assert await alloc.references(leased.id) == 0
    assert await alloc.references(shared_id.id) == 1
    await asyncio.sleep(0.25)
    assert (await alloc.collect_garbage()).deleted_ids == [leased.id]


async def test_heartbeat_keeps_a_lease_alive(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=0.1)
    a = await alloc.allocate(["app=web"], "node-1", lease_seconds=0.3)
    for _ in range(3):
        await asyncio.sleep(0.15)
        await alloc.renew_lease("node-1", 0.3)
        assert (await alloc.collect_garbage()).expired_owners == []
    assert await alloc.references(a.id) == 1


async def test_bad_input_is_rejected_with_the_label_named(client: aioredis.Redis) -> None:
    alloc = allocator(client)
    with pytest.raises(InvalidArgument) as err:
        await alloc.allocate(["app=ok", "bad key=x"], "n")
    assert err.value.field == "labels['bad key=x']"
    with pytest.raises(InvalidArgument, match="longer than 63"):
        await alloc.allocate(["app=" + "x" * 64], "n")
    with pytest.raises(InvalidArgument, match="at least one label"):
        await alloc.allocate([], "n")
    with pytest.raises(InvalidArgument, match="owner"):
        await alloc.allocate(["app=x"], "")
    with pytest.raises(NotFound):
        await alloc.release(999, "n")
    assert await client.hlen("membrane:identity:ids") == 0  # nothing was half-written


async def test_reserved_identities_have_ciliums_numbers(client: aioredis.Redis) -> None:
    alloc = allocator(client)
    assert (await alloc.allocate(["reserved:host"], "n")).id == 1
    assert (await alloc.allocate(["reserved:world"], "n")).id == 2
    assert (await alloc.allocate(["reserved:health"], "n")).id == 4
    assert (await alloc.allocate(["reserved:remote-node"], "n")).id == 6
    with pytest.raises(InvalidArgument, match="stands alone"):
        await alloc.allocate(["reserved:host", "app=x"], "n")
    with pytest.raises(InvalidArgument, match="unknown reserved"):
        await alloc.allocate(["reserved:bogus"], "n")


async def test_redis_down_is_unavailable_within_bounded_time(
    client: aioredis.Redis, redis_server: ServerProcess
) -> None:
    alloc = allocator(client)
    first = await alloc.allocate(["app=web"], "n")
    redis_server.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable, match="redis is unavailable"):
        await alloc.allocate(["app=web"], "n")
    assert loop.time() - started < 3.0
    redis_server.start()
    again = await alloc.allocate(["app=web"], "n")  # same client: it reconnects by itself
    assert again.id == first.id


async def test_pod_cidrs_are_idempotent_and_reused(client: aioredis.Redis) -> None:
    pool = PodCIDRAllocator(client, "10.244.0.0/22", 24)
    n1 = await pool.allocate("node-1")
    assert str(n1) == "10.244.0.0/24"
    assert await pool.allocate("node-1") == n1
    assert str(await pool.allocate("node-2")) == "10.244.1.0/24"
    await pool.allocate("node-3")
    await pool.allocate("node-4")
    with pytest.raises(ResourceExhausted):
        await pool.allocate("node-5")
    assert await pool.release("node-2") == n1.__class__("10.244.1.0/24")
    assert str(await pool.allocate("node-5")) == "10.244.1.0/24"
    with pytest.raises(NotFound):
        await pool.release("node-2")
    assert sorted(await pool.list()) == ["node-1", "node-3", "node-4", "node-5"]
    changed = PodCIDRAllocator(client, "10.250.0.0/16", 24)
    with pytest.raises(InvalidArgument, match="cluster pool changed"):
        await changed.allocate("node-9")


async def test_a_retried_request_is_answered_not_repeated(client: aioredis.Redis) -> None:
    alloc = allocator(client, grace_seconds=60)
    first = await alloc.allocate(["app=web"], "node-1", request_id="req-1")
    again = await alloc.allocate(["app=web"], "node-1", request_id="req-1")
    assert (again.id, again.new) == (first.id, True)  # the first answer, new included
    assert await alloc.references(first.id) == 1
    await alloc.allocate(["app=web"], "node-1")  # no request id: a request of its own
    assert await alloc.references(first.id) == 2
    assert await alloc.release(first.id, "node-1", request_id="rel-1") == 1
    assert await alloc.release(first.id, "node-1", request_id="rel-1") == 1
    assert await alloc.references(first.id) == 1


async def test_an_owner_cannot_mix_leased_and_lease_less_references(
    client: aioredis.Redis,
) -> None:
    alloc = allocator(client)
    await alloc.allocate(["app=web"], "node-1", lease_seconds=30)
    with pytest.raises(InvalidArgument, match="cannot mix") as err:
        await alloc.allocate(["app=db"], "node-1")
    assert err.value.field == "lease_seconds"
    await alloc.allocate(["app=db"], "cli")
    with pytest.raises(InvalidArgument, match="cannot mix"):
        await alloc.allocate(["app=db"], "cli", lease_seconds=30)


async def test_heartbeat_tells_an_owner_that_lost_its_references(
    client: aioredis.Redis,
) -> None:
    alloc = allocator(client, grace_seconds=60)
    with pytest.raises(NotFound, match="allocate again"):
        await alloc.renew_lease("node-new", 10)
    await alloc.allocate(["app=web"], "node-1", lease_seconds=0.2)
    expires = await alloc.renew_lease("node-1", 0.2)
    assert expires == await client.zscore("membrane:identity:leases", "node-1")
    await asyncio.sleep(0.3)
    assert (await alloc.collect_garbage()).expired_owners == ["node-1"]
    with pytest.raises(NotFound):
        await alloc.renew_lease("node-1", 10)  # lapsed: not silently re-created
    await alloc.allocate(["app=web"], "cli")
    with pytest.raises(InvalidArgument, match="without a lease"):
        await alloc.renew_lease("cli", 10)


async def test_the_pool_may_change_once_no_node_holds_a_cidr(client: aioredis.Redis) -> None:
    old = PodCIDRAllocator(client, "10.244.0.0/16", 24)
    for node in ("a", "b", "c"):
        await old.allocate(node)
    for node in ("a", "b", "c"):
        await old.release(node)
    new = PodCIDRAllocator(client, "10.245.0.0/23", 24)
    assert str(await new.allocate("a")) == "10.245.0.0/24"
    assert str(await new.allocate("b")) == "10.245.1.0/24"
    with pytest.raises(ResourceExhausted):
        await new.allocate("c")
