"""The lb service against real NATS and Redis: apply, selectors following pods, conflicts,
API mode, and a bulk apply."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import yaml

from membrane.servers import ServerProcess
from services.lb import ids
from services.lb import service as service_module
from services.lb.service import LBCore, LBSettings
from shared import apply, services_bucket, subjects
from shared.bus import Bus, flush_connection
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.messages import (
    ContainerPort,
    Empty,
    Endpoint,
    LBApplyReply,
    LBApplyRequest,
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
        # the services bucket holds every record (the replicas' shard writes race too)
        view = services_bucket.ServicesView()
        for bucket_key, value in (
            await Bus.snapshot(await client.kv(subjects.KV_SERVICES))
        ).items():
            view.update(bucket_key, value)
        for n in names:
            stored = view.get(f"default.{n}")
            assert stored is not None
            assert msgspec.json.decode(stored, type=LBService) == a.records[f"default.{n}"]
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


def bulk_documents(names: list[str], octet: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        docs.append(service(name, ports=[{"name": "http", "port": 80}]))
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [f"10.250.{octet}.{i + 1}"]}],
            }
        )
    return docs


async def watch_applies(bus: Bus) -> list[LBApplyRequest]:
    """The requests on ``membrane.lb.apply`` from now on, as they went by."""
    seen: list[LBApplyRequest] = []

    async def on(msg: Any) -> None:
        seen.append(msgspec.json.decode(msg.data, type=LBApplyRequest))

    await bus.nc.subscribe(subjects.LB_APPLY, cb=on)
    await flush_connection(bus.nc)
    return seen


async def test_parts_checked_ahead_are_applied_together_or_not_at_all(lb: LBCore, bus: Bus) -> None:
    """A large file's Services and EndpointSlices go in parts, each checked (a dry run) while
    the next is read, then applied in one request: an invalid document or a name given twice
    in a later part changes nothing, and its error names it by its number in the whole apply."""
    before = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    first, second = bulk_documents(["a0", "a1"], 1), bulk_documents(["a2", "a3"], 2)
    bad = [*second[:3], service("broken", ports=[{"port": 0}])]
    sent = apply.ServiceParts(bus, "big.yaml")
    sent.send(first)
    sent.send(bad)
    with pytest.raises(InvalidArgument) as caught:
        await sent.apply()
    assert caught.value.field == "spec.ports[0].port"
    assert "big.yaml: document 8 (Service broken)" in str(caught.value)  # 4 + 4th of the 2nd
    sent = apply.ServiceParts(bus, "big.yaml")
    sent.send(first)
    sent.send([*second, first[0]])  # each part valid alone; a0 twice in the whole
    with pytest.raises(InvalidArgument) as twice:
        await sent.apply()
    assert twice.value.field == "metadata.name"
    assert "big.yaml: document 9 (Service a0)" in str(twice.value), twice.value
    assert await bus.request(subjects.LB_LIST, Empty(), LBListReply) == before

    applying = await watch_applies(bus)
    sent = apply.ServiceParts(bus, "big.yaml")
    sent.send(first)
    sent.send(second)
    for check in sent.checks:
        await check
    assert len(lb.checked) == 2  # the replica kept both parses for the apply
    reply = await sent.apply()
    assert len(reply.results) == 8 and not lb.checked
    # the request that applied them named the parts by their digests, without their bytes
    assert [(r.part_digests, r.parts) for r in applying if not r.dry_run] == [(sent.digests, [])]
    listed = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    got = {s.name: [b.ip for b in s.frontends[0].backends] for s in listed.services}
    assert {k: got[k] for k in ("a0", "a1", "a2", "a3")} == {
        "a0": ["10.250.1.1"],
        "a1": ["10.250.1.2"],
        "a2": ["10.250.2.1"],
        "a3": ["10.250.2.2"],
    }
    # a part this replica did not check (another replica did, or it expired): the request
    # naming it by its digest changes nothing, and the bytes sent next are parsed again
    sent = apply.ServiceParts(bus, "big.yaml")
    sent.send(bulk_documents(["a4"], 3))
    sent.send(bulk_documents(["a7"], 6))
    for check in sent.checks:
        await check
    _, (_, size, _, _) = lb.checked.popitem()  # the second part's parse is gone
    lb.checked_bytes -= size
    listed = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    named = LBApplyRequest(documents=[], part_digests=sent.digests, source="big.yaml")
    with pytest.raises(NotFound) as unknown:
        await bus.request(subjects.LB_APPLY, named, LBApplyReply)
    assert unknown.value.field == "part_digests" and "1 of the 2 parts" in str(unknown.value)
    assert await bus.request(subjects.LB_LIST, Empty(), LBListReply) == listed
    assert len(lb.checked) == 1  # the first part's parse is still kept
    applying.clear()
    assert (await sent.apply()).results == [
        "service/a4 created",
        "endpointslice/a4-1 created",
        "service/a7 created",
        "endpointslice/a7-1 created",
    ]
    assert [(r.part_digests, len(r.parts)) for r in applying] == [(sent.digests, 0), ([], 2)]
    assert not lb.checked  # the first part's kept parse was taken by the bytes' request
    # a part whose apply never came is forgotten after a while, at the next request
    sent = apply.ServiceParts(bus, "big.yaml")
    sent.send(bulk_documents(["a5"], 5))
    for check in sent.checks:
        await check
    ((digest, (when, size, items, idents)),) = lb.checked.items()
    lb.checked[digest] = (when - service_module.CHECKED_SECONDS - 1, size, items, idents)
    await apply.apply_services(bus, [service("a6", ports=[{"port": 80}])], "t", dry_run=True)
    assert not lb.checked and lb.checked_bytes == 0


async def test_a_large_file_is_sent_while_read_and_changes_nothing_when_it_is_invalid(
    lb: LBCore, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shared.apply.read_sending_services (membrane apply -f of a large file), in pieces of a
    few documents: the lb service checks each piece's documents while the next is read; a
    document only the lb service finds invalid (or one the reading finds invalid) in the last
    piece changes nothing, with the error the whole file would give."""
    monkeypatch.setattr(apply, "PIECE_CHARS", 600)
    docs = bulk_documents([f"f{i}" for i in range(12)], 4)
    good = yaml.safe_dump_all(docs)
    before = await bus.request(subjects.LB_LIST, Empty(), LBListReply)
    for bad, field in (
        (service("late", ports=[{"port": 80, "protocol": "ICMP"}]), "spec.ports[0].protocol"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "bogus": 1}, "bogus"),
    ):
        text = good + "---\n" + yaml.safe_dump(bad)
        with pytest.raises(InvalidArgument) as caught:
            read, sent = await apply.read_sending_services(bus, text, "big.yaml")
            await apply.apply_documents(bus, read, "big.yaml", services_sent=sent)
        assert caught.value.field == field and "document 25" in str(caught.value), caught.value
        assert await bus.request(subjects.LB_LIST, Empty(), LBListReply) == before
    read, sent = await apply.read_sending_services(bus, good, "big.yaml")
    assert sent is not None and len(sent.parts) > 3  # it was sent in pieces
    lines = await apply.apply_documents(bus, read, "big.yaml", services_sent=sent)
    assert sorted(lines) == sorted(
        [f"service/f{i} created" for i in range(12)]
        + [f"endpointslice/f{i}-1 created" for i in range(12)]
    )
    listed = {s.name for s in (await bus.request(subjects.LB_LIST, Empty(), LBListReply)).services}
    assert {f"f{i}" for i in range(12)} <= listed


