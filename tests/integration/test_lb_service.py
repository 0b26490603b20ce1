"""The lb service against real NATS and Redis: apply, selectors following pods, conflicts,
API mode, and a bulk apply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from membrane.servers import ServerProcess
from services.lb import ids
from services.lb.service import LBCore, LBSettings
from shared import apply, subjects
from shared.bus import Bus
from shared.errors import AlreadyExists, InvalidArgument
from shared.messages import (
    ContainerPort,
    Empty,
    Endpoint,
    LBCreateRequest,
    LBListReply,
    LBService,
    LBServiceRef,
)
from shared.redis_store import make_redis
from shared.runtime import TaskGroup
from tests.conftest import eventually


async def start_replica(bus: Bus, redis_url: str, name: str) -> tuple[LBCore, TaskGroup]:
    """An lb replica as run() starts one: watches synced, reconciling, serving requests."""
    settings = LBSettings(service_cidr="10.96.0.0/16", redis_url=redis_url)
    allocator = ids.Allocator(make_redis(redis_url))
    core = LBCore(
        bus,
        await bus.kv(subjects.KV_LB_SPECS),
        await bus.kv(subjects.KV_SERVICES),
        allocator,
        settings,
        await allocator.maglev_seed(),
    )
    tasks = await core.start(await bus.kv(subjects.KV_ENDPOINTS))
    await core.register({"replica": name}, 8)
    return core, tasks


@pytest.fixture
async def lb(bus: Bus, redis_server: ServerProcess) -> AsyncIterator[LBCore]:
    core, tasks = await start_replica(bus, redis_server.url, "test")
    yield core
    await tasks.close()


def service(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


async def record(bus: Bus, name: str) -> LBService:
    return await bus.request(subjects.LB_GET, LBServiceRef(name=name), LBService)


async def test_selector_backends_follow_pods_with_named_ports(lb: LBCore, bus: Bus) -> None:
    doc = service(
        "web",
        selector={"app": "web"},
        sessionAffinity="ClientIP",
        ports=[{"name": "http", "port": 80, "targetPort": "http"}],
    )
    await apply.apply_services(bus, [doc], "t", dry_run=False)
    first = await record(bus, "web")
    assert first.frontends[0].backends == [] and first.affinity_timeout == 10800
    vip = first.frontends[0].ip
    assert vip.startswith("10.96.")
    endpoints = await bus.kv(subjects.KV_ENDPOINTS)
    for i, port in enumerate((8080, 8081)):
        pod = Endpoint(
            namespace="default",
            name=f"web-{i}",
            node="n1",
            ip=f"10.244.0.{i + 5}",
            identity=300,
            labels={"app": "web"},
            ports=[ContainerPort(port=port, name="http")],
        )
        await endpoints.put(
            subjects.endpoint_key("n1", "default", f"web-{i}"), msgspec.json.encode(pod)
        )

    async def two() -> None:
        got = await record(bus, "web")
        assert [(b.ip, b.port) for b in got.frontends[0].backends] == [
            ("10.244.0.5", 8080),
            ("10.244.0.6", 8081),
        ]

    await eventually(two, timeout=5, what="both pods as backends, on their named ports")
    await endpoints.delete(subjects.endpoint_key("n1", "default", "web-0"))

    async def one() -> None:
        assert len((await record(bus, "web")).frontends[0].backends) == 1

    await eventually(one, timeout=5, what="the deleted pod gone from the backends")
    again = await record(bus, "web")
    assert again.frontends[0].ip == vip and again.revision > first.revision
    # re-applying keeps the allocated address
    await apply.apply_services(bus, [doc], "t", dry_run=False)
    assert (await record(bus, "web")).frontends[0].ip == vip


async def test_conflicts_and_bad_documents_change_nothing(lb: LBCore, bus: Bus) -> None:
    await apply.apply_services(
        bus, [service("a", clusterIP="10.96.0.50", ports=[{"port": 80}])], "t", dry_run=False
    )
    before = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    with pytest.raises(AlreadyExists) as caught:
        await apply.apply_services(
            bus,
            [
                service("b", ports=[{"port": 80}]),
                service("c", clusterIP="10.96.0.50", ports=[{"port": 81}]),
            ],
            "t",
            dry_run=False,
        )
    assert "already allocated to default.a" in str(caught.value)
    with pytest.raises(InvalidArgument) as bad:
        await apply.apply_services(
            bus, [service("d", ports=[{"port": 80}]), service("e")], "f.yaml", dry_run=False
        )
    assert bad.value.field == "spec.ports" and "f.yaml: document 2" in str(bad.value)
    after = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    assert after == before
    with pytest.raises(AlreadyExists):
        await bus.request(
            subjects.LB_CREATE,
            LBCreateRequest(name="clash", frontends=["10.96.0.50:80/TCP"]),
            LBService,
        )


async def test_bulk_apply_is_one_request_per_chunk(lb: LBCore, bus: Bus) -> None:
    docs = []
    for i in range(2000):
        docs.append(service(f"s{i}", ports=[{"name": "http", "port": 80}]))
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"s{i}-1", "labels": {"kubernetes.io/service-name": f"s{i}"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [f"10.250.{i // 200}.{i % 200}"]}],
            }
        )
    started = time.perf_counter()
    reply = await apply.apply_services(bus, docs, "bulk", dry_run=False)
    elapsed = time.perf_counter() - started
    assert len(reply.results) == 4000
    listed = await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=30)
    assert sum(len(s.frontends[0].backends) for s in listed.services) == 2000
    assert elapsed < 20, elapsed  # generous: a shared, noisy machine
    await asyncio.sleep(0)


async def test_two_replicas_share_requests_and_lose_no_spec(
    nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    """Requests spread over two replicas on the queue group, concurrently: every spec lands in
    the shards (their compare-and-set writes race), both replicas end up knowing every service,
    and a replica started afterwards reads them all back."""
    buses = [await Bus.connect(nats_server.url, f"replica-{i}", retry_for=5) for i in range(3)]
    client = await Bus.connect(nats_server.url, "client", retry_for=5)
    started: list[TaskGroup] = []
    try:
        a, tasks_a = await start_replica(buses[0], redis_server.url, "a")
        b, tasks_b = await start_replica(buses[1], redis_server.url, "b")
        started += [tasks_a, tasks_b]
        names = [f"svc{i}" for i in range(60)]
        await asyncio.gather(
            *(
                apply.apply_services(client, [service(n, ports=[{"port": 80}])], "t", dry_run=False)
                for n in names
            )
        )

        async def both_know_all() -> None:
            for core in (a, b):
                assert {k.split(".", 1)[1] for k in core.specs} >= set(names)
                assert {k.split(".", 1)[1] for k in core.records} >= set(names)

        await eventually(both_know_all, timeout=10, what="both replicas know every service")
        # the queue group gave each replica some of the requests: both wrote shards
        assert a.store.own and b.store.own
        ips = {a.records[f"default.{n}"].frontends[0].ip for n in names}
        assert len(ips) == len(names)  # one cluster IP each, whichever replica allocated it
        assert all(
            a.records[f"default.{n}"].frontends[0].ip == b.records[f"default.{n}"].frontends[0].ip
            for n in names
        )
        c, tasks_c = await start_replica(buses[2], redis_server.url, "c")
        started.append(tasks_c)
        assert {k.split(".", 1)[1] for k in c.specs} >= set(names)  # read back from the shards
        listed = await client.request(subjects.LB_LIST, Empty(), LBListReply, timeout=10)
        assert {s.name for s in listed.services} >= set(names)
    finally:
        for tasks in started:
            await tasks.close()
        for each in [*buses, client]:
            await each.close()
