"""The monitor service against a real nats-server: batches in, enriched flows out.

KV buckets are filled the way the identity, datapath and policy services fill them; flow
batches are published the way the flow publisher does; queries go through the CLI's client.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address

import msgspec
import pytest

from membrane.client import flows as flow_client
from membrane.servers import ServerProcess
from services.monitor.service import MonitorSettings, Running, start
from shared import l7_wire, subjects
from shared.bus import Bus
from shared.flow_api import (
    FLOW_BATCH_MAX_BYTES,
    EnrichedFlow,
    FlowFilterTerm,
    FlowQuery,
    FlowQueryReply,
    MonitorStatus,
    decode_flow_batch,
)
from shared.l7_wire import L7Batch, L7Record
from shared.messages import (
    Empty,
    Endpoint,
    Flow,
    FlowBatch,
    Identity,
    IPCacheEntry,
    L7Info,
    LBFrontend,
    LBService,
    PolicyEntry,
    ResolvedPolicy,
)
from tests.conftest import eventually, scrape

RULE = 0xABCDEF


async def fill_buckets(bus: Bus) -> None:
    ids = await bus.kv(subjects.KV_IDENTITIES)
    for number, app in ((1001, "xwing"), (1002, "deathstar")):
        labels = [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=empire"]
        await ids.put(
            str(number), msgspec.json.encode(Identity(id=number, labels=labels, kind="cluster"))
        )
    endpoints = await bus.kv(subjects.KV_ENDPOINTS)
    for name, ip, ident, node in (
        ("xwing", "10.9.1.5", 1001, "n1"),
        ("deathstar-1", "10.9.2.7", 1002, "n2"),
    ):
        ep = Endpoint(namespace="empire", name=name, node=node, ip=ip, identity=ident, labels={})
        await endpoints.put(subjects.endpoint_key(node, "empire", name), msgspec.json.encode(ep))
    ipcache = await bus.kv(subjects.KV_IPCACHE)
    await ipcache.put(
        subjects.ipcache_key(IPv4Address("10.9.3.1"), "n3"),
        msgspec.json.encode(IPCacheEntry(cidr="10.9.3.1/32", identity=6, node="n3")),
    )
    resolved = await bus.kv(subjects.KV_RESOLVED)
    policy = ResolvedPolicy(
        identity=1002,
        revision=1,
        ingress_enforced=True,
        ingress=[PolicyEntry(peer=1001, protocol=6, port=80, rule_id=RULE)],
        rules={RULE: "empire/deathstar-policy[0]"},
    )
    await resolved.put("1002", msgspec.json.encode(policy))


def flow(verdict: str, *, dport: int = 80, rule: int = 0, t: float | None = None) -> Flow:
    dropped = verdict == "DROPPED"
    return Flow(
        time=t or time.time(),
        node="n2",
        type="drop" if dropped else "policy-verdict",
        verdict=verdict,
        reason=133 if dropped else 0,
        reason_name="Policy denied" if dropped else "",
        direction="ingress",
        observation_point="to-endpoint",
        src_ip="10.9.1.5",
        dst_ip="10.9.2.7",
        src_port=40000,
        dst_port=dport,
        protocol="TCP",
        tcp_flags=["SYN"],
        src_identity=1001,
        dst_identity=1002,
        rule_id=rule,
    )


@pytest.fixture
async def monitor(nats_server: ServerProcess, bus: Bus) -> AsyncIterator[Running]:
    await fill_buckets(bus)
    running = await start(
        MonitorSettings(nats_url=nats_server.url, replica="m1", ring_size=1000, queue_batches=4)
    )
    yield running
    await running.stop()


async def test_batches_are_enriched_queried_and_republished(bus: Bus, monitor: Running) -> None:
    received: list[EnrichedFlow] = []

    async def on_event(msg: object) -> None:
        received.extend(decode_flow_batch(msg.data))  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(subjects.event_flow_batches("DROPPED", "empire"), cb=on_event)
    await bus.nc.flush()
    batch = FlowBatch(node="n2", flows=[flow("FORWARDED", rule=RULE), flow("DROPPED", dport=81)])
    await bus.publish(subjects.flows("n2"), batch)

    async def two() -> list[EnrichedFlow]:
        found = await flow_client.query(bus, FlowQuery(last=10))
        assert len(found) == 2
        return found

    allowed, dropped = await eventually(two, timeout=10, what="two enriched flows")
    assert allowed.verdict == "FORWARDED" and allowed.policy == "empire/deathstar-policy"
    assert allowed.rule == "empire/deathstar-policy[0]"
    assert dropped.drop_reason == 133 and dropped.drop_reason_desc == "Policy denied"
    for f in (allowed, dropped):
        assert (f.source.namespace, f.source.pod, f.source.node) == ("empire", "xwing", "n1")
        assert f.destination.pod == "deathstar-1" and f.destination.identity == 1002
        assert "k8s:app=xwing" in f.source.labels and "k8s:app=deathstar" in f.destination.labels

    async def delivered() -> None:
        assert [f.destination.port for f in received] == [81]

    await eventually(delivered, timeout=5, what="the drop on its events subject")
    await sub.unsubscribe()

    # filters and their negation, through the replica
    drops = await flow_client.query(
        bus, FlowQuery(filters=[FlowFilterTerm(field="verdict", values=["DROPPED"])])
    )
    assert [f.verdict for f in drops] == ["DROPPED"]
    others = await flow_client.query(
        bus,
        FlowQuery(filters=[FlowFilterTerm(field="to_port", values=["81"], negate=True)]),
    )
    assert [f.destination.port for f in others] == [80]

    # the history stream kept the drop: a query the ring cannot satisfy finds it there
    def history_request() -> FlowQuery:
        return FlowQuery(filters=[FlowFilterTerm(field="verdict", values=["DROPPED"])], last=5)

    async def in_history() -> None:
        reply = await bus.request(subjects.MONITOR_HISTORY, history_request(), FlowQueryReply)
        assert [f.destination.port for f in reply.flows] == [81]

    await eventually(in_history, timeout=5, what="the drop in the history stream")

    samples = await scrape(f"127.0.0.1:{monitor.metrics_port}")
    assert samples[("membrane_monitor_drops_total", ("ingress", "Policy denied"))] >= 1
    assert samples[("membrane_monitor_flows_processed_total", ("policy-verdict", "FORWARDED"))] >= 1
    assert samples[("membrane_monitor_policy_verdicts_total", ("allowed", "ingress", "rule"))] >= 1


async def test_malformed_and_lost_are_counted_and_the_replica_keeps_serving(
    bus: Bus, monitor: Running
) -> None:
    await bus.nc.publish(subjects.flows("n9"), b"{not json")
    await bus.nc.publish(subjects.flows("n9"), b'{"node": "n9", "flows": [{"time": "x"}]}')
    await bus.publish(subjects.flows("n9"), FlowBatch(node="n9", flows=[], lost=7))
    replica = monitor.micro.id

    async def counted() -> MonitorStatus:
        status = await bus.request(subjects.monitor_status(replica), Empty(), MonitorStatus)
        assert status.malformed_batches == 2 and status.flows_lost == 7
        return status

    await eventually(counted, timeout=5, what="malformed batches and lost events counted")

    # a flood bigger than the intake queue: what it cannot take is counted, none vanishes
    flows = [flow("FORWARDED") for _ in range(100)]
    payload = msgspec.json.encode(FlowBatch(node="n2", flows=flows))
    for _ in range(200):
        await bus.nc.publish(subjects.flows("n2"), payload)
    await bus.nc.flush()
    # while it works through the flood, the replica keeps answering
    asked = time.monotonic()
    await bus.request(subjects.monitor_status(replica), Empty(), MonitorStatus, timeout=2)
    assert time.monotonic() - asked < 1.0

    async def accounted() -> MonitorStatus:
        status = await bus.request(subjects.monitor_status(replica), Empty(), MonitorStatus)
        assert status.flows_seen + status.flows_lost - 7 == 200 * 100
        return status

    status = await eventually(accounted, timeout=30, what="every flooded flow seen or lost")
    # the intake queue (4 batches) took a few batches, the rest was counted lost
    assert status.flows_seen > 0 and status.flows_lost > 7
    assert status.ring_size == min(status.flows_seen, status.ring_capacity)
    samples = await scrape(f"127.0.0.1:{monitor.metrics_port}")
    assert samples[("membrane_monitor_malformed_batches_total", ())] >= 2


async def test_the_l7_proxys_batches_are_enriched_and_their_losses_counted(
    bus: Bus, monitor: Running
) -> None:
    """The proxy's compact batches (shared/l7_wire.py) on the same subject: enriched and named
    as its flows were, the flows its bus did not take counted lost (stage bus), a malformed one
    counted, and a flood beyond the intake queue counted without decoding its records."""
    replica = monitor.micro.id
    request = L7Info(protocol="http", method="PUT", url="/v1/exhaust-port", status=403)
    denied = L7Record(
        time.time(), "DROPPED", "ingress", "TCP", "10.9.1.5", 40000, 1001, "10.9.2.7", 80, 1002,
        RULE, request,
    )  # fmt: skip
    await bus.nc.publish(subjects.flows("n2"), l7_wire.encode(L7Batch("n2", [denied], 3)))
    await bus.nc.publish(subjects.flows("n2"), l7_wire.MAGIC + b'["n2",[["x"]],0]')

    async def enriched() -> EnrichedFlow:
        found = await flow_client.query(bus, FlowQuery(last=10))
        assert len(found) == 1
        return found[0]

    got = await eventually(enriched, timeout=10, what="the L7 flow enriched")
    assert (got.type, got.verdict, got.observation_point) == ("l7", "DROPPED", "to-proxy")
    assert got.l7 == request and got.policy == "empire/deathstar-policy"
    assert (got.source.pod, got.destination.pod) == ("xwing", "deathstar-1")

    async def counted() -> MonitorStatus:
        status = await bus.request(subjects.monitor_status(replica), Empty(), MonitorStatus)
        assert status.malformed_batches == 1 and status.flows_lost == 3
        return status

    await eventually(counted, timeout=5, what="the malformed batch and the bus's loss counted")
    payload = l7_wire.encode(L7Batch("n2", [denied] * 100))
    for _ in range(200):
        await bus.nc.publish(subjects.flows("n2"), payload)
    await bus.nc.flush()

    async def accounted() -> MonitorStatus:
        status = await bus.request(subjects.monitor_status(replica), Empty(), MonitorStatus)
        assert status.flows_seen - 1 + status.flows_lost - 3 == 200 * 100
        return status

    status = await eventually(accounted, timeout=30, what="every flooded L7 flow seen or lost")
    assert status.flows_lost > 3  # the intake queue (4 batches) could not take them all
    samples = await scrape(f"127.0.0.1:{monitor.metrics_port}")
    assert samples[("membrane_monitor_flows_processed_total", ("l7", "DROPPED"))] >= 1
    assert samples[("membrane_monitor_lost_events_total", ("bus",))] >= 3


async def test_two_replicas_share_batches_and_a_query_sees_both(
    nats_server: ServerProcess, bus: Bus
) -> None:
    await fill_buckets(bus)
    monitor = await start(MonitorSettings(nats_url=nats_server.url, replica="m1"))
    second = await start(MonitorSettings(nats_url=nats_server.url, replica="m2"))
    try:
        now = time.time()
        for i in range(40):
            await bus.publish(
                subjects.flows("n2"), FlowBatch(node="n2", flows=[flow("FORWARDED", t=now + i)])
            )
        await bus.nc.flush()

        async def all_forty() -> None:
            found = await flow_client.query(bus, FlowQuery())
            assert len(found) == 40

        await eventually(all_forty, timeout=10, what="40 flows across two replicas")
        assert monitor.monitor.flows_seen > 0 and second.monitor.flows_seen > 0
        assert monitor.monitor.flows_seen + second.monitor.flows_seen == 40
    finally:
        await second.stop()
        await monitor.stop()


async def test_a_bad_filter_is_an_error_naming_it(bus: Bus, monitor: Running) -> None:
    from shared.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="unknown verdict"):
        await flow_client.query(
            bus, FlowQuery(filters=[FlowFilterTerm(field="verdict", values=["MAYBE"])])
        )
    await asyncio.sleep(0)


async def test_after_a_restart_drops_come_from_history_and_since_bounds_the_ring(
    nats_server: ServerProcess, bus: Bus
) -> None:
    await fill_buckets(bus)
    settings = MonitorSettings(nats_url=nats_server.url, replica="m1")
    first = await start(settings)
    now = time.time()
    try:
        old, new = flow("DROPPED", dport=90, t=now - 600), flow("DROPPED", dport=91, t=now)
        await bus.publish(subjects.flows("n2"), FlowBatch(node="n2", flows=[old, new]))

        async def both() -> None:
            assert len(await flow_client.query(bus, FlowQuery())) == 2

        await eventually(both, timeout=10, what="two drops in the ring")
        recent = await flow_client.query(bus, FlowQuery(since=now - 60))
        assert [f.destination.port for f in recent] == [91]
    finally:
        await first.stop()

    # a new replica has an empty ring: the drops come from the history stream
    second = await start(settings)
    try:
        drops = FlowFilterTerm(field="verdict", values=["DROPPED"])
        found = await flow_client.query(bus, FlowQuery(filters=[drops], last=10))
        assert [f.destination.port for f in found] == [90, 91]
        assert found[0].source.pod == "xwing"  # stored enriched
        recent = await flow_client.query(bus, FlowQuery(filters=[drops], since=now - 60))
        assert [f.destination.port for f in recent] == [91]
    finally:
        await second.stop()


async def test_a_services_bucket_there_before_the_monitor_is_read_and_start_up_ends(
    nats_server: ServerProcess, bus: Bus
) -> None:
    # the lb service usually creates the bucket first; start-up must not wait on it forever
    await fill_buckets(bus)
    services = await bus.kv(subjects.KV_SERVICES)
    deathstar = LBService(
        namespace="empire",
        name="deathstar",
        frontends=[LBFrontend(id=1, ip="10.9.2.7", port=80, protocol="TCP")],
    )
    await services.put("empire.deathstar", msgspec.json.encode(deathstar))
    running = await asyncio.wait_for(
        start(MonitorSettings(nats_url=nats_server.url, replica="m1")), 15
    )
    try:
        enriched = running.monitor.enricher.enrich(flow("DROPPED"))
        assert enriched.destination.service == "empire/deathstar"
    finally:
        await running.stop()


class Collector:
    """Messages of a subject pattern, as a subscriber gets them."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def on_msg(self, msg: object) -> None:
        self.messages.append((msg.subject, msg.data))  # type: ignore[attr-defined]

    def flows(self) -> list[EnrichedFlow]:
        return [f for _, data in self.messages for f in decode_flow_batch(data)]


