"""Three nodes, both routing modes: cross-node traffic, identity policy on the receiving node,
the identity in the VNI, forged VXLAN frames and forged sources (from a pod and from the
underlay), node health, a node killed and brought back.

One cluster serves the module. It comes up in tunnel mode; when the tunnel-mode tests are done
it is switched to native routing by ``down`` + ``up --routing native`` on the same state
directory, and the same manifests are applied again (the switch is itself under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from membrane.state import StateDir
from shared import netns, reasons
from shared.bus import Bus
from shared.proxy import PROXY_PORT, from_proxy_mark
from tests.conftest import eventually, membrane_command
from tests.e2e.cluster import (
    PROBE,
    Cluster,
    create_pod,
    down_leaving_nothing,
    free_octet,
    pod_info,
    until,
    up,
)
from tests.e2e.test_datapath import FlowTap

pytestmark = [pytest.mark.e2e, pytest.mark.root]

UNDERLAY_TOOL = Path(__file__).with_name("underlay.py")
VXLAN_PORT = 8472
NODES = 3


def manifest(cluster: Cluster) -> str:
    """Pods on three nodes and a policy: the server takes anything from the client only."""
    n1, n2, n3 = cluster.nodes
    pods = [("mn-client", n1), ("mn-server", n2), ("mn-other", n3)]
    docs = [
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\n"
        f"spec:\n  nodeName: {node}\n  containers: [{{name: c, image: none}}]\n"
        for name, node in pods
    ]
    docs.append(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: mn-server\n"
        "spec:\n  endpointSelector:\n    matchLabels: {app: mn-server}\n  ingress:\n"
        "  - fromEndpoints:\n    - matchLabels: {app: mn-client}\n"
    )
    return "---\n".join(docs)


def apply_manifest(cluster: Cluster) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(manifest(cluster))
    try:
        cluster.run("apply", "-f", f.name, timeout=120)
    finally:
        os.unlink(f.name)


def up_with_manifest(cluster: Cluster, octet: int, routing: str) -> None:
    up(cluster, octet, routing)
    apply_manifest(cluster)


_running: dict[str, Any] = {}  # the cluster that carries over from tunnel to native mode


@pytest.fixture(scope="module", params=["tunnel", "native"])
def multinode(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    mode: str = request.param
    previous = _running.pop("cluster", None)
    if previous is None:
        state = tmp_path_factory.mktemp("multinode") / "state"
        cluster = Cluster(state=state, name="m" + secrets.token_hex(3), nats_url="")
        cluster.node_count = NODES
        octet = free_octet()
    else:
        cluster, octet = previous
    up_with_manifest(cluster, octet, mode)
    try:
        yield cluster, mode
    finally:
        if mode == "tunnel":
            # the switch: down without purge, the next mode comes up on the same state
            down = cluster.run("down", check=False, timeout=120)
            assert down.returncode == 0, down.stderr
            _running["cluster"] = (cluster, octet)
        else:
            down_leaving_nothing(cluster)


@pytest.fixture
async def bus(multinode: tuple[Cluster, str]) -> AsyncIterator[Bus]:
    client = await Bus.connect(multinode[0].nats_url, "test", retry_for=5)
    yield client
    await client.close()


def pods(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {name: pod_info(cluster, name) for name in ("mn-client", "mn-server", "mn-other")}


def in_node(node: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", node, sys.executable, str(UNDERLAY_TOOL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Sniffer:
    """Captures the VXLAN packets arriving on a node's underlay interface."""

    def __init__(self, node: str, seconds: float) -> None:
        tool = [sys.executable, str(UNDERLAY_TOOL)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", node, *tool, "sniff", "eth0", str(VXLAN_PORT), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def packets(self) -> list[list[Any]]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        result: list[list[Any]] = json.loads(out)
        return result


def test_cross_node_tcp_udp_icmp(multinode: tuple[Cluster, str]) -> None:
    cluster, _ = multinode
    p = pods(cluster)
    server = str(p["mn-server"]["ip"])
    assert p["mn-client"]["node"] != p["mn-server"]["node"]
    servers = [
        cluster.background("mn-server", "serve", "tcp", "8080"),
        cluster.background("mn-server", "serve", "udp", "8081"),
        cluster.background("mn-other", "serve", "tcp", "8080"),
    ]
    try:
        assert "pong ping" in cluster.probe("mn-client", "tcp", server, "8080").stdout
        assert "pong ping" in cluster.probe("mn-client", "udp", server, "8081").stdout
        ping = cluster.run(
            "pod", "exec", "mn-client", "--", "ping", "-c", "2", "-W", "2", server, check=False
        )
        assert ping.returncode == 0, ping.stdout
        # the other direction and the third node: the server has no egress policy
        other = str(p["mn-other"]["ip"])
        assert "pong ping" in cluster.probe("mn-server", "tcp", other, "8080").stdout
    finally:
        for proc in servers:
            proc.kill()


def test_a_service_backend_on_another_node_answers_through_the_cluster_ip(
    multinode: tuple[Cluster, str],
) -> None:
    # the client's node translates the request; the reply comes back over the overlay (or the
    # underlay) and must get the service address back before the client sees it
    cluster, _ = multinode
    p = pods(cluster)
    assert p["mn-client"]["node"] != p["mn-server"]["node"]
    info = StateDir(cluster.state).read_cluster()
    assert info is not None
    vip = str(IPv4Network(info.service_cidr).network_address + 77)
    server = str(p["mn-server"]["ip"])
    cluster.run(
        "service", "create", "xnode", "--frontend", f"{vip}:80/TCP", "--backend", f"{server}:8080"
    )
    proc = cluster.background("mn-server", "serve", "tcp", "8080")
    try:
        deadline = time.monotonic() + 20
        while True:
            answer = cluster.probe("mn-client", "tcp", vip, "80")
            if "pong ping" in answer.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "pong ping" in answer.stdout, answer.stdout + answer.stderr
    finally:
        proc.kill()
        cluster.run("service", "delete", "xnode", check=False)


async def test_policy_enforced_on_the_receiving_node(
    multinode: tuple[Cluster, str], bus: Bus
) -> None:
    cluster, mode = multinode
    p = pods(cluster)
    server = str(p["mn-server"]["ip"])
    other_id = int(p["mn-other"]["identity"])
    server_id = int(p["mn-server"]["identity"])
    tap = FlowTap()
    await tap.start(bus)
    proc = cluster.background("mn-server", "serve", "tcp", "8080")
    try:
        allowed = await asyncio.to_thread(cluster.probe, "mn-client", "tcp", server, "8080")
        assert "pong ping" in allowed.stdout
        denied = await asyncio.to_thread(cluster.probe, "mn-other", "tcp", server, "8080")
        assert denied.returncode == 1, denied.stdout

        async def drop_seen() -> dict[str, object]:
            found = tap.drops(src_identity=other_id, dst_identity=server_id, dst_port=8080)
            assert found
            return found[0]

        drop = await eventually(drop_seen, timeout=10, what="the policy drop of mn-other")
        assert drop["node"] == p["mn-server"]["node"]  # enforced where the server lives
        assert drop["reason"] == 133
        expected = "from-overlay" if mode == "tunnel" else "to-endpoint"
        assert drop["observation_point"] == expected
        client_id = int(p["mn-client"]["identity"])

        async def left_by_overlay() -> None:
            traces = [
                f
                for f in tap.flows
                if f["observation_point"] == "to-overlay"
                and f["src_identity"] == client_id
                and f["dst_identity"] == server_id
            ]
            if mode == "native":
                assert not traces
                return
            assert traces and traces[0]["node"] == p["mn-client"]["node"]
            assert traces[0]["verdict"] == "FORWARDED"

        await eventually(left_by_overlay, timeout=10, what="a to-overlay trace of the client")
    finally:
        await tap.sub.unsubscribe()
        proc.kill()


def test_vni_on_the_wire_is_the_senders_identity(multinode: tuple[Cluster, str]) -> None:
    cluster, mode = multinode
    p = pods(cluster)
    server = str(p["mn-server"]["ip"])
    client = str(p["mn-client"]["ip"])
    proc = cluster.background("mn-server", "serve", "tcp", "8080")
    sniffer = Sniffer(str(p["mn-server"]["node"]), 4)
    try:
        for _ in range(3):
            assert cluster.probe("mn-client", "tcp", server, "8080").returncode == 0
    finally:
        proc.kill()
    packets = sniffer.packets()
    if mode == "native":
        assert packets == [], "native routing must not encapsulate"
        return
    to_server = [pkt for pkt in packets if pkt[1] == client and pkt[2] == server]
    assert to_server, packets
    assert {pkt[0] for pkt in to_server} == {int(p["mn-client"]["identity"])}


def drops(cluster: Cluster, node: str, reason: int) -> int:
    rows = cluster.json("bpf", "metrics", "--node", node)[0]["rows"]
    return sum(int(r["packets"]) for r in rows if r["reason"] == reason)


def arrivals(cluster: Cluster, pods_: list[str], send: Callable[[], None]) -> list[str]:
    """How many distinct UDP datagrams each pod in ``pods_`` got on port 9000 while ``send``
    ran (each counter listens from before ``send`` until it is done)."""
    counters = [cluster.background(pod, "count", "9000", "eof") for pod in pods_]
    try:
        send()
        return [counter.communicate(timeout=30)[0].split()[-1] for counter in counters]
    finally:
        for counter in counters:
            counter.kill()


def intruder_ip(cluster: Cluster) -> str:
    """The underlay's address .9 (the bridge has .1, nodes start at .11)."""
    info = StateDir(cluster.state).read_cluster()
    assert info is not None
    return str(IPv4Network(info.underlay_cidr).network_address + 9)


@contextlib.contextmanager
def intruder(cluster: Cluster) -> Iterator[str]:
    """A host on the underlay bridge that is not a node (a namespace with intruder_ip);
    removed afterwards."""
    info = StateDir(cluster.state).read_cluster()
    assert info is not None
    name = f"{cluster.name}-intr"
    prefix = IPv4Network(info.underlay_cidr).prefixlen
    address = IPv4Interface(f"{intruder_ip(cluster)}/{prefix}")
    netns.ensure_node(name, f"{cluster.name}-br", address, f"{cluster.name}-ui")
    try:
        yield name
    finally:
        netns.remove_node(name, f"{cluster.name}-ui")


def test_a_pod_reaches_a_host_outside_the_cluster(multinode: tuple[Cluster, str]) -> None:
    # A host on the underlay that is not a node (world) and knows no pod range. Tunnel mode
    # masquerades (MEMBRANE_MASQUERADE auto): the host sees the pod's node's underlay address,
    # answers it, and the node hands the answer back to the pod (before: the SYN left with the
    # pod's address and nothing came back). Native routing does not (auto): with a route to
    # the pod range the host sees the pod's own address.
    cluster, mode = multinode
    client = pod_info(cluster, "mn-client")
    nodes = {n["name"]: n for n in cluster.json("status")["nodes"]}
    node = nodes[str(client["node"])]
    with intruder(cluster) as outside:
        servers = [
            subprocess.Popen(
                ["ip", "netns", "exec", outside, sys.executable, str(PROBE), "peer", proto, port],
                stdout=subprocess.PIPE,
                text=True,
            )
            for proto, port in (("tcp", "9700"), ("udp", "9701"))
        ]
        try:
            for server in servers:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            seen = node["underlay_ip"]
            if mode == "native":
                route = f"ip route add {node['pod_cidr']} via {node['underlay_ip']}"
                subprocess.run(["ip", "netns", "exec", outside, *route.split()], check=True)
                seen = client["ip"]
            target = intruder_ip(cluster)
            for proto, port in (("tcp", "9700"), ("udp", "9701")):
                result = cluster.probe("mn-client", proto, target, port)
                assert (result.returncode, result.stdout.strip()) == (0, seen), (proto, result)
            rows = cluster.json("bpf", "nat", "--node", str(client["node"]))[0]["rows"]
            masqueraded = {r["frontend_port"] for r in rows if r["kind"] == "masquerade"}
            assert masqueraded == ({9700, 9701} if mode == "tunnel" else set()), rows
        finally:
            for server in servers:
                server.kill()
                server.wait()


def tunnel_only(mode: str) -> None:
    if mode != "tunnel":
        pytest.skip("the overlay exists in tunnel mode only")


def test_forged_vxlan_from_a_pod_is_dropped(multinode: tuple[Cluster, str]) -> None:
    # A pod hands a VXLAN frame to its own node (the router, a broadcast address) and to another
    # node: VNI and inner source are the allowed client's, the inner packet goes to pods that
    # admit only that client. The frame must never reach a VXLAN device.
    cluster, _ = multinode  # native routing has the device too (node-port clients)
    p = pods(cluster)
    attacker_node = str(p["mn-other"]["node"])
    victim = create_pod(
        cluster, "mn-victim", "app=mn-server", node=cluster.nodes.index(attacker_node) + 1
    )
    try:
        nodes = {n["name"]: n for n in cluster.json("status")["nodes"]}
        client_id = str(p["mn-client"]["identity"])
        client_ip = str(p["mn-client"]["ip"])
        targets = {
            "router": (nodes[attacker_node]["router_ip"], str(victim["ip"])),
            "broadcast": ("255.255.255.255", str(victim["ip"])),
            "other node": (
                nodes[str(p["mn-server"]["node"])]["underlay_ip"],
                str(p["mn-server"]["ip"]),
            ),
        }
        before = drops(cluster, attacker_node, reasons.ENCAP_PROHIBITED)

        def send() -> None:
            for name, (remote, inner_dst) in targets.items():
                args = (remote, str(VXLAN_PORT), client_id, client_ip, inner_dst, "9000", name)
                sent = cluster.run(
                    "pod",
                    "exec",
                    "mn-other",
                    "--",
                    sys.executable,
                    str(UNDERLAY_TOOL),
                    "forge",
                    *args,
                    check=False,
                )
                assert sent.returncode == 0, sent.stderr

        assert arrivals(cluster, ["mn-victim", "mn-server"], send) == ["0", "0"]
        assert drops(cluster, attacker_node, reasons.ENCAP_PROHIBITED) >= before + 3
    finally:
        cluster.run("pod", "delete", "mn-victim", check=False)


def test_forged_vxlan_from_the_underlay_is_dropped(multinode: tuple[Cluster, str]) -> None:
    # A node (a tunnel peer) and a host that is not one send frames to the server's node: the
    # VNI must be one membrane sends, equal to the inner source's identity, and that source must
    # live behind the sending node. In native routing the device takes no pod identity at all
    # (only node-port clients travel in it), so c, d and e are refused for their VNI there.
    cluster, mode = multinode
    p = pods(cluster)
    server = str(p["mn-server"]["ip"])
    server_node = str(p["mn-server"]["node"])
    underlay = {n["name"]: n["underlay_ip"] for n in cluster.json("status")["nodes"]}
    attacker = str(p["mn-other"]["node"])
    client_ip = str(p["mn-client"]["ip"])
    client_id = str(p["mn-client"]["identity"])
    other_id = str(p["mn-other"]["identity"])
    before = {
        r: drops(cluster, server_node, r)
        for r in (reasons.INVALID_VNI, reasons.INVALID_IDENTITY, reasons.UNKNOWN_SENDER)
    }

    def forge(node: str, vni: str, src: str, tag: str) -> None:
        args = ("forge", underlay[server_node], str(VXLAN_PORT), vni, src, server, "9000", tag)
        forged = in_node(node, *args)
        assert forged.returncode == 0, forged.stderr

    with intruder(cluster) as outsider:

        def send() -> None:
            forge(attacker, "100", "10.0.0.1", "a")  # not an identity membrane sends
            forge(attacker, "1", underlay[attacker], "b")  # host never travels
            # the client's identity and address, from a node the client does not live on
            forge(attacker, client_id, client_ip, "c")
            forge(attacker, client_id, "10.0.0.9", "d")  # ... or from an address nobody has
            forge(attacker, other_id, client_ip, "e")  # the VNI is not the source's identity
            forge(attacker, "2", client_ip, "f")  # world vouches only for the node's own address
            forge(outsider, client_id, client_ip, "g")  # not a tunnel peer at all

        assert arrivals(cluster, ["mn-server"], send) == ["0"]
    pod_vnis = 0 if mode == "tunnel" else 3
    assert drops(cluster, server_node, reasons.INVALID_VNI) >= (
        before[reasons.INVALID_VNI] + 2 + pod_vnis
    )
    assert drops(cluster, server_node, reasons.INVALID_IDENTITY) >= (
        before[reasons.INVALID_IDENTITY] + 4 - pod_vnis
    )
    assert drops(cluster, server_node, reasons.UNKNOWN_SENDER) >= (
        before[reasons.UNKNOWN_SENDER] + 1
    )


def test_forged_source_from_the_underlay_is_dropped(multinode: tuple[Cluster, str]) -> None:
    # In tunnel mode a pod's packets cross the underlay only inside VXLAN: a plain packet from
    # the underlay claiming the allowed client's address is forged, whoever routes it to the
    # server's node.
    cluster, mode = multinode
    tunnel_only(mode)
    p = pods(cluster)
    server = str(p["mn-server"]["ip"])
    server_node = str(p["mn-server"]["node"])
    underlay = {n["name"]: n["underlay_ip"] for n in cluster.json("status")["nodes"]}
    client_ip = str(p["mn-client"]["ip"])
    before = drops(cluster, server_node, reasons.INVALID_SOURCE_IP)
    unknown = drops(cluster, server_node, reasons.UNKNOWN_TARGET)
    with intruder(cluster) as outsider:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                outsider,
                "ip",
                "route",
                "add",
                f"{server}/32",
                "via",
                underlay[server_node],
            ],
            check=True,
        )

        def send() -> None:
            spoofed = in_node(outsider, "spoof", client_ip, server, "9000", "spoofed")
            assert spoofed.returncode == 0, spoofed.stderr
            # its own address: not forged, but a pod is reached only through the tunnel
            own = in_node(outsider, "spoof", intruder_ip(cluster), server, "9000", "plain")
            assert own.returncode == 0, own.stderr

        assert arrivals(cluster, ["mn-server"], send) == ["0"]
    assert drops(cluster, server_node, reasons.INVALID_SOURCE_IP) >= before + 1
    assert drops(cluster, server_node, reasons.UNKNOWN_TARGET) >= unknown + 1


