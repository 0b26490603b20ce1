"""Kernel plumbing of the local cluster (shared.netns) against the real kernel.

Builds an underlay bridge in the root namespace, two node namespaces on it and, in the first
node, a router device and pods wired with real veths, then proves the wiring with real ICMP
between pods, node and router, node and node, and checks that the root namespace blackholes
the cluster's ranges. Node-side calls run through ``in_netns``, as the agent runs inside its node.

All traffic stays inside namespaces this module creates (underlay 172.31.N.0/24, pods and
services 10.250.N.0/24 with N random in 200..249); the only packets aimed from the root
namespace go to blackholed addresses, and only after the blackhole is proven, so they never
leave the machine. Every namespace, link and route is removed afterwards, also on failure.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.netns import (
    NETNS_DIR,
    WiredEndpoint,
    delete_netns,
    endpoint_wired,
    ensure_netns,
    ensure_node,
    ensure_router,
    ensure_underlay,
    host_ifname_for,
    in_netns,
    list_netns,
    netns_path,
    remove_node,
    remove_underlay,
    unwire_endpoint,
    wire_endpoint,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates netns, veths, routes)"),
]

RTN_BLACKHOLE = 6
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
IFF_UP = 0x1
ROUTER_DEVICE = "mbr_host"


@dataclass
class Cluster:
    prefix: str  # of every namespace and root-namespace link of this cluster
    bridge: str
    gateway: IPv4Interface
    blackholes: tuple[IPv4Network, ...]  # pods, then services
    nodes: tuple[str, str]  # namespace names
    root_ifnames: tuple[str, str]
    node_addrs: tuple[IPv4Interface, IPv4Interface]
    router: IPv4Address
    pods: tuple[str, str]  # namespace names, both wired into nodes[0]
    pod_ips: tuple[IPv4Address, IPv4Address]
    host_ifnames: tuple[str, str]
    wired: tuple[WiredEndpoint, ...] = ()

    def pod_ip(self, n: int) -> IPv4Address:
        """The n-th address of the pod range (10 and 11 are taken, 1 is the router)."""
        return self.blackholes[0][n]


def plan() -> Cluster:
    """Unique names and a random /24 pair no route of the machine uses yet (a module's
    cluster and parallel runs are alive at the same time), so that runs do not collide."""
    prefix = f"mbt{secrets.token_hex(2)}"
    taken = {r["dst"] for r in routes()}
    octet = secrets.choice([o for o in range(200, 250) if f"172.31.{o}.0/24" not in taken])
    pods_net = IPv4Network(f"10.250.{octet}.0/25")
    return Cluster(
        prefix=prefix,
        bridge=f"{prefix}br",
        gateway=IPv4Interface(f"172.31.{octet}.1/24"),
        blackholes=(pods_net, IPv4Network(f"10.250.{octet}.128/25")),
        nodes=(f"{prefix}-n1", f"{prefix}-n2"),
        root_ifnames=(f"{prefix}n1", f"{prefix}n2"),
        node_addrs=(
            IPv4Interface(f"172.31.{octet}.11/24"),
            IPv4Interface(f"172.31.{octet}.12/24"),
        ),
        router=pods_net[1],
        pods=(f"{prefix}-pa", f"{prefix}-pb"),
        pod_ips=(pods_net[10], pods_net[11]),
        host_ifnames=(host_ifname_for(f"{prefix}/a"), host_ifname_for(f"{prefix}/b")),
    )


def build(cluster: Cluster) -> None:
    ensure_underlay(cluster.bridge, cluster.gateway, cluster.blackholes)
    for node, addr, root_if in zip(
        cluster.nodes, cluster.node_addrs, cluster.root_ifnames, strict=True
    ):
        ensure_node(node, cluster.bridge, addr, root_if)
    in_netns(cluster.nodes[0], ensure_router, ROUTER_DEVICE, cluster.router)
    cluster.wired = wire_pods(cluster)


def wire_pods(cluster: Cluster) -> tuple[WiredEndpoint, ...]:
    return tuple(
        in_netns(
            cluster.nodes[0], wire_endpoint, ensure_netns(pod), "eth0", host, ip, cluster.router
        )
        for pod, host, ip in zip(cluster.pods, cluster.host_ifnames, cluster.pod_ips, strict=True)
    )


def teardown(cluster: Cluster) -> None:
    """Remove all the cluster made, each step on its own so that one failure skips none."""
    steps: list[tuple[Any, ...]] = [
        *(
            (remove_node, node, root_if)
            for node, root_if in zip(cluster.nodes, cluster.root_ifnames, strict=True)
        ),
        *((delete_netns, name) for name in list_netns(cluster.prefix)),
        (remove_underlay, cluster.bridge, cluster.blackholes),
    ]
    errors: list[Exception] = []
    for fn, *args in steps:
        try:
            fn(*args)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    planned = plan()
    try:
        build(planned)
        yield planned
    finally:
        teardown(planned)


# --- helpers ---------------------------------------------------------------------------------


def ping(netns: str, dst: IPv4Address | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={netns_path(netns)}", "ping", "-n", "-c1", "-W1", str(dst)],
        capture_output=True,
        text=True,
        timeout=10,
    )


def assert_ping(netns: str, dst: IPv4Address | str) -> None:
    result = ping(netns, dst)
    assert result.returncode == 0, f"ping {dst} from {netns}: {result.stdout}{result.stderr}"


def links() -> dict[str, Any]:
    """name -> link message, in the calling thread's namespace."""
    with IPRoute() as ipr:
        return {link.get("ifname"): link for link in ipr.link("dump")}


