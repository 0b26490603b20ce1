"""Services with real packets: `membrane up --nodes 2`, pods answering with their address,
Services and API frontends, the lb maps on every node. Backends stay on the client's node
(cross-node pod traffic is another issue's)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import maglev
from shared.bus import Bus
from shared.messages import ResolvedPolicy
from tests.conftest import eventually
from tests.e2e.cluster import Cluster, create_pod
from tests.e2e.test_datapath import FlowTap, clear_policy, put_policy

pytestmark = [pytest.mark.e2e, pytest.mark.root]


@pytest.fixture
async def bus(cluster: Cluster) -> AsyncIterator[Bus]:
    client = await Bus.connect(cluster.nats_url, "test", retry_for=5)
    yield client
    await client.close()


def whoami(cluster: Cluster, pod: str, proto: str, port: int) -> subprocess.Popen[str]:
    proc = cluster.background(pod, "whoami", proto, str(port))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def web(cluster: Cluster) -> Iterator[list[str]]:
    """Three pods labelled app=web on node 1, answering TCP 8080 and UDP 5353 with their IP."""
    ips = [str(create_pod(cluster, f"web-{i}", "app=web,tier=lb")["ip"]) for i in range(3)]
    servers = [whoami(cluster, f"web-{i}", "tcp", 8080) for i in range(3)]
    servers += [whoami(cluster, f"web-{i}", "udp", 5353) for i in range(3)]
    yield ips
    for proc in servers:
        proc.kill()
        proc.wait()
    cluster.run("pod", "delete", "web-0", "web-1", "web-2")


def apply(cluster: Cluster, tmp_path: Path, text: str, check: bool = True) -> Any:
    path = tmp_path / f"m{time.monotonic_ns()}.yaml"
    path.write_text(text)
    return cluster.run("apply", "-f", str(path), check=check)


def service(cluster: Cluster, name: str) -> dict[str, Any]:
    found = cluster.json("service", "get", name)
    assert isinstance(found, dict)
    return found


def lb_rows(cluster: Cluster, node: str) -> list[dict[str, Any]]:
    rows = cluster.json("bpf", "lb", "--node", node)[0]["rows"]
    assert isinstance(rows, list)
    return rows


def wait_backends(cluster: Cluster, frontend: str, count: int, nodes: list[str]) -> None:
    deadline = time.monotonic() + 15
    while True:
        seen = []
        for node in nodes:
            rows = [r for r in lb_rows(cluster, node) if r["frontend"] == frontend]
            seen.append(rows[0]["backends"] if rows else None)
        if all(s == count for s in seen):
            return
        assert time.monotonic() < deadline, f"{frontend}: backends {seen}, wanted {count}"
        time.sleep(0.1)


def ask(cluster: Cluster, pod: str, *args: str) -> list[str]:
    result = cluster.probe(pod, "ask", *args, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert isinstance(answers, list)
    return [str(a) for a in answers]


SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: {name}
  annotations:
    lb.membrane.io/algorithm: {algorithm}
spec:
  selector:
    app: web
  {extra}
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
"""


