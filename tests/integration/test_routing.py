"""Peer nodes -> kernel: routes and tunnel peers in a real (throwaway) network namespace."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.maps import IPCacheValue
from services.datapath.routing import CIDR_MISMATCHES, ROUTE_PROTO, UNDERLAY_MISMATCHES, Peers
from shared import identities, netns, subjects
from shared.bus import KVEvent
from shared.ipcache_guard import PodRange
from shared.messages import Node, NodeLiveness

pytestmark = pytest.mark.root


@pytest.fixture
def node_ns() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    name = "mtest" + secrets.token_hex(3)
    path = netns.ensure_netns(name)
    try:
        netns.in_netns(path, _underlay, IPv4Interface("198.51.100.11/24"))
        yield path
    finally:
        netns.delete_netns(name)


def _underlay(address: IPv4Interface) -> None:
    with IPRoute() as ipr:
        for kind in netns.ROUTER_KINDS:  # a kernel may lack dummy (see netns.ensure_router)
            try:
                ipr.link("add", ifname="eth0", kind=kind)
                break
            except NetlinkError:
                continue
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.link("set", index=index, state="up")


def _routes() -> dict[str, tuple[str, str | None]]:
    """dst -> (type, gateway) of the routes Peers owns."""
    with IPRoute() as ipr:
        found = {}
        for route in ipr.route("dump", family=socket.AF_INET, proto=ROUTE_PROTO):
            kind = {1: "unicast", 7: "unreachable"}.get(route["type"], str(route["type"]))
            found[f"{route.get('dst')}/{route['dst_len']}"] = (kind, route.get("gateway"))
        return found


def node(name: str, octet: int, heartbeat: float) -> Node:
    return Node(
        name=name,
        underlay_ip=f"198.51.100.{octet}",
        pod_cidr=f"10.9.{octet}.0/24",
        router_ip=f"10.9.{octet}.1",
        heartbeat=heartbeat,
    )


def verdict(name: str, alive: bool) -> KVEvent:
    """The failure detector's verdict on ``name`` (the ``liveness`` bucket)."""
    value = NodeLiveness(node=name, alive=alive, since=time.time(), heartbeat=time.time())
    return KVEvent(key=subjects.node_token(name), value=msgspec.json.encode(value), revision=1)


def event(peer: Node | None, key: str) -> KVEvent:
    return KVEvent(key=key, value=None if peer is None else msgspec.json.encode(peer), revision=1)


def given(*octets: int) -> dict[str, PodRange]:
    """The pod CIDRs the identity service gave nodes self, b (12), c (13), ...: pod-cidrs."""
    names = {11: "self", 12: "b", 13: "c"}
    return {names[o]: PodRange.of(IPv4Network(f"10.9.{o}.0/24")) for o in octets}


def recorded(*octets: int) -> dict[str, str]:
    """The underlay addresses the identity service recorded for self, b, c: pod-cidrs."""
    names = {11: "self", 12: "b", 13: "c"}
    return {names[o]: f"198.51.100.{o}" for o in octets}


def make(
    mode: str,
    tunnel_peers: dict[IPv4Address, int],
    ipcache: dict[Any, Any],
    pod_cidrs: dict[str, PodRange] | None = None,
    underlays: dict[str, str] | None = None,
) -> Peers:
    return Peers(
        node("self", 11, time.time()),
        mode,
        IPCacheSync(ipcache),
        tunnel_peers,
        pod_cidrs=given(11, 12, 13) if pod_cidrs is None else pod_cidrs,
        underlays=recorded(11, 12, 13) if underlays is None else underlays,
    )


@pytest.mark.parametrize("mode", ["tunnel", "native"])
async def test_join_expire_rejoin_leave(node_ns: Path, mode: str) -> None:
    tunnel_peers: dict[IPv4Address, int] = {}
    ipcache: dict[Any, Any] = {}
    peers = make(mode, tunnel_peers, ipcache)

    async def reconcile() -> dict[str, tuple[str, str | None]]:
        await asyncio.to_thread(netns.in_netns, node_ns, peers._apply, peers.desired())
        return await asyncio.to_thread(netns.in_netns, node_ns, _routes)

    peers.on_node(event(node("self", 11, time.time()), "self"))  # itself: ignored
    peers.on_node(event(node("b", 12, time.time()), "b"))
    routes = await reconcile()
    b_address = IPv4Address("198.51.100.12")
    # a tunnel peer in both modes: in native routing only node-port clients it forwards
    # travel in the tunnel (bpf/nodeport.h)
    assert tunnel_peers == {b_address: 1}
    if mode == "native":
        assert routes == {"10.9.12.0/24": ("unicast", "198.51.100.12")}
    else:
        assert routes == {}
    remote_node = IPCacheValue(identities.REMOTE_NODE, b_address)
    assert ipcache[IPv4Network("198.51.100.12/32")] == remote_node

    # the failure detector says it is dead: unreachable, whatever the mode; no tunnel to it
    peers.on_liveness(verdict("b", False))
    assert [row["alive"] for row in peers.table()] == [False]
    assert await reconcile() == {"10.9.12.0/24": ("unreachable", None)}
    assert tunnel_peers == {}

    # back, then gone for good (a graceful leave): nothing of it stays
    peers.on_liveness(verdict("b", True))
    assert "10.9.12.0/24" in await reconcile() or mode == "tunnel"
    assert tunnel_peers == {b_address: 1}
    peers.on_node(event(None, "b"))
    assert await reconcile() == {}
    assert tunnel_peers == {} and ipcache == {}