def link_names() -> dict[str, int]:
    return {name: int(link["index"]) for name, link in links().items()}


def addresses(ifname: str) -> set[IPv4Interface]:
    with IPRoute() as ipr:
        index = ipr.link("get", ifname=ifname)[0]["index"]
        return {
            IPv4Interface(f"{a.get('local')}/{a['prefixlen']}")
            for a in ipr.addr("dump", index=index, family=socket.AF_INET)
        }


def routes() -> list[dict[str, Any]]:
    """The main table as plain dicts, in the calling thread's namespace."""
    with IPRoute() as ipr:
        return [
            {
                "dst": f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}",
                "type": r["type"],
                "scope": r["scope"],
                "oif": r.get("oif"),
                "gateway": r.get("gateway"),
                "flags": r["flags"],
            }
            for r in ipr.route("dump", family=socket.AF_INET, table=254)
        ]


def sysctl(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()


def write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value)


def blackholes_in_root(nets: tuple[IPv4Network, ...]) -> set[str]:
    wanted = {str(n) for n in nets}
    return {r["dst"] for r in routes() if r["type"] == RTN_BLACKHOLE and r["dst"] in wanted}


# --- connectivity with real packets ----------------------------------------------------------


def test_pods_on_one_node_reach_each_other(cluster: Cluster) -> None:
    assert_ping(cluster.pods[0], cluster.pod_ips[1])
    assert_ping(cluster.pods[1], cluster.pod_ips[0])


def test_pod_reaches_its_router_and_node_reaches_pod(cluster: Cluster) -> None:
    assert_ping(cluster.pods[0], cluster.router)
    assert_ping(cluster.nodes[0], cluster.pod_ips[1])


def test_nodes_reach_each_other_over_the_underlay(cluster: Cluster) -> None:
    assert_ping(cluster.nodes[0], cluster.node_addrs[1].ip)
    assert_ping(cluster.nodes[1], cluster.node_addrs[0].ip)