async def test_status_shows_nodes_and_latency_matrix(multinode: tuple[Cluster, str]) -> None:
    cluster, mode = multinode

    async def all_reachable() -> dict[str, Any]:
        status = await asyncio.to_thread(cluster.json, "status")
        matrix = status["matrix"]
        assert set(matrix) == set(cluster.nodes), matrix
        for source in cluster.nodes:
            for target in cluster.nodes:
                if source != target:
                    assert matrix[source][target] is not None, matrix
        return dict(status)

    status = await eventually(all_reachable, timeout=30, what="every node pair reachable")
    assert {n["name"] for n in status["nodes"]} == set(cluster.nodes)
    assert all(n["alive"] and n["routing"] == mode for n in status["nodes"])
    text = cluster.run("status").stdout
    assert "FROM \\ TO" in text and "UNREACHABLE" not in text


async def test_killed_node_is_marked_unreachable_fails_fast_and_rejoins(
    multinode: tuple[Cluster, str],
) -> None:
    cluster, mode = multinode
    if mode != "tunnel":
        pytest.skip("once is enough: node lifecycle does not depend on the routing mode")
    victim_node = cluster.nodes[2]
    victim = pod_info(cluster, "mn-other")
    assert victim["node"] == victim_node
    info = StateDir(cluster.state).read_cluster()
    assert info is not None
    octet = int(info.underlay_cidr.split(".")[2])
    pid = next(
        proc.pid
        for proc in StateDir(cluster.state).processes()
        if proc.name == f"datapath-{victim_node}"
    )

    async def all_reachable() -> None:
        matrix = (await asyncio.to_thread(cluster.json, "status"))["matrix"]
        for source in cluster.nodes[:2]:
            assert matrix.get(source, {}).get(victim_node) is not None, matrix

    await eventually(all_reachable, timeout=30, what="the victim reachable before the kill")
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(netns.remove_node, victim_node, f"{cluster.name}-u3")
    killed = time.monotonic()

    async def unreachable() -> None:
        matrix = (await asyncio.to_thread(cluster.json, "status"))["matrix"]
        for source in cluster.nodes[:2]:
            assert victim_node in matrix[source] and matrix[source][victim_node] is None, matrix

    # three probe intervals (5 s each), and a little for the last round's timeout and for
    # `membrane status` itself on a loaded machine
    await eventually(unreachable, timeout=20, what="the killed node marked unreachable")
    assert time.monotonic() - killed < 22
    text = cluster.run("status").stdout
    assert "UNREACHABLE" in text

    async def fails_fast() -> None:
        started = time.monotonic()
        result = await asyncio.to_thread(
            cluster.probe, "mn-client", "tcp", str(victim["ip"]), "8080"
        )
        assert result.returncode == 1
        assert "No route to host" in result.stdout, result.stdout
        assert time.monotonic() - started < 5

    # once its heartbeat expired (15 s): an unreachable route, not a silent black hole
    await eventually(fails_fast, timeout=30, what="traffic to the dead node's pods failing fast")

    # it comes back: the namespace again, and the supervisor restarts its agent
    address = IPv4Interface(f"172.31.{octet}.{10 + 3}/24")
    await asyncio.to_thread(
        netns.ensure_node, victim_node, f"{cluster.name}-br", address, f"{cluster.name}-u3"
    )

    async def rejoined() -> None:
        status = await asyncio.to_thread(cluster.json, "status")
        assert all(n["alive"] for n in status["nodes"]), status["nodes"]
        for source in cluster.nodes[:2]:
            assert status["matrix"][source][victim_node] is not None, status["matrix"]

    await eventually(rejoined, timeout=120, what="the node back and reachable")
    # its pod died with it; a new one there is reachable across the overlay again
    cluster.run("pod", "delete", "mn-other", check=False)
    apply_manifest(cluster)
    new = pod_info(cluster, "mn-other")
    proc = cluster.background("mn-other", "serve", "tcp", "8080")
    try:
        reply = cluster.probe("mn-client", "tcp", str(new["ip"]), "8080")
        assert "pong ping" in reply.stdout, reply.stdout + reply.stderr
    finally:
        proc.kill()


