"""Roles on a real nats-server: each credential does what its role needs and nothing more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy

from membrane.servers import NatsServer, ServerProcess
from services.identity.nodes import NodeReaper
from shared import kv_watch, roles, subjects
from shared.bus import JETSTREAM_DELIVERIES, Bus
from shared.errors import InvalidArgument, PermissionDenied, Unavailable
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    Empty,
    Message,
    NodeHeartbeat,
    NodeLiveness,
    PolicyApplyReply,
    PolicyApplyRequest,
)

# a CIDR identity of a policy rule in ipcache: the policy service's key
CIDR_KEY = subjects.ipcache_key(IPv4Network("10.0.0.0/8"))

USERS = {
    "dash": roles.SUBSCRIBER,
    "datapath-n1": roles.datapath("n1"),
    "identity": roles.IDENTITY,
    "lb": roles.LB,
    "monitor": roles.MONITOR,
    "policy": roles.POLICY,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("roles") / "nats"
    users = [(name, f"pw-{name}", perms) for name, perms in USERS.items()]
    proc = ServerProcess("nats-server", NatsServer(directory, users=users))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def url(server: ServerProcess, user: str) -> str:
    return f"nats://{user}:pw-{user}@127.0.0.1:{server.port}"


class RoleClient:
    """A role's connection that remembers the server's permission errors."""

    def __init__(self, nc: Client, bus: Bus, errors: list[str]) -> None:
        self.nc, self.bus, self.errors = nc, bus, errors

    async def refused(self, what: str) -> bool:
        for _ in range(50):
            if any("permissions violation" in e and what.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


Opener = Callable[[str], Awaitable[RoleClient]]


@pytest.fixture
async def connect(server: ServerProcess) -> AsyncIterator[Opener]:
    opened: list[Bus] = []

    async def open_as(user: str) -> RoleClient:
        errors: list[str] = []
        bus = await Bus.connect(url(server, user), f"test-{user}", retry_for=5)
        bus.nc._error_cb = _collect(errors)  # the server's -ERR lines, as the test sees them
        opened.append(bus)
        return RoleClient(bus.nc, bus, errors)

    yield open_as
    for bus in opened:
        await bus.close()


def _collect(errors: list[str]) -> Callable[[Exception], Awaitable[None]]:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())  # nats.py lowercases the server's message

    return on_error


async def admin_kv(server: ServerProcess, bucket: str) -> dict[str, bytes]:
    bus = await Bus.connect(server.url, "test-admin", retry_for=5)
    try:
        return await Bus.snapshot(await bus.kv(bucket))
    finally:
        await bus.close()


async def kv_put_refused(client: RoleClient, bucket: str, key: str) -> None:
    """The put never lands: the server refuses the publish and no ack comes."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await client.bus.js.publish(f"$KV.{bucket}.{key}", b"{}", timeout=0.5)
    assert await client.refused(f"$KV.{bucket}.{key}")


async def test_subscriber_reads_events_and_nothing_else(
    connect: Opener, server: ServerProcess
) -> None:
    monitor = await connect("monitor")
    dash = await connect("dash")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_flow(msg: Msg) -> None:
        got.put_nowait(msg.data)

    await dash.nc.subscribe(subjects.EVENTS_FLOWS_ALL, cb=on_flow)
    await dash.nc.subscribe(subjects.EVENTS_FLOW_BATCHES_ALL, cb=on_flow)
    await dash.bus.flush()
    await monitor.nc.publish(subjects.event_flows("DROPPED", "default"), b'{"flow": 1}')
    assert await asyncio.wait_for(got.get(), 5) == b'{"flow": 1}'
    batch = b'{"flow": 1}\n{"flow": 2}\n'
    await monitor.nc.publish(subjects.event_flow_batches("DROPPED", "default"), batch)
    assert await asyncio.wait_for(got.get(), 5) == batch

    # the buckets exist with a value the subscriber must not change
    policy = await connect("policy")
    await (await policy.bus.kv(subjects.KV_RESOLVED)).put("300", b"good")
    await (await policy.bus.kv(subjects.KV_IPCACHE)).put(CIDR_KEY, b"good")
    for bucket, key in (
        (subjects.KV_RESOLVED, "300"),
        (subjects.KV_IPCACHE, CIDR_KEY),
        (subjects.KV_POLICIES, "300"),
    ):
        await kv_put_refused(dash, bucket, key)
    # no allocation, no KV read, no other subject
    with pytest.raises(nats.errors.TimeoutError):
        await dash.nc.request(subjects.IDENTITY_ALLOCATE, b"{}", timeout=0.5)
    assert await dash.refused(subjects.IDENTITY_ALLOCATE)
    await dash.nc.subscribe("membrane.flows.*")
    assert await dash.refused("membrane.flows.*")
    await dash.nc.subscribe("_INBOX.>")  # no reading of other users' replies
    assert await dash.refused("_INBOX.>")
    await dash.nc.publish("$JS.API.STREAM.PURGE.KV_resolved", b"")
    assert await dash.refused("$JS.API.STREAM.PURGE.KV_resolved")
    assert (await admin_kv(server, subjects.KV_RESOLVED))["300"] == b"good"
    assert (await admin_kv(server, subjects.KV_IPCACHE))[CIDR_KEY] == b"good"


