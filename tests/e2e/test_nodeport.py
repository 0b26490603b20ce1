"""NodePort from outside the pod network, with real packets: a client in another node's *host*
namespace (the node itself, not a pod) connects to node 1's underlay address and node port, in
both routing modes. from_netdev (bpf/nodeport.h) on node 1's underlay device translates it to
backends on node 1 and on node 2 and the replies back; the backends' ingress policy judges the
client's identity (remote-node, for another node's host); no backend is drop 158."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.state import StateDir
from shared import identities, subjects
from shared.bus import Bus
from shared.messages import ResolvedPolicy
from tests.conftest import eventually
from tests.e2e.cluster import (
    PROBE,
    Cluster,
    create_pod,
    down_leaving_nothing,
    free_octet,
    until,
    up,
)
from tests.e2e.test_datapath import FlowTap, clear_policy, put_policy
from tests.e2e.test_lb import wait_backends, whoami

pytestmark = [pytest.mark.e2e, pytest.mark.root]

# over the 4,536 SNAT ports: a spray can hold every port towards its backend
CT_SIZE = 8192
PORTS = (("tcp", 8080), ("udp", 5353))  # what the backends answer
SPRAY = 20_000  # over twice CT_SIZE

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: NodePort
  selector: {selector}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {tcp}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: {udp}}}
"""


@pytest.fixture(scope="module", params=["tunnel", "native"])
def np_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    routing: str = request.param
    state = tmp_path_factory.mktemp("nodeport") / "state"
    # small conntrack and translation maps, for a spray that overfills them (CT_SIZE)
    env = {"MEMBRANE_CT_SIZE": str(CT_SIZE)}
    c = Cluster(state=state, name="p" + secrets.token_hex(3), nats_url="", extra_env=env)
    up(c, free_octet(), routing)
    try:
        yield c
    finally:
        down_leaving_nothing(c)