# --- L7 across nodes, both routing modes ------------------------------------------------------
#
# The node-1 proxy steers the client's egress L7 towards a server on its own node and on node 2
# (its upstream to node 2 leaves as the client, whose answers the datapath hands back to it);
# node 1's and node 2's proxies steer the servers' ingress L7 for a client without egress rules.
# What the proxy lets through is judged at L3/L4 after it (the locked server admits nobody), and a
# pod can neither reach the proxy's port itself nor borrow an identity with the proxy's mark.

STARWARS = Path(__file__).with_name("starwars.py")
LANDED = {"status": 200, "body": "Ship landed\n"}
DENIED = {"status": 403, "body": "Access denied\r\n"}
LAND, EXHAUST = ("POST", "/v1/request-landing"), ("PUT", "/v1/exhaust-port")
L7_PODS = {  # name: (node, app label)
    "l7-client": (1, "l7-client"),  # egress L7 rules towards l7-server and l7-locked
    "l7-plain": (1, "l7-plain"),  # no egress rules: the servers' ingress L7 rules apply
    "l7-xwing": (1, "l7-xwing"),  # admitted by nobody
    "l7-near": (1, "l7-server"),
    "l7-far": (2, "l7-server"),
    "l7-locked": (2, "l7-locked"),  # admits every pod but l7-client (a deny rule)
}
L7_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7-client-egress}
spec:
  endpointSelector: {matchLabels: {app: l7-client}}
  egress:
  - toEndpoints:
    - matchExpressions: [{key: app, operator: In, values: [l7-server, l7-locked]}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7-server-ingress}
