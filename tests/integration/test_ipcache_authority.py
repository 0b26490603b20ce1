"""A node's agent credential cannot shadow a peer's pod in the ipcache (issue 18).

Real nats-server with the roles' users, real redis-server and the identity service as its own
process: each node gets its pod CIDR from cluster-pool IPAM over the bus, with its own agent
credential. Node n1 then writes, under its own keys (all nats-server lets it write), an entry
for n2's pod address naming itself. Every reader -- the monitor service, the proxy's view and
the agent's ipcache sync, each behind shared/ipcache_guard.py with its own credential -- keeps
n2's entry and counts the forged one; n1's own pod stays believed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgspec
import nats.errors
import pytest

from membrane.servers import NatsServer, RedisServer, ServerProcess, terminate
from membrane.supervisor import die_with_parent
from services.datapath import routing
from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.maps import IPCacheValue
from services.monitor.service import MonitorSettings, start
from services.proxy.view import View
from shared import identities, ipcache_guard, netns, roles, subjects
from shared.bus import Bus, KVEvent
from shared.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from shared.ipcache_guard import REFUSED
from shared.kv_watch import BucketWatches
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    IPCacheEntry,
    Node,
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
    "datapath-n3": roles.datapath("n3"),
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


async def pod_cidr(bus: Bus, node: str, underlay: str = "") -> IPv4Network:
    """The node's pod CIDR, asked as its agent asks (the identity service may be starting)."""

    async def ask() -> PodCIDR:
        request = PodCIDRRequest(node=node, underlay_ip=underlay)
        return await bus.request(subjects.ipam_allocate(node), request, PodCIDR)

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
    # (Bus.snapshot, not nats.py's keys(): under load that misses entries still in its queue
    # and raises "no keys found" for a full bucket; shared/kv_watch.py says why)
    allocated = list(await Bus.snapshot(await n1.kv(subjects.KV_POD_CIDRS)))
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


async def put_node(bus: Bus, name: str, underlay: str, cidr: IPv4Network) -> None:
    """The node's ``nodes`` record as its agent writes it (its heartbeat: now)."""
    record = Node(
        name=name,
        underlay_ip=underlay,
        pod_cidr=str(cidr),
        router_ip=str(cidr.network_address + 1),
        heartbeat=time.time(),
    )
    await (await bus.kv(subjects.KV_NODES)).put(name, msgspec.json.encode(record))


async def recorded(bus: Bus) -> dict[str, str]:
    """node -> the underlay address in ``pod-cidrs`` (the identity service's record)."""
    found = await Bus.snapshot(await bus.kv(subjects.KV_POD_CIDRS))
    return {
        c.node: c.underlay_ip
        for c in (msgspec.json.decode(v, type=PodCIDR) for v in found.values())
    }


