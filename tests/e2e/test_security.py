"""Datapath security (docs/security.md): a pod cannot choose its identity, nor borrow another's
state. Each test crafts what an attacker in a pod would send and fails without its defence.

Tunnel and underlay attacks need three nodes: they live in test_multinode.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shared import agent_api
from shared.agent_api import AddEndpoint
from shared.messages import Endpoint
from tests.e2e.cluster import Cluster, create_pod

pytestmark = [pytest.mark.e2e, pytest.mark.root]

FORGED_KEY = "io.cilium.k8s.namespace.labels.team"
NSGUARD = "nsguard"


def apply_text(cluster: Cluster, tmp_path: Path, name: str, text: str, check: bool = True) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    result = cluster.run("apply", "-f", str(path), check=check)
    return result.stdout + result.stderr


def denied_eventually(cluster: Cluster, pod: str, ip: str, port: str) -> None:
    deadline = time.monotonic() + 15
    while cluster.probe(pod, "tcp", ip, port).returncode == 0:
        assert time.monotonic() < deadline, f"{pod} -> {ip}:{port} never denied"
        time.sleep(0.2)


def test_a_pod_cannot_forge_namespace_labels(cluster: Cluster, tmp_path: Path) -> None:
    # namespaceSelector {team: trusted} selects pods whose namespace has that label: Cilium
    # spells it io.cilium.k8s.namespace.labels.team on the pod's identity. A pod that carries
    # the key itself must neither be created by apply nor get the label by any other way in.
    forged = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: forger\n  labels:\n    app: forger\n"
        f"    {FORGED_KEY}: trusted\nspec:\n  containers: [{{name: c, image: none}}]\n"
    )
    refused = apply_text(cluster, tmp_path, "forged", forged, check=False)
    assert f"metadata.labels['{FORGED_KEY}']" in refused, refused
    assert "forger" not in [p["name"] for p in cluster.json("pod", "list", "-A")]

    guard = create_pod(cluster, "nsguard", "app=nsguard")
    plain = create_pod(cluster, "plain", "app=plain")
    server = cluster.background("nsguard", "serve", "tcp", "80")
    # what the CNI plugin hands the agent comes from its configuration: stripped there
    node = str(guard["node"])
    forger = asyncio.run(
        agent_api.call(
            agent_api.default_socket(node),
            "endpoint.add",
            AddEndpoint(
                namespace="default", name="forger", labels={"app": "forger", FORGED_KEY: "trusted"}
            ),
            Endpoint,
            30,
        )
    )
    try:
        identity = cluster.json("identity", "get", str(forger.identity))
        labels = identity["labels"]
        assert f"k8s:{FORGED_KEY}=trusted" not in labels, labels
        apply_text(
            cluster,
            tmp_path,
            NSGUARD,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: nsguard}\n"
            "spec:\n  podSelector: {matchLabels: {app: nsguard}}\n  ingress:\n"
            "  - from: [{namespaceSelector: {matchLabels: {team: trusted}}}]\n",
        )
        ip = str(guard["ip"])
        denied_eventually(cluster, "plain", ip, "80")  # the policy is in force
        assert cluster.probe("forger", "tcp", ip, "80").returncode == 1
    finally:
        server.kill()
        cluster.run("delete", "-f", str(tmp_path / f"{NSGUARD}.yaml"), check=False)
        for pod in ("forger", "nsguard", str(plain["name"])):
            cluster.run("pod", "delete", pod, check=False)


def test_port_zero_of_any_protocol_admits_no_icmp_or_gre(cluster: Cluster, tmp_path: Path) -> None:
    # toPorts [{port: "0"}] without a protocol is every port of TCP, UDP and SCTP: it must not
    # open ICMP, GRE or any other IP protocol
    server = create_pod(cluster, "p0server", "app=p0server")
    create_pod(cluster, "p0client", "app=p0client")
    listener = cluster.background("p0server", "serve", "tcp", "80")
    apply_text(
        cluster,
        tmp_path,
        "p0",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p0}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: p0server}}\n  ingress:\n"
        "  - fromEndpoints: [{matchLabels: {app: p0client}}]\n"
        "    toPorts: [{ports: [{port: '0'}]}]\n",
    )
    ip = str(server["ip"])
    try:
        # before the policy is in force everything passes; then ICMP must stop
        deadline = time.monotonic() + 15
        while True:
            ping = cluster.run(
                "pod", "exec", "p0client", "--", "ping", "-c", "1", "-W", "1", ip, check=False
            )
            if ping.returncode != 0:
                break
            assert time.monotonic() < deadline, "ICMP echo still admitted by port 0 / ANY"
        assert cluster.probe("p0client", "tcp", ip, "80").returncode == 0  # TCP is
        gre = cluster.background("p0server", "rawcount", "47", "3")
        assert gre.stdout is not None and gre.stdout.readline().strip() == "ready"
        sent = cluster.probe("p0client", "rawsend", "47", ip, "5")
        assert sent.returncode == 0, sent.stderr
        out, _ = gre.communicate(timeout=30)
        assert out.split()[-1] == "0", out
    finally:
        listener.kill()
        cluster.run("delete", "-f", str(tmp_path / "p0.yaml"), check=False)
        cluster.run("pod", "delete", "p0server", "p0client", check=False)


def test_an_icmp_error_from_an_unrelated_pod_is_dropped(cluster: Cluster, tmp_path: Path) -> None:
    # The victim talks UDP to a server that does not answer; an unrelated pod sends it "port
    # unreachable" quoting that datagram. Only the server (or a node on the way) may: anyone
    # else would break the victim's connections, or get ICMP past its policy.
    victim = create_pod(cluster, "icmpv", "app=icmpv")
    server = create_pod(cluster, "icmps", "app=icmps")
    create_pod(cluster, "icmpx", "app=icmpx")
    listener = cluster.background("icmpv", "serve", "tcp", "80")
    silent = cluster.background("icmps", "count", "9000", "30")  # receives, never answers
    apply_text(
        cluster,
        tmp_path,
        "icmpv",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: icmpv}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: icmpv}}\n  ingress:\n"
        "  - fromEndpoints: [{matchLabels: {app: icmps}}]\n",
    )
    v_ip, s_ip = str(victim["ip"]), str(server["ip"])
    try:
        denied_eventually(cluster, "icmpx", v_ip, "80")  # the victim's policy is in force
        # the server's own error still arrives (nothing listens on 9001 there)
        assert cluster.probe("icmpv", "udpc", s_ip, "9001").returncode == 3
        waiting = cluster.background("icmpv", "udpwait", s_ip, "9000", "40000", "5")
        assert waiting.stdout is not None and waiting.stdout.readline().strip() == "sent"
        forged = cluster.probe("icmpx", "icmperr", v_ip, s_ip, "9000", "5")
        assert forged.returncode == 0, forged.stdout + forged.stderr
        out, _ = waiting.communicate(timeout=30)
        assert waiting.returncode == 1, out  # 3: the forged error got through
    finally:
        listener.kill()
        silent.kill()
        cluster.run("delete", "-f", str(tmp_path / "icmpv.yaml"), check=False)
        cluster.run("pod", "delete", "icmpv", "icmps", "icmpx", check=False)