async def test_agent_writes_its_own_node_only_and_no_policy(
    connect: Opener, server: ServerProcess
) -> None:
    agent = await connect("datapath-n1")
    nodes = await agent.bus.kv(subjects.KV_NODES)
    await nodes.put("n1", b"mine")  # its own record: allowed (the test can fail)
    await kv_put_refused(agent, subjects.KV_NODES, "n2")
    await kv_put_refused(agent, subjects.KV_HEALTH, "n2")
    for bucket in (subjects.KV_POLICIES, subjects.KV_RESOLVED, subjects.KV_SELECTORS):
        await kv_put_refused(agent, bucket, "300")
    # its own pods' endpoints and ipcache keys, and no other node's (nor a policy's CIDR)
    mine = (
        (subjects.KV_ENDPOINTS, subjects.endpoint_key("n1", "default", "web")),
        (subjects.KV_IPCACHE, subjects.ipcache_key(IPv4Address("10.9.1.5"), "n1")),
    )
    for bucket, key in mine:
        await (await agent.bus.kv(bucket)).put(key, b"mine")
    others = (
        (subjects.KV_ENDPOINTS, subjects.endpoint_key("n2", "default", "web")),
        (subjects.KV_ENDPOINTS, subjects.endpoint_key("n10", "default", "web")),
        (subjects.KV_IPCACHE, subjects.ipcache_key(IPv4Address("10.9.2.5"), "n2")),
        (subjects.KV_IPCACHE, CIDR_KEY),
        (subjects.KV_NAMESPACES, "default"),
    )
    await asyncio.gather(*(kv_put_refused(agent, bucket, key) for bucket, key in others))
    # nor delete them (a delete is a publish on the key's subject too)
    policy = await connect("policy")
    await (await policy.bus.kv(subjects.KV_IPCACHE)).put(CIDR_KEY, b"policy's")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await agent.bus.js.publish(
            f"$KV.{subjects.KV_IPCACHE}.{CIDR_KEY}",
            b"",
            headers={"KV-Operation": "DEL"},
            timeout=0.5,
        )
    assert await agent.refused(f"$KV.{subjects.KV_IPCACHE}.{CIDR_KEY}")
    assert await admin_kv(server, subjects.KV_ENDPOINTS) == {mine[0][1]: b"mine"}
    assert await admin_kv(server, subjects.KV_IPCACHE) == {
        mine[1][1]: b"mine",
        CIDR_KEY: b"policy's",
    }
    await kv_put_refused(agent, subjects.KV_IDENTITIES, "300")
    await agent.nc.publish(subjects.flows("n2"), b"{}")  # flows in another node's name
    assert await agent.refused(subjects.flows("n2"))
    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.request(subjects.POLICY_APPLY, b"{}", timeout=0.5)
    assert await agent.refused(subjects.POLICY_APPLY)
    # identities and pod CIDRs in its own node's name only, and not through the CLI's subjects
    for subject in (
        subjects.IDENTITY_ALLOCATE,
        subjects.IDENTITY_RELEASE,
        subjects.IDENTITY_HEARTBEAT,
        subjects.for_node(subjects.IDENTITY_RELEASE, "n2"),
        subjects.for_node(subjects.IDENTITY_HEARTBEAT, "n2"),
        subjects.ipam_allocate("n2"),
    ):
        with pytest.raises(nats.errors.TimeoutError):
            await agent.nc.request(subject, b"{}", timeout=0.5)
        assert await agent.refused(subject)
    assert await admin_kv(server, subjects.KV_NODES) == {"n1": b"mine"}
    assert await admin_kv(server, subjects.KV_POLICIES) == {}