def test_root_namespace_blackholes_the_cluster_ranges(cluster: Cluster) -> None:
    assert blackholes_in_root(cluster.blackholes) == {str(n) for n in cluster.blackholes}
    for net in cluster.blackholes:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with probe, pytest.raises(OSError) as raised:
            # connect() only looks the route up; nothing is sent.
            probe.connect((str(net[5]), 9))
        assert raised.value.errno == errno.EINVAL, f"{net} is not blackholed in the root netns"
    # Proven blackholed above, so this echo request can never leave the machine.
    result = subprocess.run(
        ["ping", "-n", "-c1", "-W1", str(cluster.pod_ips[0])],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr  # refused by the route lookup, never sent


# --- configuration as the kernel sees it -----------------------------------------------------


def test_underlay_bridge(cluster: Cluster) -> None:
    bridge = links()[cluster.bridge]
    assert bridge.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge"
    assert bridge["flags"] & IFF_UP
    assert addresses(cluster.bridge) == {cluster.gateway}
    assert sysctl(f"net/ipv6/conf/{cluster.bridge}/disable_ipv6") == "1"
    for root_if in cluster.root_ifnames:
        port = links()[root_if]
        assert port.get("master") == bridge["index"]
        assert port["flags"] & IFF_UP


def test_node_namespace(cluster: Cluster) -> None:
    def inspect() -> dict[str, Any]:
        return {
            "links": links(),
            "eth0": addresses("eth0"),
            "routes": routes(),
            "sysctls": {
                key: sysctl(key)
                for key in (
                    "net/ipv4/ip_forward",
                    "net/ipv4/conf/all/rp_filter",
                    "net/ipv4/conf/default/rp_filter",
                    "net/ipv4/conf/all/send_redirects",
                    "net/ipv6/conf/all/disable_ipv6",
                )
            },
        }

    for node, addr in zip(cluster.nodes, cluster.node_addrs, strict=True):
        seen = in_netns(node, inspect)
        assert seen["eth0"] == {addr}
        assert seen["links"]["eth0"]["flags"] & IFF_UP
        assert seen["links"]["lo"]["flags"] & IFF_UP
        assert seen["sysctls"] == {
            "net/ipv4/ip_forward": "1",
            "net/ipv4/conf/all/rp_filter": "0",
            "net/ipv4/conf/default/rp_filter": "0",
            "net/ipv4/conf/all/send_redirects": "0",
            "net/ipv6/conf/all/disable_ipv6": "1",
        }
        assert not [r for r in seen["routes"] if r["dst"] == "0.0.0.0/0"], "default route"
    router_links = in_netns(cluster.nodes[0], links)
    assert router_links[ROUTER_DEVICE]["flags"] & IFF_UP
    assert in_netns(cluster.nodes[0], addresses, ROUTER_DEVICE) == {
        IPv4Interface(f"{cluster.router}/32")
    }


def test_wired_endpoints(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    node_links = in_netns(node, links)
    node_routes = in_netns(node, routes)
    for pod, ip, host, wired in zip(
        cluster.pods, cluster.pod_ips, cluster.host_ifnames, cluster.wired, strict=True
    ):
        host_link = node_links[host]
        assert wired.host_ifname == host
        assert wired.host_ifindex == host_link["index"]
        assert wired.host_mac == host_link.get("address")
        assert host_link["flags"] & IFF_UP
        assert {"dst": f"{ip}/32", "oif": wired.host_ifindex, "scope": RT_SCOPE_LINK}.items() <= (
            next(r for r in node_routes if r["dst"] == f"{ip}/32").items()
        )
        assert in_netns(node, sysctl, f"net/ipv4/conf/{host}/rp_filter") == "0"
        assert in_netns(node, sysctl, f"net/ipv6/conf/{host}/disable_ipv6") == "1"

        pod_links = in_netns(pod, links)
        assert pod_links["eth0"].get("address") == wired.pod_mac
        assert pod_links["eth0"]["flags"] & IFF_UP
        assert pod_links["lo"]["flags"] & IFF_UP
        assert in_netns(pod, addresses, "eth0") == {IPv4Interface(f"{ip}/32")}
        pod_routes = {r["dst"]: r for r in in_netns(pod, routes)}
        assert set(pod_routes) == {"0.0.0.0/0", f"{cluster.router}/32"}
        assert pod_routes[f"{cluster.router}/32"]["scope"] == RT_SCOPE_LINK
        assert pod_routes["0.0.0.0/0"]["gateway"] == str(cluster.router)
        assert pod_routes["0.0.0.0/0"]["flags"] & RTNH_F_ONLINK
        assert in_netns(node, endpoint_wired, netns_path(pod), "eth0", host, ip)


def test_endpoint_wired_detects_mismatches(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    pod_a, pod_b = (netns_path(p) for p in cluster.pods)
    host_a = cluster.host_ifnames[0]
    ip_a = cluster.pod_ips[0]
    assert in_netns(node, endpoint_wired, pod_a, "eth0", host_a, ip_a)
    assert not in_netns(node, endpoint_wired, pod_a, "eth0", host_a, cluster.pod_ips[1])
    assert not in_netns(node, endpoint_wired, pod_a, "eth1", host_a, ip_a)
    # B's eth0 is a veth too, but not host_a's peer.
    assert not in_netns(node, endpoint_wired, pod_b, "eth0", host_a, ip_a)
    assert not in_netns(node, endpoint_wired, pod_a, "eth0", "lxcnosuchdev", ip_a)
    assert not in_netns(
        node, endpoint_wired, NETNS_DIR / f"{cluster.prefix}-gone", "eth0", host_a, ip_a
    )
    # From the root namespace host_a does not exist.
    assert not endpoint_wired(pod_a, "eth0", host_a, ip_a)


# --- idempotency and reconciliation ----------------------------------------------------------


def test_ensure_and_wire_twice_change_nothing(cluster: Cluster) -> None:
    def ours(r: dict[str, Any]) -> bool:
        return r["dst"] in {str(n) for n in cluster.blackholes} or r["oif"] == bridge_index

    bridge_index = link_names()[cluster.bridge]

    def state() -> tuple[Any, ...]:
        return (
            {k: v for k, v in link_names().items() if k.startswith(cluster.prefix)},
            sorted(str(r) for r in routes() if ours(r)),
            in_netns(cluster.nodes[0], link_names),
            sorted(map(str, in_netns(cluster.nodes[0], routes))),
            in_netns(cluster.nodes[1], link_names),
            [in_netns(pod, link_names) for pod in cluster.pods],
            [sorted(map(str, in_netns(pod, routes))) for pod in cluster.pods],
        )

    before = state()
    for _ in range(2):
        ensure_underlay(cluster.bridge, cluster.gateway, cluster.blackholes)
        for node, addr, root_if in zip(
            cluster.nodes, cluster.node_addrs, cluster.root_ifnames, strict=True
        ):
            ensure_node(node, cluster.bridge, addr, root_if)
        in_netns(cluster.nodes[0], ensure_router, ROUTER_DEVICE, cluster.router)
        assert wire_pods(cluster) == cluster.wired
    assert state() == before
    assert_ping(cluster.pods[0], cluster.pod_ips[1])


def test_wire_replaces_a_stale_host_link_and_a_moved_peer(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    host = host_ifname_for(f"{cluster.prefix}/c")
    pod_c, pod_d = f"{cluster.prefix}-pc", f"{cluster.prefix}-pd"
    ip_c = cluster.pod_ip(20)

    def make_stale() -> None:  # a leftover whose peer never reached a pod
        with IPRoute() as ipr:
            ipr.link("add", ifname=host, kind="veth", peer=f"{cluster.prefix}x")

    try:
        path_c, path_d = ensure_netns(pod_c), ensure_netns(pod_d)
        in_netns(node, make_stale)
        stale_index = in_netns(node, link_names)[host]
        wired = in_netns(node, wire_endpoint, path_c, "eth0", host, ip_c, cluster.router)
        assert wired.host_ifindex != stale_index
        assert f"{cluster.prefix}x" not in in_netns(node, link_names)
        assert in_netns(node, endpoint_wired, path_c, "eth0", host, ip_c)
        assert_ping(cluster.pods[0], ip_c)

        # The same host name wired to another pod: the old pair goes, C loses its eth0.
        moved = in_netns(node, wire_endpoint, path_d, "eth0", host, ip_c, cluster.router)
        assert moved.host_ifindex != wired.host_ifindex
        assert "eth0" not in in_netns(pod_c, link_names)
        assert_ping(pod_d, cluster.pod_ips[0])

        # A new address on the same pair: the old one and its host route are gone.
        ip_new = cluster.pod_ip(21)
        again = in_netns(node, wire_endpoint, path_d, "eth0", host, ip_new, cluster.router)
        assert again == moved
        assert in_netns(pod_d, addresses, "eth0") == {IPv4Interface(f"{ip_new}/32")}
        host_routes = [r["dst"] for r in in_netns(node, routes) if r["oif"] == again.host_ifindex]
        assert host_routes == [f"{ip_new}/32"]
        assert_ping(cluster.pods[0], ip_new)
    finally:
        in_netns(node, unwire_endpoint, host)
        delete_netns(pod_c)
        delete_netns(pod_d)


def test_wire_into_a_namespace_given_by_a_process_path(cluster: Cluster) -> None:
    """A pod namespace owned by a process (what a container runtime hands over), not a name."""
    node = cluster.nodes[0]
    host = host_ifname_for(f"{cluster.prefix}/proc")
    ip = cluster.pod_ip(50)
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        path = Path(f"/proc/{holder.pid}/ns/net")
        deadline = time.monotonic() + 5
        while os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            assert time.monotonic() < deadline, "unshare never entered a new namespace"
            time.sleep(0.01)
        wired = in_netns(node, wire_endpoint, path, "eth0", host, ip, cluster.router)
        assert in_netns(node, wire_endpoint, path, "eth0", host, ip, cluster.router) == wired
        assert in_netns(node, endpoint_wired, path, "eth0", host, ip)
        assert_ping(cluster.pods[0], ip)
    finally:
        holder.kill()
        holder.wait()
        in_netns(node, unwire_endpoint, host)


def test_wire_refuses_a_foreign_pod_interface(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    pod = f"{cluster.prefix}-pf"
    host = host_ifname_for(f"{cluster.prefix}/f")

    def foreign_eth0() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer="other")

    try:
        path = ensure_netns(pod)
        in_netns(path, foreign_eth0)
        with pytest.raises(AlreadyExists):
            in_netns(node, wire_endpoint, path, "eth0", host, cluster.pod_ip(30), cluster.router)
        assert host not in in_netns(node, link_names)
        assert {"eth0", "other"} <= set(in_netns(path, link_names))
    finally:
        delete_netns(pod)


def test_unwire_removes_link_route_and_peer(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    pod = f"{cluster.prefix}-pu"
    host = host_ifname_for(f"{cluster.prefix}/u")
    ip = cluster.pod_ip(40)
    default_rp = "net/ipv4/conf/default/rp_filter"
    try:
        path = ensure_netns(pod)
        # A node whose new devices would get strict reverse-path filtering.
        in_netns(node, write_sysctl, default_rp, "1")
        in_netns(node, wire_endpoint, path, "eth0", host, ip, cluster.router)
        assert in_netns(node, sysctl, f"net/ipv4/conf/{host}/rp_filter") == "0"
        assert_ping(cluster.pods[0], ip)

        in_netns(node, unwire_endpoint, host)
        assert host not in in_netns(node, link_names)
        assert f"{ip}/32" not in {r["dst"] for r in in_netns(node, routes)}
        assert "eth0" not in in_netns(pod, link_names)
        assert not in_netns(node, endpoint_wired, path, "eth0", host, ip)
        # The node has no route to it any more (and no default route): refused at once.
        result = ping(cluster.pods[0], ip)
        assert result.returncode != 0
        assert "Unreachable" in result.stdout, result.stdout
        in_netns(node, unwire_endpoint, host)  # already gone: a no-op
    finally:
        in_netns(node, write_sysctl, default_rp, "0")
        in_netns(node, unwire_endpoint, host)
        delete_netns(pod)


# --- namespaces, teardown and small helpers --------------------------------------------------


def test_teardown_leaves_nothing() -> None:
    cluster = plan()
    # Another cluster on this machine (another test run) may use the same /24; what is left
    # is judged by this cluster's own objects, never by the machine's global tables.
    neighbour = f"{cluster.prefix}nb"
    try:
        build(cluster)
        bridge_index = link_names()[cluster.bridge]
        with IPRoute() as ipr:
            ipr.link("add", ifname=neighbour, kind="bridge")
            index = ipr.link_lookup(ifname=neighbour)[0]
            ipr.addr("add", index=index, address=str(cluster.gateway.ip), prefixlen=24)
            ipr.link("set", index=index, state="up")
        assert set(list_netns(cluster.prefix)) == {*cluster.nodes, *cluster.pods}
        for pod in cluster.pods:
            delete_netns(pod)
        for node, root_if in zip(cluster.nodes, cluster.root_ifnames, strict=True):
            for _ in range(2):
                remove_node(node, root_if)
                assert root_if not in link_names()
                assert not netns_path(node).exists()
        assert list_netns(cluster.prefix) == []
        for _ in range(2):
            remove_underlay(cluster.bridge, cluster.blackholes)
            assert cluster.bridge not in link_names()
            assert blackholes_in_root(cluster.blackholes) == set()
        assert [name for name in link_names() if name.startswith(cluster.prefix)] == [neighbour]
        assert not [r for r in routes() if r["oif"] == bridge_index]
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=neighbour):
                ipr.link("del", index=index)
        teardown(cluster)


def test_ensure_netns_is_idempotent_and_replaces_a_stale_file() -> None:
    name = f"mbt{secrets.token_hex(2)}-ns"
    path = netns_path(name)
    try:
        assert ensure_netns(name) == path
        inode = path.stat().st_ino
        assert ensure_netns(name) == path
        assert path.stat().st_ino == inode  # the same namespace, not a new one
        assert in_netns(name, links)["lo"]["flags"] & IFF_UP
        assert list_netns(name) == [name]

        delete_netns(name)
        delete_netns(name)
        assert not path.exists()
        path.touch()  # what a crash between creating the mount point and binding it leaves
        ensure_netns(name)
        assert in_netns(name, links)["lo"]["flags"] & IFF_UP
    finally:
        delete_netns(name)
    assert list_netns(name) == []


def test_deleting_a_namespace_kills_its_processes_and_no_others() -> None:
    name = f"mbt{secrets.token_hex(2)}-px"
    other = f"mbt{secrets.token_hex(2)}-py"
    inside = outside = elsewhere = None
    try:
        ensure_netns(other)
        inside = subprocess.Popen(["nsenter", f"--net={ensure_netns(name)}", "sleep", "300"])
        elsewhere = subprocess.Popen(["nsenter", f"--net={netns_path(other)}", "sleep", "300"])
        outside = subprocess.Popen(["sleep", "300"])
        deadline = time.monotonic() + 5
        while Path(f"/proc/{inside.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        delete_netns(name)
        assert inside.wait(timeout=5) == -9
        assert outside.poll() is None and elsewhere.poll() is None
        assert not netns_path(name).exists()
    finally:
        for proc in (inside, outside, elsewhere):
            if proc is not None:
                proc.kill()
                proc.wait()
        delete_netns(name)
        delete_netns(other)


def test_in_netns_runs_in_the_namespace_and_leaves_the_caller_alone() -> None:
    name = f"mbt{secrets.token_hex(2)}-in"
    own = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        path = ensure_netns(name)
        assert in_netns(name, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == (
            path.stat().st_ino
        )
        assert in_netns(path, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == (
            path.stat().st_ino
        )
        assert os.stat("/proc/thread-self/ns/net").st_ino == own
        assert set(in_netns(name, link_names)) == {"lo"}

        def boom() -> None:
            raise KeyError("inside")

        with pytest.raises(KeyError, match="inside"):
            in_netns(name, boom)
    finally:
        delete_netns(name)
    with pytest.raises(NotFound):
        in_netns(name, link_names)


def test_bad_names_and_missing_bridge_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        netns_path("../etc")
    name = f"mbt{secrets.token_hex(2)}-nb"
    address = IPv4Interface("172.31.0.9/24")
    try:
        with pytest.raises(InvalidArgument):
            ensure_node(name, "nobridge", address, "x" * 16)
        with pytest.raises(NotFound):
            ensure_node(name, f"{name}br", address, f"{name}r")
        assert f"{name}r" not in link_names()
    finally:
        delete_netns(name)


def test_an_existing_device_of_another_kind_is_never_replaced(cluster: Cluster) -> None:
    index = link_names()[cluster.bridge]
    node = f"{cluster.prefix}-nx"
    try:
        with pytest.raises(AlreadyExists):
            ensure_node(node, cluster.bridge, IPv4Interface("172.31.0.9/24"), cluster.bridge)
        with pytest.raises(AlreadyExists):
            ensure_router(cluster.bridge, cluster.router)
        with pytest.raises(InvalidArgument):
            unwire_endpoint(cluster.bridge)
        with pytest.raises(InvalidArgument):
            remove_node(node, cluster.bridge)
    finally:
        delete_netns(node)
    assert link_names()[cluster.bridge] == index
    assert links()[cluster.bridge].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge"


def test_host_ifname_for_is_stable_and_short() -> None:
    name = host_ifname_for("default/web-1")
    assert name == host_ifname_for("default/web-1")
    assert name != host_ifname_for("default/web-2")
    assert name.startswith("lxc") and len(name) == 14
    int(name[3:], 16)