def test_cluster_ip_spreads_over_three_backends_on_every_node(
    cluster: Cluster, web: list[str], tmp_path: Path
) -> None:
    create_pod(cluster, "lb-client", "app=lb-client")
    try:
        out = apply(cluster, tmp_path, SERVICE.format(name="web", algorithm="random", extra=""))
        assert "service/web created" in out.stdout, out.stdout
        record = service(cluster, "web")
        vip = record["frontends"][0]["ip"]
        assert vip.startswith("10."), record
        wait_backends(cluster, f"{vip}:80", 3, cluster.nodes)  # both nodes have it
        answers = ask(cluster, "lb-client", "tcp", vip, "80", "30")
        assert "failed" not in answers, answers
        assert set(answers) == set(web), answers  # all three backends answered
        udp = ask(cluster, "lb-client", "udp", vip, "53", "3", "40001")
        assert len(set(udp)) == 1 and udp[0] in web, udp  # one flow, one backend, reverse NAT
        listed = cluster.run("service", "list").stdout
        assert "web" in listed and f"{vip}:80/TCP" in listed
        # flows to the ClusterIP name the service, though the datapath reports the backend
        through = cluster.run("observe", "--to-service", "default/web", "--last", "3").stdout
        assert through.count("[default/web]") == 3, through
    finally:
        cluster.run("service", "delete", "web", check=False)
        cluster.run("pod", "delete", "lb-client", check=False)


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, protocol: int) -> int:
    """bpf/lb.h's lb_hash, for checking the datapath's choice from outside."""
    mask = 0xFFFFFFFF

    def word(ip: str) -> int:
        return int(struct.unpack("<I", socket.inet_aton(ip))[0])

    def mix(h: int, k: int) -> int:
        k = (k * 0xCC9E2D51) & mask
        k = ((k << 15) | (k >> 17)) & mask
        h ^= (k * 0x1B873593) & mask
        return ((((h << 13) | (h >> 19)) & mask) * 5 + 0xE6546B64) & mask

    ports = (socket.htons(sport) << 16 | socket.htons(dport)) & mask
    h = mix(mix(mix(0x9E3779B9, word(saddr)), word(daddr)), ports)
    h ^= protocol
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_maglev_flow_keeps_its_backend_and_every_node_agrees(
    cluster: Cluster, web: list[str]
) -> None:
    client = create_pod(cluster, "mg-client", "app=mg-client")
    vip = "10.250.0.53"
    try:
        cluster.run(
            "service",
            "create",
            "dns",
            "--frontend",
            f"{vip}:53/UDP",
            *[arg for ip in web for arg in ("--backend", f"{ip}:5353")],
        )
        record = service(cluster, "dns")
        assert record["algorithm"] == "maglev"
        wait_backends(cluster, f"{vip}:53", 3, cluster.nodes)
        size, seed = record["maglev_size"], record["maglev_seed"]
        ids = {b["id"]: b["ip"] for b in record["frontends"][0]["backends"]}
        table = maglev.table(list(ids), size, seed)
        for node in cluster.nodes:  # the whole table is in every node's map
            (row,) = [r for r in lb_rows(cluster, node) if r["frontend"] == f"{vip}:53"]
            assert row["maglev_entries"] == size, row
        chosen = set()
        for sport in (41000, 41001, 41002, 41003, 41004, 41005):
            answers = ask(cluster, "mg-client", "udp", vip, "53", "3", str(sport))
            assert len(set(answers)) == 1, answers
            expected = ids[table[flow_hash(client["ip"], vip, sport, 53, 17) % size]]
            assert answers[0] == expected, (sport, answers, expected)
            chosen.add(answers[0])
        assert len(chosen) > 1  # six flows over three backends do not all land on one
    finally:
        cluster.run("service", "delete", "dns", check=False)
        cluster.run("pod", "delete", "mg-client", check=False)


def test_session_affinity_holds(cluster: Cluster, web: list[str], tmp_path: Path) -> None:
    create_pod(cluster, "aff-client", "app=aff-client")
    extra = "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"
    try:
        apply(cluster, tmp_path, SERVICE.format(name="sticky", algorithm="random", extra=extra))
        vip = service(cluster, "sticky")["frontends"][0]["ip"]
        wait_backends(cluster, f"{vip}:80", 3, cluster.nodes[:1])
        rows = [r for r in lb_rows(cluster, cluster.nodes[0]) if r["frontend"] == f"{vip}:80"]
        assert rows[0]["affinity_timeout"] == 60
        answers = ask(cluster, "aff-client", "tcp", vip, "80", "20")
        assert len(set(answers)) == 1 and answers[0] in web, answers
    finally:
        cluster.run("service", "delete", "sticky", check=False)
        cluster.run("pod", "delete", "aff-client", check=False)


