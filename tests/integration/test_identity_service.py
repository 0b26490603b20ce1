"""The identity service as separate processes on real NATS and Redis, reached over the bus."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Callable, Iterator

import msgspec
import nats.js.errors
import pytest

from membrane.servers import ServerProcess, terminate
from membrane.supervisor import die_with_parent
from shared import subjects
from shared.bus import Bus
from shared.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    Empty,
    GetRequest,
    Identity,
    ListReply,
    PodCIDR,
    PodCIDRList,
    PodCIDRRequest,
    ReleaseReply,
    ReleaseRequest,
)
from tests.conftest import eventually, membrane_command, scrape, service_env

Starter = Callable[..., list[subprocess.Popen[bytes]]]


@pytest.fixture
def identity_services(nats_server: ServerProcess, redis_server: ServerProcess) -> Iterator[Starter]:
    """Start ``count`` identity service processes; all are stopped at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(count: int = 1, **settings: str) -> list[subprocess.Popen[bytes]]:
        procs = []
        for index in range(count):
            env = service_env(nats_server, redis_server, replica=f"identity-{index}", **settings)
            procs.append(
                subprocess.Popen(
                    membrane_command("run", "identity"), env=env, preexec_fn=die_with_parent
                )
            )
        started.extend(procs)
        return procs

    yield start
    terminate(started)


async def wait_for_replicas(bus: Bus, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await bus.discover(subjects.IDENTITY_SERVICE, timeout=0.2)) < count:
        assert time.monotonic() < deadline, f"{count} identity replicas did not come up"


async def allocate(bus: Bus, *labels: str, owner: str = "test") -> AllocateReply:
    return await bus.request(
        subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=list(labels), owner=owner), AllocateReply
    )


async def test_uniqueness_under_concurrency(
    bus: Bus, nats_server: ServerProcess, identity_services: Starter
) -> None:
    """3 replicas, 16 clients, the same 2,000 label sets in random orders: 2,000 ids, agreed."""
    identity_services(3)
    await wait_for_replicas(bus, 3)
    label_sets = [
        [f"app=app-{i}", f"team=t{i % 13}", "io.kubernetes.pod.namespace=ns"] for i in range(2000)
    ]

    async def client(index: int) -> dict[str, int]:
        own = await Bus.connect(nats_server.url, f"client-{index}", retry_for=5)
        try:
            order = label_sets[:]
            random.Random(index).shuffle(order)
            seen: dict[str, int] = {}
            slots = asyncio.Semaphore(16)

            async def one(labels: list[str]) -> None:
                async with slots:
                    reply = await allocate(own, *labels, owner=f"client-{index}")
                seen[",".join(reply.identity.labels)] = reply.identity.id

            await asyncio.gather(*(one(labels) for labels in order))
            return seen
        finally:
            await own.close()

    results = await asyncio.gather(*(client(i) for i in range(16)))
    assert len(results[0]) == 2000
    assert all(result == results[0] for result in results), "clients disagree on an id"
    assert len(set(results[0].values())) == 2000, "two label sets share an id"
    listed = await bus.request(subjects.IDENTITY_LIST, Empty(), ListReply)
    assert len([i for i in listed.identities if i.kind == "cluster"]) == 2000
    # all three replicas took part
    infos = await bus.discover(subjects.IDENTITY_SERVICE)
    stats = [
        await bus.nc.request(f"$SRV.STATS.{subjects.IDENTITY_SERVICE}.{i.id}", b"") for i in infos
    ]
    served = [
        sum(e["num_requests"] for e in msgspec.json.decode(s.data)["endpoints"]) for s in stats
    ]
    assert all(n > 0 for n in served), served


async def test_ids_survive_a_restart_of_redis_and_services(
    bus: Bus, redis_server: ServerProcess, identity_services: Starter
) -> None:
    procs = identity_services(2)
    await wait_for_replicas(bus, 2)
    before = {i: (await allocate(bus, f"app=a{i}")).identity.id for i in range(50)}
    terminate(procs)
    redis_server.stop()
    redis_server.start()
    identity_services(2)
    await wait_for_replicas(bus, 2)
    after = {i: (await allocate(bus, f"app=a{i}")).identity.id for i in range(50)}
    assert after == before
    assert not (await allocate(bus, "app=a7")).new


async def test_identities_appear_in_kv_and_gc_removes_them(
    bus: Bus, identity_services: Starter
) -> None:
    identity_services(1, grace_period="0.5", gc_interval="0.2")
    await wait_for_replicas(bus, 1)
    kv = await bus.kv(subjects.KV_IDENTITIES)
    reply = await allocate(bus, "app=web", owner="node-1")
    entry = await kv.get(str(reply.identity.id))
    assert msgspec.json.decode(entry.value, type=Identity).labels == ["k8s:app=web"]
    released = await bus.request(
        subjects.IDENTITY_RELEASE,
        ReleaseRequest(id=reply.identity.id, owner="node-1"),
        ReleaseReply,
    )
    assert released.references == 0

    async def collected() -> None:
        try:
            await bus.request(subjects.IDENTITY_GET, GetRequest(id=reply.identity.id), Identity)
        except NotFound:
            return
        raise AssertionError("the identity still exists")

    await eventually(collected, timeout=5, what="the identity garbage-collected")
    with pytest.raises(nats.js.errors.KeyNotFoundError):  # deleted, or never there
        await kv.get(str(reply.identity.id))