async def test_a_node_heartbeats_for_itself_only_and_a_silent_one_is_marked_dead(
    connect: Opener, server: ServerProcess
) -> None:
    """The failure detector (the identity service's NodeReaper, as its role) believes n1's
    heartbeats on n1's subject only: the bus refuses n1's credential another node's subject,
    and the detector a heartbeat on n1's own subject that names another node. Verdicts go to
    ``liveness`` (which no agent may write); n1 silent past the expiry is dead there."""
    identity = await connect("identity")
    detector = NodeReaper(
        await identity.bus.kv(subjects.KV_ENDPOINTS),
        await identity.bus.kv(subjects.KV_IPCACHE),
        await identity.bus.kv(subjects.KV_LIVENESS),
        expiry=15.0,
        grace=60.0,
    )
    await identity.bus.subscribe(subjects.NODE_HEARTBEAT_ALL, detector.on_heartbeat_message)
    await identity.nc.flush()
    agent = await connect("datapath-n1")
    liveness = await agent.bus.kv(subjects.KV_LIVENESS)

    async def verdicts() -> dict[str, NodeLiveness]:
        return {
            key: msgspec.json.decode(raw, type=NodeLiveness)
            for key, raw in (await admin_kv(server, subjects.KV_LIVENESS)).items()
        }

    async def beat(subject: str, node: str) -> None:
        await agent.bus.publish(subject, NodeHeartbeat(node=node, time=time.time()))
        await agent.nc.flush()

    await beat(subjects.node_heartbeat("n1"), "n1")  # allowed (the test can fail)
    for _ in range(100):
        if "n1" in await verdicts():
            break
        await asyncio.sleep(0.05)
    assert (await verdicts())["n1"].alive
    await beat(subjects.node_heartbeat("n2"), "n2")  # in another node's name: the bus refuses
    assert await agent.refused(subjects.node_heartbeat("n2"))
    await beat(subjects.node_heartbeat("n1"), "n2")  # its own subject, naming n2: the detector
    await asyncio.sleep(0.3)
    assert set(await verdicts()) == {"n1"}
    assert set(detector.heartbeats) == {"n1"}
    await kv_put_refused(agent, subjects.KV_LIVENESS, "n1")  # no agent writes a verdict
    await kv_put_refused(agent, subjects.KV_LIVENESS, "n2")

    # n1 falls silent: alive until the expiry, dead after it
    last = detector.heartbeats["n1"]
    await detector.tick(last + 14)
    assert (await verdicts())["n1"].alive
    await detector.tick(last + 16)
    dead = (await verdicts())["n1"]
    assert not dead.alive and dead.heartbeat == last
    # and back with its next heartbeat
    await beat(subjects.node_heartbeat("n1"), "n1")
    for _ in range(100):
        if (await verdicts())["n1"].alive:
            break
        await asyncio.sleep(0.05)
    assert (await verdicts())["n1"].alive
    assert (await liveness.get("n1")).value is not None  # agents read the verdicts


