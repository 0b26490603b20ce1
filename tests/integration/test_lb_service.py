"""The lb service against real NATS and Redis: apply, selectors following pods, conflicts,
API mode, and a bulk apply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from membrane import cli_lb
from membrane.servers import ServerProcess
from services.lb import ids
from services.lb.service import LBCore, LBSettings
from shared import subjects
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


@pytest.fixture
async def lb(bus: Bus, redis_server: ServerProcess) -> AsyncIterator[LBCore]:
    settings = LBSettings(service_cidr="10.96.0.0/16", redis_url=redis_server.url)
    allocator = ids.Allocator(make_redis(redis_server.url))
    core = LBCore(
        bus,
        await bus.kv(subjects.KV_LB_SPECS),
        await bus.kv(subjects.KV_SERVICES),
        allocator,
        settings,
        await allocator.maglev_seed(),
    )
    endpoints = await bus.kv(subjects.KV_ENDPOINTS)
    tasks = TaskGroup()
    tasks.spawn("specs", lambda: core.follow("specs", core.specs_kv, core.on_spec))
    tasks.spawn("endpoints", lambda: core.follow("endpoints", endpoints, core.on_endpoint))
    tasks.spawn("services", lambda: core.follow("services", core.services_kv, core.on_record))
    for event in core.synced.values():
        await event.wait()
    tasks.spawn("reconcile", core.reconcile_forever)
    await core.register({"replica": "test"}, 8)
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
    await cli_lb.apply_documents(bus, [doc], "t", dry_run=False)
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
        await endpoints.put(f"default.web-{i}", msgspec.json.encode(pod))

    async def two() -> None:
        got = await record(bus, "web")
        assert [(b.ip, b.port) for b in got.frontends[0].backends] == [
            ("10.244.0.5", 8080),
            ("10.244.0.6", 8081),
        ]

    await eventually(two, timeout=5, what="both pods as backends, on their named ports")
    await endpoints.delete("default.web-0")

    async def one() -> None:
        assert len((await record(bus, "web")).frontends[0].backends) == 1

    await eventually(one, timeout=5, what="the deleted pod gone from the backends")
    again = await record(bus, "web")
    assert again.frontends[0].ip == vip and again.revision > first.revision
    # re-applying keeps the allocated address
    await cli_lb.apply_documents(bus, [doc], "t", dry_run=False)
    assert (await record(bus, "web")).frontends[0].ip == vip


async def test_conflicts_and_bad_documents_change_nothing(lb: LBCore, bus: Bus) -> None:
    await cli_lb.apply_documents(
        bus, [service("a", clusterIP="10.96.0.50", ports=[{"port": 80}])], "t", dry_run=False
    )
    before = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    with pytest.raises(AlreadyExists) as caught:
        await cli_lb.apply_documents(
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
        await cli_lb.apply_documents(
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
    reply = await cli_lb.apply_documents(bus, docs, "bulk", dry_run=False)
    elapsed = time.perf_counter() - started
    assert len(reply.results) == 4000
    listed = await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=30)
    assert sum(len(s.frontends[0].backends) for s in listed.services) == 2000
    assert elapsed < 20, elapsed  # generous: a shared, noisy machine
    await asyncio.sleep(0)
