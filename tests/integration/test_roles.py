"""Roles on a real nats-server: each credential does what its role needs and nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from membrane.servers import NatsServer, ServerProcess
from shared import roles, subjects
from shared.bus import Bus

USERS = {
    "dash": roles.SUBSCRIBER,
    "datapath-n1": roles.datapath("n1"),
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
    await dash.bus.flush()
    await monitor.nc.publish(subjects.event_flows("DROPPED", "default"), b'{"flow": 1}')
    assert await asyncio.wait_for(got.get(), 5) == b'{"flow": 1}'

    # the buckets exist with a value the subscriber must not change
    policy = await connect("policy")
    for bucket in (subjects.KV_RESOLVED, subjects.KV_IPCACHE):
        await (await policy.bus.kv(bucket)).put("300", b"good")
    for bucket in (subjects.KV_RESOLVED, subjects.KV_IPCACHE, subjects.KV_POLICIES):
        await kv_put_refused(dash, bucket, "300")
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
    assert (await admin_kv(server, subjects.KV_IPCACHE))["300"] == b"good"


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
    await kv_put_refused(agent, subjects.KV_IDENTITIES, "300")
    await agent.nc.publish(subjects.flows("n2"), b"{}")  # flows in another node's name
    assert await agent.refused(subjects.flows("n2"))
    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.request(subjects.POLICY_APPLY, b"{}", timeout=0.5)
    assert await agent.refused(subjects.POLICY_APPLY)
    assert await admin_kv(server, subjects.KV_NODES) == {"n1": b"mine"}
    assert await admin_kv(server, subjects.KV_POLICIES) == {}


async def test_a_role_without_its_password_or_a_wrong_one_is_refused(server: ServerProcess) -> None:
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(
            f"nats://dash:wrong@127.0.0.1:{server.port}",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


def test_every_role_renders(tmp_path: Path) -> None:
    for role in roles.ROLES:
        perms = roles.permissions(role, "n1")
        block = perms.render("u1")
        assert "_INBOX.u1.>" in block["subscribe"]["allow"]
    assert "$KV.nodes.n1" in roles.datapath("n1").publish
    assert "$KV.nodes.>" not in roles.datapath("n1").publish