async def test_a_node_cannot_claim_a_peers_underlay_address(
    servers: tuple[ServerProcess, ...], identity_service: None, agents: dict[str, Bus]
) -> None:
    """n2's credential claims n1's underlay address, in its IPAM request (refused) and in its
    own ``nodes`` record (nats-server lets it): a third node's peers table, applied in a
    namespace of its own, keeps n1's tunnel endpoint and remote-node entry, and n2 is
    reached at the address the identity service recorded for it. Then the lifecycle: a
    restart with the same address, an address moved (down and up), a graceful leave."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    n1, n2 = agents["n1"], agents["n2"]
    n3 = await Bus.connect(url(servers[0], "datapath-n3"), "n3", retry_for=5)
    cidr1 = await pod_cidr(n1, "n1", UNDERLAY["n1"])
    cidr2 = await pod_cidr(n2, "n2", UNDERLAY["n2"])
    await put_node(n1, "n1", UNDERLAY["n1"], cidr1)
    await put_node(n2, "n2", UNDERLAY["n2"], cidr2)
    assert await recorded(n1) == UNDERLAY

    # n3's view of its peers, as its agent keeps it (services/datapath/service.py)
    tasks = TaskGroup()
    third = routing.Peers(
        Node(name="n3", underlay_ip="172.31.9.3", pod_cidr="", router_ip="", heartbeat=0),
        "tunnel",
        IPCacheSync(ipcache_map := {}),
        tunnel_peers := {},
        pod_cidrs=(guard := ipcache_guard.IPCacheGuard("datapath", lambda _k, _v: None)).pod_cidrs,
        underlays=guard.underlays,
    )
    watches = BucketWatches(n3, tasks)
    await watches.add(subjects.KV_POD_CIDRS, guard.on_pod_cidr)
    await watches.add(
        subjects.KV_NODES, lambda k, v: third.on_node(KVEvent(key=k, value=v, revision=0))
    )
    name = "mauth" + secrets.token_hex(3)
    namespace = netns.ensure_netns(name)

    async def applied() -> tuple[dict[str, Any], dict[Any, Any]]:
        await asyncio.to_thread(netns.in_netns, namespace, third._apply, third.desired())
        return dict(tunnel_peers), dict(ipcache_map)

    def state(**underlays: str) -> tuple[dict[str, Any], dict[Any, Any]]:
        addresses = [IPv4Address(a) for a in underlays.values()]
        return (
            {a: 1 for a in addresses},
            {IPv4Network(f"{a}/32"): IPCacheValue(identities.REMOTE_NODE, a) for a in addresses},
        )

    try:
        await asyncio.wait_for(watches.synced(), 10)
        victim = state(n1=UNDERLAY["n1"], n2=UNDERLAY["n2"])

        async def as_before() -> None:
            assert await applied() == victim

        await eventually(as_before, timeout=10, what="n3's peers: n1 and n2")

        # the attack: n2 asks for n1's address, and writes it into its own record
        with pytest.raises(AlreadyExists) as refusal:
            await n2.request(
                subjects.ipam_allocate("n2"),
                PodCIDRRequest(node="n2", underlay_ip=UNDERLAY["n1"]),
                PodCIDR,
            )
        assert refusal.value.field == "underlay_ip" and "'n1'" in str(refusal.value)
        await put_node(n2, "n2", UNDERLAY["n1"], cidr2)

        async def claimed() -> None:
            assert third.nodes["n2"].underlay_ip == UNDERLAY["n1"]

        await eventually(claimed, timeout=10, what="n2's claim in n3's view")
        assert await applied() == victim
        assert await recorded(n1) == UNDERLAY
        # a bad address is refused by name, and changes nothing
        with pytest.raises(InvalidArgument) as bad:
            await n2.request(
                subjects.ipam_allocate("n2"),
                PodCIDRRequest(node="n2", underlay_ip="172.31.9"),
                PodCIDR,
            )
        assert bad.value.field == "underlay_ip"
        assert await recorded(n1) == UNDERLAY

        # a restart: same node, same address, same CIDR
        assert await pod_cidr(n1, "n1", UNDERLAY["n1"]) == cidr1
        # n1 down, then up with another address: its old one is free, peers follow
        assert await pod_cidr(n1, "n1", "172.31.9.11") == cidr1
        await put_node(n1, "n1", "172.31.9.11", cidr1)
        moved = state(n1="172.31.9.11", n2=UNDERLAY["n2"])

        async def followed() -> None:
            assert await applied() == moved

        await eventually(followed, timeout=10, what="n3's peers: n1's new address")
        assert await pod_cidr(n3, "n3", UNDERLAY["n1"]) != cidr1
        # n2 leaves (its record deleted): its address may go to another node
        await (await n2.kv(subjects.KV_NODES)).delete("n2")

        async def taken_over() -> None:
            await pod_cidr(n3, "n3", UNDERLAY["n2"])

        await eventually(
            taken_over,
            timeout=10,
            what="n2's address, free after it left",
            retry_on=(AlreadyExists,),
        )
        # n2 keeps its CIDR (until released) but no address: peers give it nothing
        assert await recorded(n1) == {"n1": "172.31.9.11", "n2": "", "n3": UNDERLAY["n2"]}
    finally:
        await tasks.close()
        await n3.close()
        netns.delete_netns(name)