spec:
  endpointSelector: {matchLabels: {app: l7-server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: l7-client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: l7-plain}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7-locked-ingress}
spec:
  endpointSelector: {matchLabels: {app: l7-locked}}
  ingress:
  - fromEndpoints: [{}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: l7-client}}]
"""


@dataclass
class L7World:
    cluster: Cluster
    pods: dict[str, dict[str, Any]]

    def ip(self, pod: str) -> str:
        return str(self.pods[pod]["ip"])

    def flows(self, *args: str) -> list[dict[str, Any]]:
        out = self.cluster.run("observe", "-o", "json", "--last", "500", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def request(self, client: str, server: str, *calls: tuple[str, str]) -> list[dict[str, Any]]:
        """The answers to ``calls`` on one keep-alive connection from ``client`` to port 80."""
        args = [a for call in calls for a in call]
        result = self.cluster.run(
            "pod", "exec", client, "--", sys.executable, str(STARWARS), "request", "2",
            self.ip(server), "80", *args, timeout=30,
        )  # fmt: skip
        return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def l7world(multinode: tuple[Cluster, str]) -> Iterator[L7World]:
    cluster, _ = multinode
    docs = [
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\n"
        f"spec:\n  nodeName: {cluster.nodes[node - 1]}\n  containers: [{{name: c, image: none}}]\n"
        for name, (node, app) in L7_PODS.items()
    ]
    cluster.run("apply", "-f", "-", input_text="---\n".join([*docs, L7_POLICY]), timeout=120)
    world = L7World(cluster, {name: pod_info(cluster, name) for name in L7_PODS})
    serve = [sys.executable, str(STARWARS), "serve", "80"]
    servers = [
        subprocess.Popen(
            membrane_command("pod", "exec", name, "--", *serve),
            env=cluster.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("l7-near", "l7-far", "l7-locked")
    ]
    try:
        for server in servers:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"

        def in_force() -> None:
            assert world.request("l7-client", "l7-far", LAND, EXHAUST) == [LANDED, DENIED]

        until(in_force, "the L7 policies in force on both nodes")
        yield world
    finally:
        for server in servers:
            server.kill()
            server.wait()
        cluster.run("policy", "delete", "l7-client-egress", "l7-server-ingress",
                    "l7-locked-ingress", check=False)  # fmt: skip
        cluster.run("pod", "delete", *L7_PODS, check=False, timeout=120)


def test_l7_egress_to_a_pod_on_this_node_and_on_another(l7world: L7World) -> None:
    for server in ("l7-near", "l7-far"):
        answers = l7world.request("l7-client", server, LAND, EXHAUST, LAND, ("GET", "/v1"))
        assert answers == [LANDED, DENIED, LANDED, DENIED], (server, answers)
    # the upstream to node 2 left as the client: node 2 judged the client's identity and address
    cluster = l7world.cluster

    def judged_on_node_2() -> None:
        flows = l7world.flows("--type", "policy-verdict", "--to-pod", "l7-far")
        assert any(
            f["node"] == cluster.nodes[1]
            and f["source"].get("pod") == "l7-client"
            and f["verdict"] == "FORWARDED"
            for f in flows
        ), flows

    until(judged_on_node_2, "node 2's verdict on the client's upstream", timeout=15)


def test_l7_ingress_from_a_pod_on_this_node_and_on_another(l7world: L7World) -> None:
    for server in ("l7-near", "l7-far"):
        assert l7world.request("l7-plain", server, LAND, EXHAUST) == [LANDED, DENIED], server


def test_a_deny_at_the_far_server_is_the_proxys_403(l7world: L7World) -> None:
    """The client's egress L7 rules allow the landing at l7-locked (on node 2), whose ingress
    denies the client. The proxy judges both sides as the datapath does, the deny winning over
    every allow: the client gets 403 at once (a DROPPED L7 flow naming the deny's policy), not
    a connection left to time out at node 2's L3/L4 drop (181), as before the proxy took deny
    rules into account. (That the proxy's upstream is judged at L3/L4 on the far node, as the
    client, is test_l7_egress_to_a_pod_on_this_node_and_on_another's node-2 verdict.)"""
    assert l7world.request("l7-client", "l7-locked", LAND) == [DENIED]

    def named() -> None:
        flows = l7world.flows("--type", "l7", "--to-pod", "l7-locked")
        assert any(
            f["verdict"] == "DROPPED" and "l7-locked-ingress" in f["policy"] for f in flows
        ), flows

    until(named, "the proxy's DROPPED flow naming the deny", timeout=15)


def test_a_pod_cannot_reach_the_proxy_port(l7world: L7World) -> None:
    """The listener is on the node's loopback address: only what the datapath assigns gets
    there. A pod connecting to its node's addresses on the proxy's port is refused (else it
    could hand the proxy a connection to any address, past the rules)."""
    cluster = l7world.cluster
    nodes = {n["name"]: n for n in cluster.json("status")["nodes"]}
    node = nodes[cluster.nodes[0]]
    for address in (node["router_ip"], node["underlay_ip"]):
        result = cluster.probe("l7-plain", "tcp", str(address), str(PROXY_PORT))
        assert result.returncode == 1, (address, result.stdout)


def test_a_pod_cannot_borrow_an_identity_with_the_proxys_mark(l7world: L7World) -> None:
    """The proxy's mark carries the identity it connects as; an xwing setting it to the
    client's identity (which l7-near admits at L3/L4) is still the xwing: dropped (133)."""
    cluster = l7world.cluster
    mark = hex(from_proxy_mark(int(l7world.pods["l7-client"]["identity"])))
    result = cluster.run(
        "pod", "exec", "l7-xwing", "--", "env", f"STARWARS_MARK={mark}", sys.executable,
        str(STARWARS), "request", "1", l7world.ip("l7-near"), "80", *LAND, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "TimeoutError" in result.stderr, result
    xwing_id = int(l7world.pods["l7-xwing"]["identity"])

    def dropped() -> None:
        flows = l7world.flows("--type", "drop", "--from-pod", "l7-xwing")
        assert any(
            f["drop_reason"] == 133 and f["source"]["identity"] == xwing_id for f in flows
        ), flows

    until(dropped, "the xwing's policy drop", timeout=15)