SLICED = """
apiVersion: v1
kind: Service
metadata: {{name: sliced}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sliced-1
  labels: {{kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: {endpoints}
"""


def test_backends_added_and_removed_while_a_client_runs(
    cluster: Cluster, web: list[str], tmp_path: Path
) -> None:
    """EndpointSlices (a service without a selector): a fourth backend joins and leaves while a
    client keeps connecting; no connection fails."""
    create_pod(cluster, "chg-client", "app=chg-client")
    extra_ip = str(create_pod(cluster, "web-3", "app=other")["ip"])
    server = whoami(cluster, "web-3", "tcp", 8080)

    def slice_with(ips: list[str], terminating: tuple[str, ...] = ()) -> str:
        endpoints = [{"addresses": [ip]} for ip in ips]
        endpoints += [
            {"addresses": [ip], "conditions": {"ready": False, "terminating": True}}
            for ip in terminating
        ]
        return SLICED.format(endpoints=json.dumps(endpoints))

    try:
        apply(cluster, tmp_path, slice_with(web))
        vip = service(cluster, "sliced")["frontends"][0]["ip"]
        wait_backends(cluster, f"{vip}:80", 3, cluster.nodes[:1])
        runner = subprocess.Popen(
            [*_probe_cmd(cluster, "chg-client"), "ask", "tcp", vip, "80", "800", "0", "15"],
            env=cluster.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        apply(cluster, tmp_path, slice_with([*web, extra_ip]))
        wait_backends(cluster, f"{vip}:80", 4, cluster.nodes[:1])
        time.sleep(1.0)
        # as Kubernetes removes one: terminating first (keeps its connections), then gone
        apply(cluster, tmp_path, slice_with(web[:2], (web[2], extra_ip)))
        wait_backends(cluster, f"{vip}:80", 2, cluster.nodes[:1])
        time.sleep(0.5)
        apply(cluster, tmp_path, slice_with(web[:2]))
        time.sleep(0.5)
        assert runner.poll() is None, "the client finished before the changes were made"
        out, _ = runner.communicate(timeout=120)
        answers = json.loads(out)
        assert answers.count("failed") == 0, answers
        assert extra_ip in answers, answers  # the added backend took connections
        after = ask(cluster, "chg-client", "tcp", vip, "80", "10")
        assert set(after) <= set(web[:2]), after  # the removed ones take no new ones
    finally:
        server.kill()
        cluster.run("service", "delete", "sliced", check=False)
        cluster.run("pod", "delete", "chg-client", "web-3", check=False)


def _probe_cmd(cluster: Cluster, pod: str) -> list[str]:
    import sys

    from tests.conftest import membrane_command
    from tests.e2e.cluster import PROBE

    return membrane_command("pod", "exec", pod, "--", sys.executable, str(PROBE))


async def test_service_without_backends_drops_with_158(cluster: Cluster, bus: Bus) -> None:
    client = create_pod(cluster, "nb-client", "app=nb-client")
    tap = FlowTap()
    await tap.start(bus)
    vip = "10.250.0.99"
    try:
        await asyncio.to_thread(
            cluster.run, "service", "create", "empty", "--frontend", f"{vip}:80/TCP"
        )
        await asyncio.to_thread(wait_backends, cluster, f"{vip}:80", 0, cluster.nodes[:1])
        result = await asyncio.to_thread(cluster.probe, "nb-client", "tcp", vip, "80")
        assert result.returncode == 1

        async def seen() -> None:
            drops = tap.drops(reason=158, src_identity=int(client["identity"]))
            assert drops and drops[0]["reason_name"] == "Service backend not found", tap.flows

        await eventually(seen, timeout=5, what="a 158 drop event")
    finally:
        await tap.sub.unsubscribe()
        await asyncio.to_thread(cluster.run, "service", "delete", "empty", check=False)
        await asyncio.to_thread(cluster.run, "pod", "delete", "nb-client", check=False)


async def test_policy_on_the_backend_still_denies_through_the_cluster_ip(
    cluster: Cluster, bus: Bus
) -> None:
    create_pod(cluster, "pd-client", "app=pd-client")
    backend = create_pod(cluster, "pd-backend", "app=pd-backend")
    server = await asyncio.to_thread(whoami, cluster, "pd-backend", "tcp", 8080)
    vip = "10.250.0.80"
    identity = int(backend["identity"])
    try:
        await asyncio.to_thread(
            cluster.run,
            "service",
            "create",
            "guarded",
            "--frontend",
            f"{vip}:80/TCP",
            "--backend",
            f"{backend['ip']}:8080",
        )
        await asyncio.to_thread(wait_backends, cluster, f"{vip}:80", 1, cluster.nodes[:1])
        ok = await asyncio.to_thread(cluster.probe, "pd-client", "ask", "tcp", vip, "80", "1")
        assert json.loads(ok.stdout) == [backend["ip"]]
        # ingress enforced with nothing allowed: the backend's identity denies the client
        await put_policy(bus, ResolvedPolicy(identity=identity, revision=1, ingress_enforced=True))
        await asyncio.sleep(0.5)
        denied = await asyncio.to_thread(cluster.probe, "pd-client", "ask", "tcp", vip, "80", "1")
        assert json.loads(denied.stdout) == ["failed"]
    finally:
        await clear_policy(bus, identity)
        server.kill()
        await asyncio.to_thread(cluster.run, "service", "delete", "guarded", check=False)
        await asyncio.to_thread(
            cluster.run, "pod", "delete", "pd-client", "pd-backend", check=False
        )


BAD = {
    "no ports": ("spec: {selector: {app: x}}", "spec.ports"),
    "port out of range": ("spec: {ports: [{port: 70000}]}", "out of range"),
    "invalid IP": ("spec: {clusterIP: 10.1.2.300, ports: [{port: 80}]}", "spec.clusterIP"),
    "bad protocol": ("spec: {ports: [{port: 80, protocol: HTTP}]}", "spec.ports[0].protocol"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifests_are_clear_errors_and_change_nothing(
    cluster: Cluster, tmp_path: Path, case: str
) -> None:
    spec, expected = BAD[case]
    good = "apiVersion: v1\nkind: Service\nmetadata: {name: fine}\nspec: {ports: [{port: 80}]}\n"
    bad = f"apiVersion: v1\nkind: Service\nmetadata: {{name: broken}}\n{spec}\n"
    before = cluster.json("service", "list")
    result = apply(cluster, tmp_path, good + "---\n" + bad, check=False)
    assert result.returncode == 1
    assert expected in result.stderr and "document 2" in result.stderr, result.stderr
    assert cluster.json("service", "list") == before  # the valid first document was not applied


def test_duplicates_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    one = "apiVersion: v1\nkind: Service\nmetadata: {name: twice}\nspec: {ports: [{port: 80}]}\n"
    result = apply(cluster, tmp_path, one + "---\n" + one, check=False)
    assert result.returncode == 1 and "defined twice" in result.stderr, result.stderr
    taken = cluster.run("service", "create", "first", "--frontend", "10.250.1.1:80/TCP")
    try:
        clash = cluster.run(
            "service", "create", "second", "--frontend", "10.250.1.1:80/TCP", check=False
        )
        assert clash.returncode == 1 and "belongs to default/first" in clash.stderr
        assert "second" not in cluster.run("service", "list").stdout
    finally:
        assert taken.returncode == 0
        cluster.run("service", "delete", "first")


def test_a_large_file_is_checked_while_read_and_applied_whole(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A file over 2 MiB is read in pieces, its Services sent to the lb service to be checked
    while the rest is read: an invalid last document still changes nothing and is named as in
    a small file; a valid file is applied whole."""
    pad = ("# " + "=" * 98 + "\n") * 2000  # 200 KB of comment after each document
    text = "---\n".join(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: big{i}}}\n"
        f"spec: {{ports: [{{port: 80}}]}}\n{pad}"
        for i in range(12)
    )
    assert len(text) > 2 << 20  # shared.apply.STREAM_MIN_CHARS
    late = "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec: {ports: [{port: 0}]}\n"
    before = cluster.json("service", "list")
    result = apply(cluster, tmp_path, text + "---\n" + late, check=False)
    assert result.returncode == 1, result.stdout
    assert "document 13 (Service late): spec.ports[0].port" in result.stderr, result.stderr
    assert cluster.json("service", "list") == before
    path = tmp_path / "big.yaml"
    path.write_text(text)
    try:
        result = cluster.run("apply", "-f", str(path))
        assert all(f"service/big{i} created" in result.stdout for i in range(12)), result.stdout
        assert {f"big{i}" for i in range(12)} <= {
            s["name"] for s in cluster.json("service", "list")
        }
    finally:
        cluster.run("delete", "-f", str(path))


def test_example_deployment_behind_a_service(cluster: Cluster, tmp_path: Path) -> None:
    """examples/web-service.yaml (the demo's): 3 replicas, a named targetPort, requests spread."""
    example = Path(__file__).resolve().parents[2] / "examples" / "web-service.yaml"
    text = example.read_text().replace("membrane-node-1", cluster.nodes[0])
    text = text.replace("name: web\n", "name: ex-web\n").replace("app: web", "app: ex-web")
    manifest = tmp_path / "example.yaml"
    manifest.write_text(text)
    create_pod(cluster, "ex-client", "app=ex-client")
    servers = []
    try:
        cluster.run("apply", "-f", str(manifest))
        pods = [p for p in cluster.json("pod", "list") if p["labels"].get("app") == "ex-web"]
        assert len(pods) == 3
        servers = [whoami(cluster, p["name"], "tcp", 8080) for p in pods]
        vip = service(cluster, "ex-web")["frontends"][0]["ip"]
        wait_backends(cluster, f"{vip}:80", 3, cluster.nodes[:1])
        answers = ask(cluster, "ex-client", "tcp", vip, "80", "24")
        assert set(answers) == {p["ip"] for p in pods}, answers
    finally:
        for proc in servers:
            proc.kill()
        cluster.run("delete", "-f", str(manifest), check=False)
        cluster.run("pod", "delete", "ex-client", check=False)


async def test_node_port_through_any_node_address(
    cluster: Cluster, bus: Bus, web: list[str], tmp_path: Path
) -> None:
    """A NodePort service is reached through each node's underlay address: the client's node
    translates to a backend at once (backends on the client's node, as elsewhere here)."""
    from membrane.client import workloads

    await asyncio.to_thread(create_pod, cluster, "np-client", "app=np-client")
    text = SERVICE.format(name="np", algorithm="random", extra="type: NodePort").replace(
        "    targetPort: 8080\n", "    targetPort: 8080\n    nodePort: 30080\n", 1
    )
    try:
        await asyncio.to_thread(apply, cluster, tmp_path, text)
        nodes = await workloads.nodes(bus)
        for node in cluster.nodes:
            address = nodes[node].underlay_ip
            await asyncio.to_thread(wait_backends, cluster, f"{address}:30080", 3, cluster.nodes)
        for node in cluster.nodes:  # the other node's address too
            address = nodes[node].underlay_ip
            answers = await asyncio.to_thread(
                ask, cluster, "np-client", "tcp", address, "30080", "12"
            )
            assert "failed" not in answers and set(answers) <= set(web), (node, answers)
        record = await asyncio.to_thread(service, cluster, "np")
        node_ports = {(f["port"], f["protocol"]) for f in record["frontends"] if f["node_port"]}
        assert (30080, "TCP") in node_ports and len(node_ports) == 2  # the UDP one allocated
    finally:
        await asyncio.to_thread(cluster.run, "service", "delete", "np", check=False)
        await asyncio.to_thread(cluster.run, "pod", "delete", "np-client", check=False)


def test_icmp_errors_about_a_service_connection_carry_the_frontend(cluster: Cluster) -> None:
    """A UDP service whose backend has no listener: the backend's port-unreachable quotes the
    backend's address, and the client's connected socket hears it only once it is translated
    back to the frontend's -- for a backend on the client's node and one on the other node
    (through the overlay)."""
    create_pod(cluster, "icmp-client", "app=icmp-client")
    near = create_pod(cluster, "icmp-near", "app=icmp-backend", node=1)
    far = create_pod(cluster, "icmp-far", "app=icmp-backend", node=2)
    listener = whoami(cluster, "icmp-near", "udp", 5400)  # the answering case, for contrast
    try:
        for name, vip, backend in (
            ("icmp-near", "10.250.0.71", f"{near['ip']}:5999"),
            ("icmp-far", "10.250.0.72", f"{far['ip']}:5999"),
            ("icmp-open", "10.250.0.73", f"{near['ip']}:5400"),
        ):
            cluster.run(
                "service", "create", name, "--frontend", f"{vip}:53/UDP", "--backend", backend
            )
            wait_backends(cluster, f"{vip}:53", 1, cluster.nodes[:1])
        for vip in ("10.250.0.71", "10.250.0.72"):
            result = cluster.probe("icmp-client", "udpc", vip, "53")
            assert (result.returncode, result.stdout.strip()) == (3, "refused"), (vip, result)
        result = cluster.probe("icmp-client", "udpc", "10.250.0.73", "53")
        assert result.returncode == 0 and result.stdout.strip() == near["ip"], result
    finally:
        listener.kill()
        listener.wait()
        cluster.run("service", "delete", "icmp-near", "icmp-far", "icmp-open", check=False)
        cluster.run("pod", "delete", "icmp-client", "icmp-near", "icmp-far", check=False)


def test_a_fragmented_datagram_to_a_service_is_translated_both_ways(cluster: Cluster) -> None:
    """A 4,000-byte datagram to a cluster IP leaves the client in three IP fragments, and its
    answer comes back in three: the later fragments carry no ports, yet each must get the
    backend's address on the way in and the frontend's on the way back, or the datagram is
    never reassembled (before: the first fragment was not translated at all and met the
    client's policy as addressed to the cluster IP). A backend on the client's node and one
    behind the overlay."""
    create_pod(cluster, "frag-client", "app=frag-client")
    near = create_pod(cluster, "frag-near", "app=frag-backend", node=1)
    far = create_pod(cluster, "frag-far", "app=frag-backend", node=2)
    echoes = [cluster.background(pod, "bigecho", "5410") for pod in ("frag-near", "frag-far")]
    try:
        for echo in echoes:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        for name, vip, backend in (
            ("frag-near", "10.250.0.81", near["ip"]),
            ("frag-far", "10.250.0.82", far["ip"]),
        ):
            cluster.run(
                "service",
                "create",
                name,
                "--frontend",
                f"{vip}:53/UDP",
                "--backend",
                f"{backend}:5410",
            )
            wait_backends(cluster, f"{vip}:53", 1, cluster.nodes[:1])
            small = cluster.probe("frag-client", "bigudp", vip, "53", "100")
            assert small.returncode == 0, (name, small.stdout, small.stderr)
            big = cluster.probe("frag-client", "bigudp", vip, "53", "4000")
            assert big.returncode == 0, (name, big.stdout, big.stderr)
            assert big.stdout.strip() == f"4000 bytes from {vip}:53", big.stdout
    finally:
        for echo in echoes:
            echo.kill()
            echo.wait()
        cluster.run("service", "delete", "frag-near", "frag-far", check=False)
        cluster.run("pod", "delete", "frag-client", "frag-near", "frag-far", check=False)
