"""A node's agent credential cannot shadow a peer's pod in the ipcache (issue 18).

Real nats-server with the roles' users, real redis-server and the identity service as its own
process: each node gets its pod CIDR from cluster-pool IPAM over the bus, with its own agent
credential. Node n1 then writes, under its own keys (all nats-server lets it write), an entry
for n2's pod address naming itself. Every reader -- the monitor service, the proxy's view and
the agent's ipcache sync, each behind shared/ipcache_guard.py with its own credential -- keeps
n2's entry and counts the forged one; n1's own pod stays believed.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network

import msgspec
import nats.errors
import pytest

from membrane.servers import NatsServer, RedisServer, ServerProcess, terminate
from membrane.supervisor import die_with_parent
from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.maps import IPCacheValue
from services.monitor.service import MonitorSettings, start
from services.proxy.view import View
from shared import ipcache_guard, roles, subjects
from shared.bus import Bus
from shared.errors import DeadlineExceeded, PermissionDenied, Unavailable
from shared.ipcache_guard import REFUSED
from shared.kv_watch import BucketWatches
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    IPCacheEntry,
    PodCIDR,
    PodCIDRRequest,
    ReleaseReply,
    ReleaseRequest,
)
from shared.runtime import TaskGroup
from tests.conftest import eventually, membrane_command, service_env

USERS = {
    "identity": roles.IDENTITY,
    "datapath-n1": roles.datapath("n1"),
    "datapath-n2": roles.datapath("n2"),
    "monitor": roles.MONITOR,
    "proxy-n1": roles.proxy("n1"),
}
UNDERLAY = {"n1": "172.31.9.1", "n2": "172.31.9.2"}
READERS = ("datapath", "monitor", "proxy")


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ...]]:
    directory = tmp_path_factory.mktemp("authority")
    users = [(name, f"pw-{name}", perms) for name, perms in USERS.items()]
    nats_proc = ServerProcess("nats-server", NatsServer(directory / "nats", users=users))
    redis_proc = ServerProcess("redis-server", RedisServer(directory / "redis"))
    nats_proc.start()
    redis_proc.start()
    try:
        yield nats_proc, redis_proc
    finally:
        nats_proc.stop()
        redis_proc.stop()


def url(server: ServerProcess, user: str) -> str:
    return f"nats://{user}:pw-{user}@127.0.0.1:{server.port}"


@pytest.fixture
def identity_service(servers: tuple[ServerProcess, ...]) -> Iterator[None]:
    nats_proc, redis_proc = servers
    env = service_env(nats_proc, redis_proc, replica="identity-0", cluster_cidr="10.9.0.0/16") | {
        "MEMBRANE_NATS_URL": url(nats_proc, "identity")
    }
    proc = subprocess.Popen(
        membrane_command("run", "identity"), env=env, preexec_fn=die_with_parent
    )
    yield
    terminate([proc])


@pytest.fixture
async def agents(servers: tuple[ServerProcess, ...]) -> AsyncIterator[dict[str, Bus]]:
    buses = {
        n: await Bus.connect(url(servers[0], f"datapath-{n}"), n, retry_for=5) for n in UNDERLAY
    }
    yield buses
    for bus in buses.values():
        await bus.close()


async def pod_cidr(bus: Bus, node: str) -> IPv4Network:
    """The node's pod CIDR, asked as its agent asks (the identity service may be starting)."""

    async def ask() -> PodCIDR:
        return await bus.request(subjects.ipam_allocate(node), PodCIDRRequest(node=node), PodCIDR)

    reply = await eventually(
        ask, timeout=30, what="cluster-pool IPAM", retry_on=(Unavailable, DeadlineExceeded)
    )
    return IPv4Network(reply.cidr)


async def put_pod(bus: Bus, writer: str, address: IPv4Address, identity: int) -> None:
    """An ipcache entry as ``writer``'s agent writes one: under its key, naming itself."""
    entry = IPCacheEntry(f"{address}/32", identity, writer, UNDERLAY[writer])
    ipcache = await bus.kv(subjects.KV_IPCACHE)
    await ipcache.put(subjects.ipcache_key(address, writer), msgspec.json.encode(entry))


def refused() -> dict[str, float]:
    return {r: REFUSED.labels(r, "outside_pod_cidr")._value.get() for r in READERS}