async def test_routes_follow_the_pod_cidr_the_identity_service_gave(node_ns: Path) -> None:
    """Node b's record claims c's pod CIDR (a compromised agent may write its own record):
    native routing still routes b's own CIDR via b, never c's; a node the identity service
    has given no CIDR yet gets nothing, and gets its routes once it has one."""
    tunnel_peers: dict[IPv4Address, int] = {}
    pod_cidrs = given(11, 12)
    peers = make("native", tunnel_peers, {}, pod_cidrs)

    async def reconcile() -> dict[str, tuple[str, str | None]]:
        await asyncio.to_thread(netns.in_netns, node_ns, peers._apply, peers.desired())
        return await asyncio.to_thread(netns.in_netns, node_ns, _routes)

    claiming = msgspec.structs.replace(node("b", 12, time.time()), pod_cidr="10.9.13.0/24")
    peers.on_node(event(claiming, "b"))
    peers.on_node(event(node("c", 13, time.time()), "c"))  # not in pod-cidrs yet
    before = CIDR_MISMATCHES._value.get()
    assert await reconcile() == {"10.9.12.0/24": ("unicast", "198.51.100.12")}
    assert await reconcile() == {"10.9.12.0/24": ("unicast", "198.51.100.12")}
    assert CIDR_MISMATCHES._value.get() == before + 1  # once per claim
    assert tunnel_peers == {IPv4Address("198.51.100.12"): 1}
    pod_cidrs.update(given(13))
    assert await reconcile() == {
        "10.9.12.0/24": ("unicast", "198.51.100.12"),
        "10.9.13.0/24": ("unicast", "198.51.100.13"),
    }
    peers.on_node(event(None, "b"))
    peers.on_node(event(None, "c"))
    assert await reconcile() == {}


@pytest.mark.parametrize("mode", ["tunnel", "native"])
async def test_tunnels_and_routes_follow_the_underlay_the_identity_service_recorded(
    node_ns: Path, mode: str
) -> None:
    """Node c's record claims b's underlay address (a compromised agent may write its own
    record): b's tunnel endpoint, route and remote-node entry stay b's, and c gets nothing
    while the identity service has recorded no address for it, then its recorded one."""
    tunnel_peers: dict[IPv4Address, int] = {}
    ipcache: dict[Any, Any] = {}
    underlays = recorded(11, 12)
    peers = make(mode, tunnel_peers, ipcache, underlays=underlays)

    async def reconcile() -> dict[str, tuple[str, str | None]]:
        await asyncio.to_thread(netns.in_netns, node_ns, peers._apply, peers.desired())
        return await asyncio.to_thread(netns.in_netns, node_ns, _routes)

    b_address = IPv4Address("198.51.100.12")
    peers.on_node(event(node("b", 12, time.time()), "b"))
    b_routes = await reconcile()
    b_state = (dict(tunnel_peers), dict(ipcache))
    claiming = msgspec.structs.replace(node("c", 13, time.time()), underlay_ip=str(b_address))
    peers.on_node(event(claiming, "c"))
    assert await reconcile() == b_routes  # c has no recorded address: nothing for it
    assert (tunnel_peers, ipcache) == b_state
    underlays.update(recorded(13))
    before = UNDERLAY_MISMATCHES._value.get()
    routes = await reconcile()
    await reconcile()
    assert UNDERLAY_MISMATCHES._value.get() == before + 1  # once per claim
    c_address = IPv4Address("198.51.100.13")
    assert tunnel_peers == {b_address: 1, c_address: 1}
    assert ipcache[IPv4Network(f"{b_address}/32")] == IPCacheValue(
        identities.REMOTE_NODE, b_address
    )
    assert ipcache[IPv4Network(f"{c_address}/32")] == IPCacheValue(
        identities.REMOTE_NODE, c_address
    )
    if mode == "native":
        assert routes == {
            "10.9.12.0/24": ("unicast", "198.51.100.12"),
            "10.9.13.0/24": ("unicast", "198.51.100.13"),
        }
    # c leaves: b keeps everything
    peers.on_node(event(None, "c"))
    assert await reconcile() == b_routes
    assert (tunnel_peers, ipcache) == b_state


def test_a_bad_node_entry_is_ignored() -> None:
    peers = make("tunnel", {}, {})
    peers.on_node(KVEvent(key="x", value=b"{not json", revision=1))
    bad = msgspec.json.encode(node("x", 13, time.time())).replace(b"10.9.13.0/24", b"nonsense")
    peers.on_node(KVEvent(key="x", value=bad, revision=1))
    assert peers.nodes == {}