async def test_a_single_change_rewrites_one_small_shard(lb: LBCore, bus: Bus) -> None:
    """The services bucket in shards: a bulk of 2,000 is written a shard at a time, and one
    service changed afterwards is one message, its shard of a few services, not the bulk."""
    seen: list[tuple[str, bytes]] = []

    async def on(msg: Any) -> None:
        seen.append((msg.subject, msg.data))

    sub = await bus.nc.subscribe("$KV.services.>", cb=on)
    await bus.flush()
    names = [f"s{i}" for i in range(2000)]
    docs = [
        d for j in range(0, 2000, 200) for d in bulk_documents(names[j : j + 200], 10 + j // 200)
    ]
    await apply.apply_services(bus, docs, "bulk", dry_run=False)
    await bus.flush()
    bulk_messages = len(seen)
    assert bulk_messages <= services_bucket.SHARDS
    view = services_bucket.ServicesView()
    for subject, data in seen:
        view.update(subject.removeprefix("$KV.services."), data)
    assert set(view.keys()) == {f"default.{n}" for n in names}
    seen.clear()
    changed = bulk_documents(["s42"], 10)
    changed[1]["ports"][0]["port"] = 9090
    await apply.apply_services(bus, changed, "one", dry_run=False)
    await bus.flush()
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert len(seen) == 1, [s for s, _ in seen]
    subject, data = seen[0]
    assert (
        subject
        == f"$KV.services.{services_bucket.shard_key(services_bucket.shard_of('default.s42'))}"
    )
    assert len(services_bucket.decode_shard(data)) < 20  # about 2 of 2,000
    changes = view.update(subject.removeprefix("$KV.services."), data)
    assert [k for k, _ in changes] == ["default.s42"]
    ((_, value),) = changes
    assert value is not None
    assert msgspec.json.decode(value, type=LBService).frontends[0].backends[0].port == 9090


async def test_a_bucket_of_an_earlier_version_is_moved_into_shards(
    bus: Bus, redis_server: ServerProcess
) -> None:
    """Format 1 (one key per service) read on start: the records go into their shards and
    the old keys are deleted; a reader of both formats sees no change on the way."""
    core, tasks = await start_replica(bus, redis_server.url, "first")
    try:
        await apply.apply_services(bus, bulk_documents(["a", "b"], 8), "t", dry_run=False)
        records = {k: core.records[k] for k in ("default.a", "default.b")}
    finally:
        await tasks.close()
    kv = await bus.kv(subjects.KV_SERVICES)
    for key, record in records.items():  # as an earlier version left the bucket
        await kv.put(key, msgspec.json.encode(record))
        await kv.delete(services_bucket.shard_key(services_bucket.shard_of(key)))
    reader = services_bucket.ServicesView()
    changes: list[tuple[str, bytes | None]] = []
    for key, value in (await Bus.snapshot(kv)).items():
        changes += reader.update(key, value)
    assert {k for k, _ in changes} == set(records)
    core, tasks = await start_replica(bus, redis_server.url, "upgraded")
    try:

        async def moved() -> None:
            now = await Bus.snapshot(kv)
            assert not set(records) & set(now)
            assert {k for k in now if services_bucket.shard_number(k) is not None}

        await eventually(moved, timeout=10, what="the old keys replaced by shards")
        later: list[tuple[str, bytes | None]] = []
        async with contextlib.aclosing(Bus.watch(kv)) as events:
            async for event in events:
                if event is None:
                    break
        for key, value in (await Bus.snapshot(kv)).items():
            later += reader.update(key, value)
        for key in records:
            later += reader.update(key, None)
        assert later == []  # the same records, now from the shards
        assert {k: core.records[k] for k in records} == records
    finally:
        await tasks.close()