async def test_a_node_cannot_shadow_a_peers_pod_in_any_reader(
    servers: tuple[ServerProcess, ...], identity_service: None, agents: dict[str, Bus]
) -> None:
    nats_proc = servers[0]
    n1, n2 = agents["n1"], agents["n2"]
    cidr1, cidr2 = await pod_cidr(n1, "n1"), await pod_cidr(n2, "n2")
    assert cidr1 != cidr2
    mine, peer = cidr1.network_address + 5, cidr2.network_address + 5
    # the authority is out of the agents' reach: no release of a CIDR, no write of the bucket
    with pytest.raises(PermissionDenied):
        await n1.request(subjects.IPAM_RELEASE, PodCIDRRequest(node="n2"), PodCIDR)
    # nor can it take pool space in another node's name: not on that node's subject (the bus
    # refuses the publish), nor on its own with another name in the body (the service does)
    for subject, node in (
        (subjects.ipam_allocate("n3"), "n3"),
        (subjects.ipam_allocate("n1"), "n3"),
    ):
        with pytest.raises(PermissionDenied):
            await n1.request(subject, PodCIDRRequest(node=node), PodCIDR)
    allocated = await (await n1.kv(subjects.KV_POD_CIDRS)).keys()
    assert sorted(allocated) == [subjects.pod_cidr_key("n1"), subjects.pod_cidr_key("n2")]
    # identity references likewise: n1 cannot release the one n2's pods hold, even on its own
    # subject (the service compares the owner with the subject's node)
    held = await n2.request(
        subjects.for_node(subjects.IDENTITY_ALLOCATE, "n2"),
        AllocateRequest(labels=["k8s:app=held"], owner="n2"),
        AllocateReply,
    )
    with pytest.raises(PermissionDenied):
        await n1.request(
            subjects.for_node(subjects.IDENTITY_RELEASE, "n1"),
            ReleaseRequest(id=held.identity.id, owner="n2"),
            ReleaseReply,
        )
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await n1.js.publish(
            f"$KV.{subjects.KV_POD_CIDRS}.{subjects.pod_cidr_key('n1')}",
            msgspec.json.encode(PodCIDR(node="n1", cidr=str(cidr2))),
            timeout=0.5,
        )
    await put_pod(n2, "n2", peer, 300)  # in the snapshot every reader starts from
    await put_pod(n1, "n1", mine, 301)

    # the readers, each with its own credential
    tasks = TaskGroup()
    monitor = await start(
        MonitorSettings(nats_url=url(nats_proc, "monitor"), replica="m1", ring_size=100)
    )
    proxy_bus = await Bus.connect(url(nats_proc, "proxy-n1"), "proxy-n1", retry_for=5)
    view = View("n1")
    proxy_watches = BucketWatches(proxy_bus, tasks)
    await ipcache_guard.watch(proxy_watches, "proxy", view.set_ipcache)
    agent_bus = await Bus.connect(url(nats_proc, "datapath-n1"), "agent-n1", retry_for=5)
    ipcache_map: dict[IPv4Network, IPCacheValue] = {}
    sync = IPCacheSync(ipcache_map)

    def install(key: str, value: bytes | None) -> None:  # as Agent._install_ipcache does
        sync.apply(key, None if value is None else msgspec.json.decode(value, type=IPCacheEntry))

    agent_watches = BucketWatches(agent_bus, tasks)
    await ipcache_guard.watch(agent_watches, "datapath", install)
    try:
        await proxy_watches.synced()
        await agent_watches.synced()
        peer_net, mine_net = IPv4Network(f"{peer}/32"), IPv4Network(f"{mine}/32")
        peers_entry = IPCacheValue(300, IPv4Address(UNDERLAY["n2"]))

        async def everyone_believes_the_peer() -> None:
            assert monitor.monitor.enricher.ip_nodes.get(str(peer)) == "n2"
            assert monitor.monitor.enricher.ip_nodes.get(str(mine)) == "n1"
            assert view.identity_of(peer) == 300 and peer in view.elsewhere
            assert view.identity_of(mine) == 301
            assert ipcache_map.get(peer_net) == peers_entry
            assert ipcache_map.get(mine_net) == IPCacheValue(301, IPv4Address(UNDERLAY["n1"]))

        await eventually(everyone_believes_the_peer, timeout=10, what="the normal path")
        before = refused()

        # the attack: n1, under its own key, claims n2's pod with an identity of its choice
        await put_pod(n1, "n1", peer, 400)

        async def counted() -> None:
            assert refused() == {r: count + 1 for r, count in before.items()}

        await eventually(counted, timeout=10, what="each reader to count the forged entry")
        await everyone_believes_the_peer()
        assert subjects.ipcache_key(peer, "n1") in await Bus.snapshot(
            await n1.kv(subjects.KV_IPCACHE)
        ), "nats-server let n1 write it: the readers alone stand between it and the maps"
    finally:
        await monitor.stop()
        await tasks.close()
        await proxy_bus.close()
        await agent_bus.close()