@pytest.fixture
async def bus(np_cluster: Cluster) -> AsyncIterator[Bus]:
    client = await Bus.connect(np_cluster.nats_url, "test", retry_for=5)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def backends(np_cluster: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    """Two pods on node 1 (side=one) and two on node 2 (side=two), all app=npweb, answering
    TCP 8080 and UDP 5353 with their own address."""
    pods: dict[str, dict[str, Any]] = {}
    servers = []
    for node, side in ((1, "one"), (2, "two")):
        for i in range(2):
            name = f"npweb-{side}-{i}"
            pods[name] = create_pod(np_cluster, name, f"app=npweb,side={side}", node=node)
            servers += [whoami(np_cluster, name, proto, port) for proto, port in PORTS]
    yield pods
    for proc in servers:
        proc.kill()
        proc.wait()
    np_cluster.run("pod", "delete", *pods, check=False)


def underlay(cluster: Cluster) -> dict[str, str]:
    return {n["name"]: n["underlay_ip"] for n in cluster.json("status")["nodes"]}


def from_host(
    cluster: Cluster, node: int, *args: str, source: str = "", timeout: float = 90
) -> list[str]:
    """netprobe in a node's own (host) namespace: no pod, no from_container on the way out;
    from the address ``source`` when given."""
    env = {**os.environ, "NETPROBE_SOURCE": source} if source else None
    result = subprocess.run(
        ["ip", "netns", "exec", cluster.nodes[node - 1], sys.executable, str(PROBE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert isinstance(answers, list)
    return [str(a) for a in answers]


@pytest.fixture(scope="module")
def outsider(np_cluster: Cluster) -> Iterator[str]:
    """A second address on node 2's underlay interface that no one in the cluster knows: a
    client from it is `world`, as any host on the underlay would be."""
    ips = underlay(np_cluster)
    node2 = ips[np_cluster.nodes[1]]
    address = node2.rsplit(".", 1)[0] + ".250"
    ns = ["ip", "netns", "exec", np_cluster.nodes[1]]
    subprocess.run([*ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0"], check=True)
    yield address
    subprocess.run([*ns, "ip", "addr", "del", f"{address}/24", "dev", "eth0"], check=False)


def apply(cluster: Cluster, tmp_path: Path, text: str) -> None:
    path = tmp_path / f"np{time.monotonic_ns()}.yaml"
    path.write_text(text)
    cluster.run("apply", "-f", str(path))


def test_host_of_another_node_reaches_backends_on_both_nodes(
    np_cluster: Cluster, backends: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    cluster = np_cluster
    ips = underlay(cluster)
    node1, node2 = (ips[n] for n in cluster.nodes)
    by_side = {
        side: {str(p["ip"]) for n, p in backends.items() if f"-{side}-" in n}
        for side in ("one", "two")
    }
    apply(
        cluster,
        tmp_path,
        SERVICE.format(name="npall", selector="{app: npweb}", tcp=30090, udp=30091),
    )
    try:
        for address in (node1, node2):
            wait_backends(cluster, f"{address}:30090", 4, cluster.nodes)
        # node 2's host -> node 1's address: node 1 translates, to both nodes' backends
        answers = from_host(cluster, 2, "ask", "tcp", node1, "30090", "32")
        assert "failed" not in answers, answers
        assert set(answers) <= by_side["one"] | by_side["two"], answers
        assert set(answers) & by_side["one"], answers  # a local backend of node 1
        assert set(answers) & by_side["two"], answers  # one behind the other node
        # and the other way round
        back = from_host(cluster, 1, "ask", "tcp", node2, "30090", "16")
        assert "failed" not in back and set(back) & by_side["two"], back
        # UDP: one flow keeps its backend, and the answers come from the address asked
        udp = from_host(cluster, 2, "ask", "udp", node1, "30091", "4", "41234")
        assert len(set(udp)) == 1 and udp[0] in by_side["one"] | by_side["two"], udp
        # a port no service holds passes untouched (to the node's stack, which refuses it)
        closed = from_host(cluster, 2, "ask", "tcp", node1, "30099", "1")
        assert closed == ["failed"], closed
        # the node's own traffic on the device goes on: NATS (the agents), the health probes
        status = cluster.json("status")
        assert all(n["alive"] for n in status["nodes"]), status
    finally:
        cluster.run("service", "delete", "npall", check=False)


@pytest.mark.parametrize("side", ["one", "two"])
async def test_backend_policy_judges_the_client_identity(
    np_cluster: Cluster,
    bus: Bus,
    backends: dict[str, dict[str, Any]],
    outsider: str,
    tmp_path: Path,
    side: str,
) -> None:
    """Backend on node 1 (delivered by from_netdev) or on node 2 (through the VXLAN device, in
    both routing modes): its ingress policy sees the client as remote-node (another node's
    host) or world (an address nobody in the cluster has) -- never as the forwarding node."""
    cluster = np_cluster
    node1 = (await asyncio.to_thread(underlay, cluster))[cluster.nodes[0]]
    identity = int(backends[f"npweb-{side}-0"]["identity"])
    name = f"np{side}"
    tcp = 30100 if side == "one" else 30102
    text = SERVICE.format(name=name, selector=f"{{side: {side}}}", tcp=tcp, udp=tcp + 1)
    tap = FlowTap()
    await tap.start(bus)
    try:
        await asyncio.to_thread(apply, cluster, tmp_path, text)
        await asyncio.to_thread(wait_backends, cluster, f"{node1}:{tcp}", 2, cluster.nodes[:1])
        ok = await asyncio.to_thread(from_host, cluster, 2, "ask", "tcp", node1, str(tcp), "2")
        assert "failed" not in ok, ok
        world = await asyncio.to_thread(
            from_host, cluster, 2, "ask", "tcp", node1, str(tcp), "2", source=outsider
        )
        assert "failed" not in world, world
        # ingress enforced with nothing allowed: the client's identity is denied
        await put_policy(bus, ResolvedPolicy(identity=identity, revision=1, ingress_enforced=True))
        await asyncio.sleep(0.5)
        denied = await asyncio.to_thread(from_host, cluster, 2, "ask", "tcp", node1, str(tcp), "1")
        assert denied == ["failed"], denied
        denied = await asyncio.to_thread(
            from_host, cluster, 2, "ask", "tcp", node1, str(tcp), "1", source=outsider
        )
        assert denied == ["failed"], denied

        async def seen() -> None:
            for client in (identities.REMOTE_NODE, identities.WORLD):
                drops = tap.drops(reason=133, src_identity=client, dst_identity=identity)
                assert drops, (client, tap.flows)

        await eventually(seen, timeout=5, what="a policy drop of the client's identity")
    finally:
        await tap.sub.unsubscribe()
        await clear_policy(bus, identity)
        await asyncio.to_thread(cluster.run, "service", "delete", name, check=False)


def deny_outsider(cluster: Cluster, path: Path, policy: str, target: str, outsider: str) -> None:
    """Apply ``policy`` (written to ``path``), then wait until the outsider's connection to the
    node port ``target`` (IP:PORT) fails: dropped on the backend's node."""
    path.write_text(policy)
    cluster.run("apply", "-f", str(path))
    ip, port = target.split(":")

    def outsider_denied() -> None:
        got = from_host(cluster, 2, "ask", "tcp", ip, port, "1", source=outsider)
        assert got == ["failed"], got

    until(outsider_denied, "the outsider dropped on the backend's node", 20)


def test_a_client_denied_by_cidr_is_denied_through_another_node(
    np_cluster: Cluster, backends: dict[str, dict[str, Any]], outsider: str, tmp_path: Path
) -> None:
    """A client that ``ingressDeny fromCIDR`` names, under an allow of 0.0.0.0/0, connects to
    node 1's node port for backends on node 2: node 2 must judge it with its CIDR identity
    (carried in the VNI, GBP-marked, in native routing as in tunnel mode), not as world or as
    node 1 (remote-node) -- which the allows admit."""
    cluster = np_cluster
    node1 = underlay(cluster)[cluster.nodes[0]]
    text = SERVICE.format(name="npcidr", selector="{side: two}", tcp=30160, udp=30161)
    policy = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: npcidr}\nspec:\n"
        "  endpointSelector: {matchLabels: {side: two}}\n"
        "  ingress: [{fromCIDR: [0.0.0.0/0]}, {fromEntities: [remote-node]}]\n"
        f"  ingressDeny: [{{fromCIDR: [{outsider}/32]}}]\n"
    )
    try:
        apply(cluster, tmp_path, text)
        wait_backends(cluster, f"{node1}:30160", 2, cluster.nodes[:1])
        # an answer: it was judged as world
        deny_outsider(cluster, tmp_path / "npcidr-policy.yaml", policy, f"{node1}:30160", outsider)
        # another node's host (remote-node) still gets through the same node port
        allowed = from_host(cluster, 2, "ask", "tcp", node1, "30160", "2")
        assert "failed" not in allowed, allowed
    finally:
        cluster.run("delete", "-f", str(tmp_path / "npcidr-policy.yaml"), check=False)
        cluster.run("service", "delete", "npcidr", check=False)


def test_a_denied_spray_at_a_node_port_evicts_no_connection(
    np_cluster: Cluster, backends: dict[str, dict[str, Any]], outsider: str, tmp_path: Path
) -> None:
    """Node 1 writes a new connection's translation records before node 2, the backend's
    node, has judged the client. A client node 2's policy denies sprays SYNs at node 1's node
    port: its records must stay among the unanswered ones (np_nat_new), and another client's
    answered flow keep its records (before: one LRU map, which the spray overfilled); and new
    clients must still get SNAT ports towards the backend the spray holds them for. The
    backend is the test's own, so that other tests' backends are not part of the spray."""
    cluster = np_cluster
    info = StateDir(cluster.state).read_cluster()
    if info is not None and info.routing == "native":
        # a backend behind another node is reached through the VXLAN device in both modes
        pytest.skip("once is enough: the forwarding path does not depend on the routing mode")
    ips = underlay(cluster)
    node1, node2 = ips[cluster.nodes[0]], ips[cluster.nodes[1]]
    create_pod(cluster, "npspray-b", "app=npspray", node=2)
    servers = [whoami(cluster, "npspray-b", proto, port) for proto, port in PORTS]
    text = SERVICE.format(name="npspray", selector="{app: npspray}", tcp=30170, udp=30171)
    policy = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: npspray}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: npspray}}\n"
        "  ingress: [{fromEntities: [remote-node]}]\n"
    )
    try:
        apply(cluster, tmp_path, text)
        wait_backends(cluster, f"{node1}:30170", 1, cluster.nodes[:1])
        deny_outsider(cluster, tmp_path / "npspray-policy.yaml", policy, f"{node1}:30170", outsider)
        # the victim: node 2's host, one datagram from port 40470, answered
        (answer,) = from_host(cluster, 2, "ask", "udp", node1, "30171", "1", "40470")
        assert answer != "failed" and not answer.startswith("from"), answer

        def records() -> list[dict[str, Any]]:
            rows = cluster.json("bpf", "nat", "--node", cluster.nodes[0])[0]["rows"]
            return [r for r in rows if r["kind"] == "nodeport"]

        def victims() -> list[dict[str, Any]]:
            return [r for r in records() if (r["client"], r["client_port"]) == (node2, 40470)]

        assert [r["answered"] for r in victims()] == [True]
        spray = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                cluster.nodes[1],
                sys.executable,
                str(PROBE),
                "synspray",
                outsider,
                node1,
                "30170",
                str(SPRAY),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert spray.returncode == 0, spray.stderr
        sprayed = [r for r in records() if (r["client"], r["frontend_port"]) == (outsider, 30170)]
        assert len(sprayed) > CT_SIZE // 2 and not any(r["answered"] for r in sprayed)
        assert [r["answered"] for r in victims()] == [True]  # not evicted by the spray
        # the spray holds (nearly) every SNAT port towards the backend for a SYN's lifetime;
        # a new client takes over ports whose connections waited over 3 s for an answer
        time.sleep(3.5)
        after = from_host(cluster, 2, "ask", "tcp", node1, "30170", "6")
        assert "failed" not in after, after
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        cluster.run("delete", "-f", str(tmp_path / "npspray-policy.yaml"), check=False)
        cluster.run("service", "delete", "npspray", check=False)
        cluster.run("pod", "delete", "npspray-b", check=False)


async def test_node_port_without_backends_drops_with_158(
    np_cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    cluster = np_cluster
    node1 = (await asyncio.to_thread(underlay, cluster))[cluster.nodes[0]]
    tap = FlowTap()
    await tap.start(bus)
    text = SERVICE.format(name="npnone", selector="{app: nobody}", tcp=30110, udp=30111)
    try:
        await asyncio.to_thread(apply, cluster, tmp_path, text)
        await asyncio.to_thread(wait_backends, cluster, f"{node1}:30110", 0, cluster.nodes[:1])
        failed = await asyncio.to_thread(from_host, cluster, 2, "ask", "tcp", node1, "30110", "1")
        assert failed == ["failed"], failed

        async def seen() -> None:
            drops = tap.drops(reason=158, src_identity=identities.REMOTE_NODE)
            assert drops, tap.flows
            assert drops[0]["reason_name"] == "Service backend not found"
            assert drops[0]["observation_point"] == "from-network", drops[0]

        await eventually(seen, timeout=5, what="a 158 drop event")
    finally:
        await tap.sub.unsubscribe()
        await asyncio.to_thread(cluster.run, "service", "delete", "npnone", check=False)


def test_maglev_choice_is_from_containers_and_affinity_holds(
    np_cluster: Cluster, backends: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The same selection code as from_container: a Maglev service's flow lands on the backend
    the table names for its hash (with this node's address as destination); ClientIP affinity
    keeps one client on one backend."""
    from shared import maglev
    from tests.e2e.test_lb import flow_hash

    cluster = np_cluster
    ips = underlay(cluster)
    node1, node2 = (ips[n] for n in cluster.nodes)
    maglev_svc = SERVICE.format(name="npmag", selector="{app: npweb}", tcp=30120, udp=30121)
    maglev_svc = maglev_svc.replace(
        "metadata: {name: npmag}",
        "metadata: {name: npmag, annotations: {lb.membrane.io/algorithm: maglev}}",
    )
    sticky = SERVICE.format(name="npsticky", selector="{app: npweb}", tcp=30130, udp=30131)
    sticky = sticky.replace(
        "  type: NodePort\n",
        "  type: NodePort\n  sessionAffinity: ClientIP\n"
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    )
    try:
        apply(cluster, tmp_path, maglev_svc)
        apply(cluster, tmp_path, sticky)
        wait_backends(cluster, f"{node1}:30121", 4, cluster.nodes[:1])
        wait_backends(cluster, f"{node1}:30130", 4, cluster.nodes[:1])
        record = cluster.json("service", "get", "npmag")
        (udp,) = [f for f in record["frontends"] if f["node_port"] and f["protocol"] == "UDP"]
        ids = {b["id"]: b["ip"] for b in udp["backends"]}
        size, seed = record["maglev_size"], record["maglev_seed"]
        table = maglev.table(list(ids), size, seed)

        def expected(sport: int) -> str:
            return ids[table[flow_hash(node2, node1, sport, 30121, 17) % size]]

        # source ports that the table sends to different backends (the seed is random per
        # service: six fixed ports all landed on one backend now and then)
        by_backend: dict[str, int] = {}
        for sport in range(42000, 42100):
            by_backend.setdefault(expected(sport), sport)
        assert len(by_backend) > 1, by_backend
        sports = sorted({*by_backend.values(), 42000, 42001, 42002})
        for sport in sports:
            answers = from_host(cluster, 2, "ask", "udp", node1, "30121", "2", str(sport))
            assert answers == [expected(sport)] * 2, (sport, answers, expected(sport))
        answers = from_host(cluster, 2, "ask", "tcp", node1, "30130", "12")
        assert len(set(answers)) == 1 and "failed" not in answers, answers
    finally:
        cluster.run("service", "delete", "npmag", "npsticky", check=False)


def stream_from_host(cluster: Cluster, node: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", cluster.nodes[node - 1], sys.executable, str(PROBE), *args],
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_agent_restart_keeps_node_port_flows(
    np_cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    """SIGKILL of the translating node's agent: the program stays attached, the NAT records are
    pinned, the restarted agent swaps the program in place; a flow through the node port to a
    backend on the other node loses nothing."""
    from tests.e2e.test_datapath import _agent_pid

    cluster = np_cluster
    ips = await asyncio.to_thread(underlay, cluster)
    node1 = ips[cluster.nodes[0]]
    await asyncio.to_thread(create_pod, cluster, "np-sink", "app=np-sink", 2)
    text = """
apiVersion: v1
kind: Service
metadata: {name: npsink}
spec:
  type: NodePort
  selector: {app: np-sink}
  ports: [{port: 9100, protocol: UDP, targetPort: 9100, nodePort: 30140}]
"""
    counter = None
    sender = None
    try:
        await asyncio.to_thread(apply, cluster, tmp_path, text)
        await asyncio.to_thread(wait_backends, cluster, f"{node1}:30140", 1, cluster.nodes[:1])
        counter = await asyncio.to_thread(cluster.background, "np-sink", "count", "9100", "10")
        # 500 datagrams 10 ms apart, one flow, from node 2's host through node 1's node port
        sender = await asyncio.to_thread(
            stream_from_host, cluster, 2, "stream", node1, "30140", "500", "10"
        )
        await asyncio.sleep(1.0)
        old = _agent_pid(cluster, cluster.nodes[0])
        os.kill(old, signal.SIGKILL)

        async def restarted() -> None:
            pid = _agent_pid(cluster, cluster.nodes[0])
            assert pid != old
            services = await bus.discover(subjects.DATAPATH_SERVICE, timeout=0.3)
            assert cluster.nodes[0] in {s.metadata.get("node") for s in services}

        await eventually(restarted, timeout=30, what="the agent to come back")
        out, _ = await asyncio.to_thread(counter.communicate, timeout=30)
        sender.communicate(timeout=30)
        assert out.split()[-1] == "500", f"the flow lost datagrams across the restart: {out}"
    finally:
        for proc in (counter, sender):
            if proc is not None:
                proc.kill()
        await asyncio.to_thread(cluster.run, "service", "delete", "npsink", check=False)
        await asyncio.to_thread(cluster.run, "pod", "delete", "np-sink", check=False)
