"""Datapath security (docs/security.md): a pod cannot choose its identity, nor borrow another's
state. Each test crafts what an attacker in a pod would send and fails without its defence.

Tunnel and underlay attacks need three nodes: they live in test_multinode.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from membrane.state import StateDir
from shared import agent_api
from shared.agent_api import AddEndpoint
from shared.messages import Endpoint
from tests.conftest import membrane_command
from tests.e2e.cluster import Cluster, create_pod, pod_info, until

pytestmark = [pytest.mark.e2e, pytest.mark.root]

# small conntrack and translation maps, so that a spray of ten thousand SYNs overfills them
CT_SIZE = 4096
# a small per-endpoint conntrack quota, so that a flood of a few hundred flows exceeds it
CT_ENDPOINT_MAX = 64
# and conntrack sweeps (which recount each endpoint's share) every 2 s instead of 30
CLUSTER_ENV = {
    "MEMBRANE_CT_SIZE": str(CT_SIZE),
    "MEMBRANE_CT_ENDPOINT_MAX": str(CT_ENDPOINT_MAX),
    "MEMBRANE_CT_GC_INTERVAL": "2",
}

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
        gre = cluster.background("p0server", "rawcount", "47", "eof")
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


def test_fragments_are_judged_with_their_first_fragments_ports(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A non-first fragment carries no ports. Judged on port 0 it would pass an any-port allow
    # although its datagram goes to a denied port; it must be judged with its first fragment's
    # ports, and one whose first fragment was never seen dropped (175).
    victim = create_pod(cluster, "fragv", "app=fragv")
    attacker = create_pod(cluster, "fraga", "app=fraga")
    udp9301 = cluster.background("fragv", "serve", "udp", "9301")
    apply_text(
        cluster,
        tmp_path,
        "fragv",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fragv}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: fragv}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: fraga}}]}]\n"
        "  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: fraga}}]\n"
        "    toPorts: [{ports: [{port: '9301', protocol: UDP}]}]\n",
    )
    v_ip, a_ip = str(victim["ip"]), str(attacker["ip"])
    try:
        deadline = time.monotonic() + 15  # the deny is in force
        while cluster.probe("fraga", "udp", v_ip, "9301").returncode == 0:
            assert time.monotonic() < deadline, "UDP 9301 never denied"
        counter = cluster.background("fragv", "fragcount", "eof")
        assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
        arrivals = cluster.background("fragv", "count", "9300", "eof")
        for dport, ident, mode in (("9300", "1111", "whole"), ("9301", "2222", "whole")):
            sent = cluster.probe("fraga", "frags", a_ip, v_ip, dport, ident, mode)
            assert sent.returncode == 0, sent.stderr
        sent = cluster.probe("fraga", "frags", a_ip, v_ip, "9300", "3333", "rest")
        assert sent.returncode == 0, sent.stderr
        out, _ = counter.communicate(timeout=30)
        seen = json.loads(out.split("\n")[-2])
        # the allowed datagram whole; nothing of the denied one; no orphan fragment
        assert seen == {"1111": 1}, seen
        out, _ = arrivals.communicate(timeout=30)
        assert out.split()[-1] == "1", out
    finally:
        udp9301.kill()
        cluster.run("delete", "-f", str(tmp_path / "fragv.yaml"), check=False)
        cluster.run("pod", "delete", "fragv", "fraga", check=False)


SPRAY = 10_000  # over twice the conntrack map's CT_SIZE entries


def test_a_lone_syn_is_tracked_briefly_and_a_syn_spray_evicts_no_connection(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A SYN nobody answers is tracked for a minute (Cilium's SYN timeout), not six hours; and
    # a pod spraying SYNs fills only the unanswered connections' map: another pod's answered
    # flow keeps its entry, so the server's later push still reaches the victim, whose ingress
    # policy admits nothing new.
    victim = create_pod(cluster, "synv", "app=synv")
    create_pod(cluster, "syns", "app=syns")
    attacker = create_pod(cluster, "syna", "app=syna")
    listener = cluster.background("synv", "serve", "tcp", "80")
    server = cluster.background("syns", "echo2", "9400")
    apply_text(
        cluster,
        tmp_path,
        "synv",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: synv}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: synv}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: nobody}}]}]\n",
    )
    v_ip, a_ip, node = str(victim["ip"]), str(attacker["ip"]), str(victim["node"])
    s_ip = str(pod_info(cluster, "syns")["ip"])
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        denied_eventually(cluster, "syna", v_ip, "80")
        lone = cluster.probe("syna", "synspray", a_ip, v_ip, "7000", "1")
        assert lone.returncode == 0, lone.stderr
        rows = cluster.json("bpf", "ct", "--node", node)[0]["rows"]
        (entry,) = [r for r in rows if r["src"] == a_ip and r["dport"] == 7000]
        assert not entry.get("replied", True) and 0 < entry["expires_in"] <= 60, entry

        flow = cluster.background("synv", "udplate", s_ip, "9400", "40400", "30")
        assert flow.stdout is not None and flow.stdout.readline().strip() == "answered"
        spray = cluster.probe("syna", "synspray", a_ip, v_ip, "7001", str(SPRAY), timeout=120)
        assert spray.returncode == 0, spray.stderr
        # the server pushes to the victim's flow (told to by a datagram from someone else)
        assert cluster.probe("syna", "udp", s_ip, "9400").returncode == 0
        out, _ = flow.communicate(timeout=60)
        assert flow.returncode == 0, out  # 1: the flow's entry was evicted, the push dropped
    finally:
        listener.kill()
        server.kill()
        cluster.run("delete", "-f", str(tmp_path / "synv.yaml"), check=False)
        cluster.run("pod", "delete", "synv", "syns", "syna", check=False)


def test_a_connection_flood_holds_at_most_its_quota_of_conntrack(cluster: Cluster) -> None:
    # A pod whose peer answers every flow (a flood of answered connections, which a SYN spray's
    # separate map does not cover) moves at most its quota of them to the answered map; the
    # rest still work, tracked as unanswered (short-lived, evictable), and another pod's new
    # flow is still answered and moved.
    flooder = create_pod(cluster, "ctqa", "app=ctqa")
    bystander = create_pod(cluster, "ctqb", "app=ctqb")
    server = create_pod(cluster, "ctqs", "app=ctqs")
    listener = cluster.background("ctqs", "serve", "udp", "9500")
    a_ip, b_ip, s_ip = str(flooder["ip"]), str(bystander["ip"]), str(server["ip"])
    flows = 3 * CT_ENDPOINT_MAX
    try:

        def answers() -> None:
            assert cluster.probe("ctqb", "udp", s_ip, "9500").returncode == 0

        until(answers, "the server to answer", 15)
        flood = cluster.probe("ctqa", "udpflood", s_ip, "9500", str(flows))
        assert flood.returncode == 0, flood.stdout + flood.stderr  # every flow answered
        assert cluster.probe("ctqb", "udp", s_ip, "9500").returncode == 0

        def held(src: str) -> tuple[int, int]:
            rows = cluster.json("bpf", "ct", "--node", str(flooder["node"]))[0]["rows"]
            mine = [r for r in rows if r["src"] == src and r["scope"] == "egress"]
            mine = [r for r in mine if r["dst"] == s_ip and r["dport"] == 9500]
            return sum(r["replied"] for r in mine), sum(not r["replied"] for r in mine)

        answered, unanswered = held(a_ip)
        assert answered <= CT_ENDPOINT_MAX, (answered, unanswered)  # flows: all in ct before
        assert answered + unanswered >= flows, (answered, unanswered)
        assert held(b_ip)[0] >= 1  # the bystander's flow moved to ct all the same
        # the agent's sweeps recount the share from the map (the datapath only counts up):
        # after a few of them, a second flood still finds the quota held
        time.sleep(5)
        again = cluster.probe("ctqa", "udpflood", s_ip, "9500", str(flows))
        assert again.returncode == 0, again.stdout + again.stderr
        answered, unanswered = held(a_ip)
        assert answered <= CT_ENDPOINT_MAX, (answered, unanswered)
        assert answered + unanswered >= flows, (answered, unanswered)
    finally:
        listener.kill()
        cluster.run("pod", "delete", "ctqa", "ctqb", "ctqs", check=False)


def test_a_spray_or_a_flood_through_a_service_evicts_no_other_pods_translation(
    cluster: Cluster,
) -> None:
    # A service connection's records (lb_nat / lb_rnat) give its replies the service's address
    # back. A pod spraying SYNs at a cluster IP (nobody answers) fills only the unanswered
    # records' map, and one flooding answered flows through it holds at most its share of the
    # answered map: another pod's flow keeps its records, so the server's later push reaches
    # it from the service's address (its connected socket would not take it from the backend's).
    create_pod(cluster, "lbv", "app=lbv")
    attacker = create_pod(cluster, "lba", "app=lba")
    server = create_pod(cluster, "lbs", "app=lbs")
    s_ip, a_ip, node = str(server["ip"]), str(attacker["ip"]), str(attacker["node"])
    push_vip, flood_vip, syn_vip = "10.250.0.91", "10.250.0.92", "10.250.0.93"
    pusher = cluster.background("lbs", "echo2", "9410")
    answerer = cluster.background("lbs", "serve", "udp", "9412")
    try:
        assert pusher.stdout is not None and pusher.stdout.readline().strip() == "ready"
        for name, frontend, backend in (
            ("lbpush", f"{push_vip}:9410/UDP", f"{s_ip}:9410"),
            ("lbflood", f"{flood_vip}:9412/UDP", f"{s_ip}:9412"),
            ("lbsyn", f"{syn_vip}:80/TCP", f"{s_ip}:81"),
        ):
            cluster.run("service", "create", name, "--frontend", frontend, "--backend", backend)
        flow = cluster.background("lbv", "udplate", push_vip, "9410", "40410", "60")
        assert flow.stdout is not None and flow.stdout.readline().strip() == "answered"

        def records(client: str) -> list[dict[str, object]]:
            rows = cluster.json("bpf", "nat", "--node", node)[0]["rows"]
            return [r for r in rows if r["client"] == client and r["kind"] == "service"]

        spray = cluster.probe("lba", "synspray", a_ip, syn_vip, "80", str(SPRAY), timeout=120)
        assert spray.returncode == 0, spray.stderr
        assert not any(r["answered"] for r in records(a_ip))  # no SYN was answered
        flood = cluster.probe("lba", "udpflood", flood_vip, "9412", str(3 * CT_ENDPOINT_MAX))
        assert flood.returncode == 0, flood.stdout + flood.stderr  # every flow answered
        answered = [r for r in records(a_ip) if r["answered"]]
        assert 0 < len(answered) <= CT_ENDPOINT_MAX, len(answered)
        # the server pushes to the victim's flow (told to by a datagram from someone else)
        assert cluster.probe("lba", "udp", push_vip, "9410").returncode == 0
        out, _ = flow.communicate(timeout=60)
        assert flow.returncode == 0, out  # 1: the flow's records were evicted
    finally:
        pusher.kill()
        answerer.kill()
        cluster.run("service", "delete", "lbpush", "lbflood", "lbsyn", check=False)
        cluster.run("pod", "delete", "lbv", "lba", "lbs", check=False)


def _pid(cluster: Cluster, name: str) -> int:
    (pid,) = [p.pid for p in StateDir(cluster.state).processes() if p.name == name and p.running]
    return pid


def test_a_new_endpoint_drops_until_its_identitys_policy_arrives(cluster: Cluster) -> None:
    # The policy service is held (SIGSTOP) while a pod of a new identity is created: until the
    # identity's entry ("no policy selects it") is published, the pod's connections are
    # dropped (203), never let through unenforced; once it is, they pass.
    create_pod(cluster, "pendt", "app=pendt")
    target = str(pod_info(cluster, "pendt")["ip"])
    listener = cluster.background("pendt", "serve", "tcp", "80")
    policy = _pid(cluster, "policy-1")
    app = "pend" + secrets.token_hex(3)  # labels no identity had: no entry can exist yet
    os.kill(policy, signal.SIGSTOP)
    try:
        create = subprocess.Popen(
            membrane_command(
                "pod", "create", "pendp", "--labels", f"app={app}", "--node", cluster.nodes[0]
            ),
            env=cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while True:  # the pod exists (wired, published) while its create waits for policy
            attempt = cluster.probe("pendp", "tcp", target, "80")
            if "no pod" not in attempt.stderr + attempt.stdout:
                break
            assert time.monotonic() < deadline, attempt.stderr
            time.sleep(0.1)
        assert attempt.returncode == 1, attempt.stdout  # 0: it ran unenforced
        metrics = cluster.json("bpf", "metrics", "--node", cluster.nodes[0])[0]["rows"]
        assert any(r["reason"] == 203 and r["packets"] for r in metrics), metrics
    finally:
        os.kill(policy, signal.SIGCONT)
    try:
        out, err = create.communicate(timeout=30)
        assert create.returncode == 0, out + err

        def passes() -> None:  # once the entry is in ("no policy selects it")
            assert cluster.probe("pendp", "tcp", target, "80").returncode == 0

        until(passes, "the pod's connection to pass once its identity's entry is in", 15)
    finally:
        listener.kill()
        cluster.run("pod", "delete", "pendp", "pendt", check=False)