async def test_reconcile_restores_a_lost_kv_entry(bus: Bus, identity_services: Starter) -> None:
    procs = identity_services(1)
    await wait_for_replicas(bus, 1)
    reply = await allocate(bus, "app=web")
    kv = await bus.kv(subjects.KV_IDENTITIES)
    await kv.purge(str(reply.identity.id))  # as if a replica died between Redis and KV
    terminate(procs)
    identity_services(1)
    entry = await eventually(
        lambda: kv.get(str(reply.identity.id)),
        timeout=10,
        what="the KV entry restored",
        retry_on=(nats.js.errors.KeyNotFoundError,),  # purged, until the reconcile ran
    )
    assert msgspec.json.decode(entry.value, type=Identity).id == reply.identity.id


async def test_redis_outage_gives_unavailable_then_recovers(
    bus: Bus, redis_server: ServerProcess, identity_services: Starter
) -> None:
    procs = identity_services(1)
    await wait_for_replicas(bus, 1)
    first = await allocate(bus, "app=web")
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable, match="redis is unavailable"):
        await allocate(bus, "app=web")
    assert time.monotonic() - started < 4.0
    assert procs[0].poll() is None, "the service must stay up while Redis is down"
    redis_server.start()
    again = await eventually(
        lambda: allocate(bus, "app=web"),
        timeout=10,
        what="recovery after Redis came back",
        retry_on=(Unavailable,),
    )
    assert again.identity.id == first.identity.id


async def test_bad_input_errors_and_metrics(bus: Bus, identity_services: Starter) -> None:
    procs = identity_services(1, identity_min="256", identity_max="257", gc_interval="0.1")
    await wait_for_replicas(bus, 1)
    with pytest.raises(InvalidArgument) as err:
        await allocate(bus, "app=web", "Bad Key=1")
    assert err.value.field == "labels['Bad Key=1']"
    with pytest.raises(InvalidArgument, match="longer than 63"):
        await allocate(bus, "app=" + "v" * 70)
    # a payload that is not an AllocateRequest at all: error reply naming the field
    msg = await bus.nc.request(subjects.IDENTITY_ALLOCATE, b'{"labels": "app=web"}', timeout=2)
    assert msg.headers and msg.headers["Nats-Service-Error-Code"] == "400"
    body = msgspec.json.decode(msg.data)
    assert body["code"] == "invalid_argument" and body["field"] == "labels"
    msg = await bus.nc.request(subjects.IDENTITY_ALLOCATE, b"\xff not json", timeout=2)
    assert msgspec.json.decode(msg.data)["code"] == "invalid_argument"
    await allocate(bus, "app=a")
    await allocate(bus, "app=b")
    with pytest.raises(ResourceExhausted):
        await allocate(bus, "app=c")
    assert procs[0].poll() is None
    # the metrics endpoint counts what happened
    (info,) = await bus.discover(subjects.IDENTITY_SERVICE)
    await asyncio.sleep(0.3)  # one GC pass refreshes the identity gauge
    found = await scrape(info.metadata["metrics"])
    assert found["membrane_bus_malformed_messages_total", ("allocate", "membrane-identity")] == 2
    assert found["membrane_identity_errors_total", ("resource_exhausted",)] == 1
    assert found["membrane_identity_errors_total", ("invalid_argument",)] == 2
    assert found["membrane_identities", ("cluster",)] == 2
    assert found["membrane_identity_allocate_duration_seconds_count", ("true",)] == 2


async def test_pod_cidrs_over_the_bus(bus: Bus, identity_services: Starter) -> None:
    identity_services(2, cluster_cidr="10.244.0.0/16", node_mask_size="24")
    await wait_for_replicas(bus, 2)
    replies = await asyncio.gather(
        *(
            bus.request(
                subjects.ipam_allocate(f"node-{i % 3}"),
                PodCIDRRequest(node=f"node-{i % 3}"),
                PodCIDR,
            )
            for i in range(30)
        )
    )
    by_node = {r.node: r.cidr for r in replies}
    assert len(by_node) == 3 and len(set(by_node.values())) == 3
    assert all(by_node[r.node] == r.cidr for r in replies)
    listed = await bus.request(subjects.IPAM_LIST, Empty(), PodCIDRList)
    assert {a.node: a.cidr for a in listed.allocations} == by_node


async def test_nats_outage_and_late_start_recover_by_themselves(
    nats_server: ServerProcess, identity_services: Starter
) -> None:
    nats_server.stop()
    procs = identity_services(1)  # starts while NATS is down: it must wait and retry
    await asyncio.sleep(1.5)
    assert procs[0].poll() is None
    nats_server.start()
    bus = await Bus.connect(nats_server.url, "test", retry_for=5)
    try:
        await wait_for_replicas(bus, 1)
        first = await allocate(bus, "app=web")
        nats_server.stop()  # an outage while serving
        await asyncio.sleep(1.0)
        nats_server.start()
        again = await eventually(
            lambda: allocate(bus, "app=web"),
            timeout=15,
            what="recovery after NATS came back",
            retry_on=(Unavailable, DeadlineExceeded),
        )
        assert again.identity.id == first.identity.id
        assert procs[0].poll() is None
    finally:
        await bus.close()