def flood(n: int, dropped_every: int) -> list[Flow]:
    """``n`` flows, every ``dropped_every``th dropped, the destination port numbering them; the
    drops to a pod of namespace empire, the others to an address of no pod (namespace `_`)."""
    flows = []
    for i in range(n):
        f = flow("DROPPED" if i % dropped_every == 0 else "FORWARDED", dport=1000 + i)
        if f.verdict == "FORWARDED":
            f.src_ip, f.dst_ip = "10.99.0.1", "10.99.0.2"
        flows.append(f)
    return flows


async def test_flows_go_out_in_batches_by_verdict_and_namespace_every_one_once(
    bus: Bus, monitor: Running
) -> None:
    batches, singles = Collector(), Collector()
    await bus.nc.subscribe(subjects.EVENTS_FLOW_BATCHES_ALL, cb=batches.on_msg)
    await bus.nc.subscribe(subjects.EVENTS_FLOWS_ALL, cb=singles.on_msg)
    await bus.nc.flush()
    # 2,000 flows of ~600 bytes: more than one message of a verdict and namespace can carry
    sent = flood(2000, dropped_every=4)
    for first in (0, 1000):  # two batches: the fixture's intake queue holds 4
        part = sent[first : first + 1000]
        await bus.publish(subjects.flows("n2"), FlowBatch(node="n2", flows=part))

    async def all_of_them() -> None:
        assert len(batches.flows()) == len(sent)

    await eventually(all_of_them, timeout=15, what="every flow in a batch message")
    subjects_seen = {subject for subject, _ in batches.messages}
    assert subjects_seen == {
        subjects.event_flow_batches("DROPPED", "empire"),
        subjects.event_flow_batches("FORWARDED", subjects.NO_NAMESPACE),
    }
    assert all(len(data) <= FLOW_BATCH_MAX_BYTES for _, data in batches.messages)
    assert all(data.endswith(b"\n") for _, data in batches.messages)
    assert len(batches.messages) < len(sent) / 50  # batches, not flows
    # each subject's flows in the order they were sent, none twice, each of its verdict
    for verdict in ("DROPPED", "FORWARDED"):
        ports = [
            f.destination.port
            for subject, data in batches.messages
            if subject.split(".")[3] == verdict
            for f in decode_flow_batch(data)
        ]
        assert ports == [f.dst_port for f in sent if f.verdict == verdict]
    drop = next(f for f in batches.flows() if f.verdict == "DROPPED")
    assert drop.source.pod == "xwing" and drop.destination.pod == "deathstar-1"
    # the per-flow subject is opt-in: nothing there
    await bus.nc.flush()
    assert singles.messages == []
    samples = await scrape(f"127.0.0.1:{monitor.metrics_port}")
    assert samples.get(("membrane_monitor_publish_failures_total", ("batch",)), 0) == 0