async def test_a_role_without_its_password_or_a_wrong_one_is_refused(server: ServerProcess) -> None:
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(
            f"nats://dash:wrong@127.0.0.1:{server.port}",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


async def test_a_service_following_a_big_bucket_leaves_the_streams_acks_alone(
    connect: Opener, server: ServerProcess
) -> None:
    """A role that serves requests (the lb) follows ``services`` with 20,000 keys, as the lb
    service does after a bulk apply: a put on the bucket is acknowledged at once meanwhile. With
    ``allow_responses`` nats-server recorded the $JS.ACK reply of every delivery to that user
    and, past 4,096, scanned them all on each one: the stream stalled, acks timed out."""
    admin = await Bus.connect(server.url, "test-admin", retry_for=5)
    lb = await connect("lb")
    try:
        kv = await admin.kv(subjects.KV_SERVICES)
        for i in range(20000):  # pipelined, as the lb service publishes a bulk
            await admin.nc.publish(f"$KV.{subjects.KV_SERVICES}.big.s{i}", b"x" * 400)
        await admin.js.publish(f"$KV.{subjects.KV_SERVICES}.big.last", b"x", timeout=30)
        followed = await lb.bus.kv(subjects.KV_SERVICES)
        seen = 0
        past = asyncio.Event()  # past 4,096 deliveries: where the server's scans began

        def count(_: kv_watch.KVEvent) -> None:
            nonlocal seen
            seen += 1
            if seen == 5000:
                past.set()

        watch = asyncio.create_task(kv_watch.follow(followed, count, lambda: None))
        try:
            await asyncio.wait_for(past.wait(), 30)
            started = time.monotonic()
            await admin.js.publish(f"$KV.{subjects.KV_SERVICES}.big.s0", b"y", timeout=5)
            # 0.05 s here with the fix, 1.7 s without (one watcher; the cluster's several
            # stalled the stream for good)
            assert time.monotonic() - started < 1.0
        finally:
            watch.cancel()
        await kv.purge_deletes()
    finally:
        await admin.close()


def test_every_role_renders(tmp_path: Path) -> None:
    for role in roles.ROLES:
        perms = roles.permissions(role, "n1")
        block = perms.render("u1")
        assert "_INBOX.u1.>" in block["subscribe"]["allow"]
    assert "$KV.nodes.n1" in roles.datapath("n1").publish
    assert "$KV.nodes.>" not in roles.datapath("n1").publish


async def test_a_consumer_delivering_into_a_service_subject_is_dropped(
    connect: Opener, server: ServerProcess
) -> None:
    """The deliver-subject hole: an agent writes a payload into its own ``nodes`` key and
    creates a push consumer delivering the bucket to ``membrane.policy.apply`` in the policy
    service's queue group (nats-server does not check deliver subjects against the creator's
    permissions). The endpoint drops what JetStream delivers, and counts it."""
    policy = await connect("policy")
    handled: list[PolicyApplyRequest] = []

    async def apply(req: PolicyApplyRequest) -> Message:
        handled.append(req)
        return PolicyApplyReply(results=[])

    micro = await policy.bus.add_service("test-policy", "0.0.1", "", queue_group="test-policy")
    await micro.endpoint("apply", subjects.POLICY_APPLY, PolicyApplyRequest, apply)
    # a real request still arrives (the test can fail)
    admin = await Bus.connect(server.url, "test-admin", retry_for=5)
    try:
        await admin.request(
            subjects.POLICY_APPLY, PolicyApplyRequest(documents=[]), PolicyApplyReply
        )
    finally:
        await admin.close()
    assert len(handled) == 1

    agent = await connect("datapath-n1")
    await (await agent.bus.kv(subjects.KV_NODES)).put("n1", b'{"documents": [], "v": 1}')
    dropped = JETSTREAM_DELIVERIES.labels(subjects.POLICY_APPLY)
    before = dropped._value.get()
    await agent.bus.js.add_consumer(
        f"KV_{subjects.KV_NODES}",
        deliver_subject=subjects.POLICY_APPLY,
        deliver_group="test-policy",
        ack_policy=AckPolicy.NONE,
    )
    for _ in range(100):
        if dropped._value.get() > before:
            break
        await asyncio.sleep(0.05)
    assert dropped._value.get() == before + 1  # delivered (the hole is real here), and dropped
    assert len(handled) == 1
    await micro.stop()


async def test_a_denied_request_says_not_permitted_at_once(server: ServerProcess) -> None:
    """What the role refuses is answered by the server's -ERR only: the request raises
    PermissionDenied naming user and subject, instead of waiting out its timeout."""
    dash = await Bus.connect(url(server, "dash"), "test-dash", retry_for=5)
    try:
        started = time.monotonic()
        with pytest.raises(PermissionDenied, match=r"not permitted: the NATS user 'dash'.*"):
            await dash.request(
                subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=["k8s:app=x"]), AllocateReply
            )
        assert time.monotonic() - started < 2.0  # the timeout is 5 s
        # the connection still works for what the role allows
        with pytest.raises(Unavailable, match="no service is answering"):
            await dash.request(subjects.MONITOR_HISTORY, Empty(), Empty, timeout=2)
    finally:
        await dash.close()


def test_a_service_without_a_role_is_refused_not_run_as_admin() -> None:
    from membrane.registry import SERVICES

    assert {roles.role_of_service(s) for s in SERVICES} <= set(roles.ROLES) - {"admin"}
    with pytest.raises(InvalidArgument, match="'newsvc' has no NATS role"):
        roles.role_of_service("newsvc")