async def test_per_flow_messages_when_asked_for(nats_server: ServerProcess, bus: Bus) -> None:
    await fill_buckets(bus)
    running = await start(
        MonitorSettings(nats_url=nats_server.url, replica="m1", events_per_flow=True)
    )
    try:
        batches, singles = Collector(), Collector()
        await bus.nc.subscribe(subjects.EVENTS_FLOW_BATCHES_ALL, cb=batches.on_msg)
        await bus.nc.subscribe(subjects.EVENTS_FLOWS_ALL, cb=singles.on_msg)
        await bus.nc.flush()
        sent = flood(30, dropped_every=3)
        await bus.publish(subjects.flows("n2"), FlowBatch(node="n2", flows=sent))

        async def both() -> None:
            assert len(singles.messages) == len(batches.flows()) == len(sent)

        await eventually(both, timeout=10, what="each flow in a batch and in a message of its own")
        # one flow per message, the same JSON as its line in the batch
        lines = [line for _, data in batches.messages for line in data.splitlines()]
        assert sorted(data for _, data in singles.messages) == sorted(lines)
        drops = [s for s, _ in singles.messages if s == subjects.event_flows("DROPPED", "empire")]
        assert len(drops) == 10
    finally:
        await running.stop()


async def test_observe_follow_reads_the_batches(
    nats_server: ServerProcess, bus: Bus, monitor: Running
) -> None:
    follow = subprocess.Popen(  # noqa: ASYNC220 - its pipes are read in threads
        [
            sys.executable,
            "-m",
            "membrane",
            "--nats-url",
            nats_server.url,
            "observe",
            "--follow",
            "--ready",
            "--verdict",
            "DROPPED",
            "-o",
            "json",
            "--max-flows",
            "25",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stderr is not None
        ready = await asyncio.to_thread(follow.stderr.readline)
        assert ready.strip() == "following"
        sent = flood(100, dropped_every=4)  # 25 drops, in one batch message
        await bus.publish(subjects.flows("n2"), FlowBatch(node="n2", flows=sent))
        out, _ = await asyncio.to_thread(follow.communicate, timeout=20)
    finally:
        follow.kill()
        follow.wait()
    lines = [msgspec.json.decode(line, type=EnrichedFlow) for line in out.splitlines()]
    drops = [f.dst_port for f in sent if f.verdict == "DROPPED"]
    assert [f.destination.port for f in lines] == drops
    assert {f.source.pod for f in lines} == {"xwing"}


async def test_history_reads_the_newest_flows_back_across_many_batch_messages(
    nats_server: ServerProcess, bus: Bus
) -> None:
    await fill_buckets(bus)
    running = await start(MonitorSettings(nats_url=nats_server.url, replica="m1", history_scan=300))
    try:
        sent = flood(1000, dropped_every=1)
        for first in range(0, len(sent), 10):  # 100 messages of 10 drops: several windows
            await bus.publish(
                subjects.flows("n2"), FlowBatch(node="n2", flows=sent[first : first + 10])
            )
            await bus.nc.flush()

        async def stored() -> None:
            info = await bus.js.stream_info(subjects.STREAM_FLOW_HISTORY)
            assert info.state.messages == 100

        await eventually(stored, timeout=15, what="100 batch messages in the history stream")
        reply = await bus.request(subjects.MONITOR_HISTORY, FlowQuery(), FlowQueryReply)
        assert [f.destination.port for f in reply.flows] == [f.dst_port for f in sent[-300:]]
        reply = await bus.request(subjects.MONITOR_HISTORY, FlowQuery(last=5), FlowQueryReply)
        assert [f.destination.port for f in reply.flows] == [f.dst_port for f in sent[-5:]]
    finally:
        await running.stop()
