"""The datapath as a user meets it: `membrane up --nodes 2`, pods, real packets, real policy.

One cluster serves the whole module (starting it compiles BPF on every node); each test makes
its own pods and policies and removes them. Resolved policy is written into the KV bucket
directly, as the policy service will do.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from membrane.state import StateDir
from shared import subjects
from shared.bus import Bus
from shared.messages import PolicyEntry, ResolvedPolicy
from tests.conftest import eventually
from tests.e2e.cluster import Cluster, counted, create_pod, pod_info
from tests.integration.test_flows import as_flow_batch

pytestmark = [pytest.mark.e2e, pytest.mark.root]

TCP, UDP = 6, 17


@pytest.fixture
async def bus(cluster: Cluster) -> AsyncIterator[Bus]:
    client = await Bus.connect(cluster.nats_url, "test", retry_for=5)
    yield client
    await client.close()


async def put_policy(bus: Bus, policy: ResolvedPolicy) -> None:
    kv = await bus.kv(subjects.KV_RESOLVED)
    await kv.put(str(policy.identity), msgspec.json.encode(policy))


async def clear_policy(bus: Bus, identity: int) -> None:
    """What the policy service publishes for an identity no policy selects (an identity without
    any entry is pending: its endpoints drop new connections)."""
    await put_policy(bus, ResolvedPolicy(identity=identity, revision=0))


class FlowTap:
    """Collects the flows all nodes publish."""

    def __init__(self) -> None:
        self.flows: list[dict[str, object]] = []

    async def start(self, bus: Bus) -> None:
        async def on_message(msg: Msg) -> None:
            batch = as_flow_batch(msg.data)  # binary (MEMBRANE_FLOW_WIRE's default) or JSON
            self.flows.extend(msgspec.to_builtins(f) for f in batch.flows)

        self.sub = await bus.nc.subscribe(subjects.FLOWS_ALL, cb=on_message)

    def drops(self, **match: object) -> list[dict[str, object]]:
        return [
            f
            for f in self.flows
            if f["verdict"] == "DROPPED" and all(f.get(k) == v for k, v in match.items())
        ]


def test_same_node_tcp_udp_icmp(cluster: Cluster) -> None:
    a = create_pod(cluster, "conn-a", "app=conn-a")
    b = create_pod(cluster, "conn-b", "app=conn-b")
    assert a["identity"] != b["identity"]
    servers = [cluster.background("conn-b", "serve", "tcp", "8080")]
    servers.append(cluster.background("conn-b", "serve", "udp", "8081"))
    try:
        assert "pong ping" in cluster.probe("conn-a", "tcp", str(b["ip"]), "8080").stdout
        assert "pong ping" in cluster.probe("conn-a", "udp", str(b["ip"]), "8081").stdout
        ping = cluster.run(
            "pod", "exec", "conn-a", "--", "ping", "-c", "2", "-W", "1", str(b["ip"]), check=False
        )
        assert ping.returncode == 0, ping.stdout
    finally:
        for proc in servers:
            proc.kill()
        cluster.run("pod", "delete", "conn-a", "conn-b")
    pods = cluster.json("pod", "list", "-A")
    assert not [p for p in pods if str(p["name"]).startswith("conn-")]
    # the maps forget them too, and so does the host: no veth, no namespace
    node = cluster.nodes[0]
    endpoints = cluster.json("bpf", "endpoints", "--node", node)[0]["rows"]
    assert {str(a["ip"]), str(b["ip"])}.isdisjoint({r["ip"] for r in endpoints})
    gone = {f"{a['ip']}/32", f"{b['ip']}/32"}
    deadline = time.monotonic() + 5  # the bucket's delete events reach the agent after the reply
    while not gone.isdisjoint(
        r["cidr"] for r in cluster.json("bpf", "ipcache", "--node", node)[0]["rows"]
    ):
        assert time.monotonic() < deadline, "deleted pods are still in the ipcache"
        time.sleep(0.1)
    assert not list(Path("/run/netns").glob(f"{node}_default_conn-*"))


async def test_identity_policy_allows_only_a_to_b_on_80(cluster: Cluster, bus: Bus) -> None:
    a = create_pod(cluster, "pol-a", "app=pol-a")
    b = create_pod(cluster, "pol-b", "app=pol-b")
    c = create_pod(cluster, "pol-c", "app=pol-c")
    ida, idb, idc = int(a["identity"]), int(b["identity"]), int(c["identity"])
    tap = FlowTap()
    await tap.start(bus)
    servers = [cluster.background("pol-b", "serve", "tcp", str(p)) for p in (80, 81)]
    try:
        allow = ResolvedPolicy(
            identity=idb,
            revision=1,
            ingress_enforced=True,
            ingress=[PolicyEntry(peer=ida, protocol=TCP, port=80, rule_id=7)],
            rules={7: "default/allow-a[0]"},
        )
        await put_policy(bus, allow)
        await asyncio.sleep(0.3)
        bip = str(b["ip"])
        ok = await asyncio.to_thread(cluster.probe, "pol-a", "tcp", bip, "80")
        assert "pong ping" in ok.stdout, ok.stdout  # the reply came back through the datapath
        wrong_port = await asyncio.to_thread(cluster.probe, "pol-a", "tcp", bip, "81")
        assert wrong_port.returncode == 1
        wrong_peer = await asyncio.to_thread(cluster.probe, "pol-c", "tcp", bip, "80")
        assert wrong_peer.returncode == 1

        async def drops_seen() -> None:
            port81 = tap.drops(src_identity=ida, dst_identity=idb, dst_port=81, reason=133)
            from_c = tap.drops(src_identity=idc, dst_identity=idb, dst_port=80, reason=133)
            assert port81 and from_c
            assert port81[0]["direction"] == "ingress"
            assert port81[0]["reason_name"] == "Policy denied"
            assert port81[0]["node"] == cluster.nodes[0]

        await eventually(drops_seen, timeout=5, what="drop events for both denied attempts")

        # a deny entry beats the allow, for the next new connection
        deny = msgspec.structs.replace(
            allow,
            revision=2,
            ingress=[*allow.ingress, PolicyEntry(peer=ida, protocol=TCP, deny=True, rule_id=8)],
            rules={7: "default/allow-a[0]", 8: "default/deny-a[0]"},
        )
        await put_policy(bus, deny)
        await asyncio.sleep(0.3)
        denied = await asyncio.to_thread(cluster.probe, "pol-a", "tcp", bip, "80")
        assert denied.returncode == 1

        async def deny_seen() -> None:
            found = tap.drops(src_identity=ida, dst_identity=idb, dst_port=80, reason=181)
            assert found and found[0]["rule_id"] == 8

        await eventually(deny_seen, timeout=5, what="a 181 drop naming the deny rule")

        installed = cluster.json("bpf", "policy", "pol-b")
        rules = {row["rule"] for row in installed[0]["rows"]}
        assert rules == {"default/deny-a[0]"}, installed  # the covered allow became the deny

        # back to allow-only; then no policy at all opens everything again
        await put_policy(bus, msgspec.structs.replace(allow, revision=3))
        await asyncio.sleep(0.3)
        assert (await asyncio.to_thread(cluster.probe, "pol-a", "tcp", bip, "80")).returncode == 0
        await clear_policy(bus, idb)
        await asyncio.sleep(0.3)
        assert (await asyncio.to_thread(cluster.probe, "pol-c", "tcp", bip, "81")).returncode == 0

        metrics = cluster.json("bpf", "metrics", "--node", cluster.nodes[0])
        rows = metrics[0]["rows"]
        assert any(r["reason"] == 133 and r["packets"] > 0 for r in rows)
        assert any(r["reason"] == 181 and r["packets"] > 0 for r in rows)
    finally:
        await tap.sub.unsubscribe()
        for proc in servers:
            proc.kill()
        await clear_policy(bus, idb)
        cluster.run("pod", "delete", "pol-a", "pol-b", "pol-c")


def _agent_pid(cluster: Cluster, node: str) -> int:
    for proc in StateDir(cluster.state).processes():
        if proc.name == f"datapath-{node}":
            return proc.pid
    raise AssertionError(f"no agent process for {node}")


async def test_agent_sigkill_loses_nothing_and_lets_nothing_through(
    cluster: Cluster, bus: Bus
) -> None:
    a = create_pod(cluster, "rs-a", "app=rs-a")
    b = create_pod(cluster, "rs-b", "app=rs-b")
    create_pod(cluster, "rs-c", "app=rs-c")
    ida, idb = int(a["identity"]), int(b["identity"])
    await put_policy(
        bus,
        ResolvedPolicy(
            identity=idb,
            revision=1,
            ingress_enforced=True,
            ingress=[PolicyEntry(peer=ida, protocol=UDP, port=9000, rule_id=1)],
        ),
    )
    await asyncio.sleep(0.3)
    node = cluster.nodes[0]
    counters = [cluster.background("rs-b", "count", str(p), "eof") for p in (9000, 9001)]
    bip = str(b["ip"])
    # 500 datagrams 10 ms apart on the allowed path (a -> b:9000) and on a denied one (c -> b:9001)
    senders = [
        cluster.background("rs-a", "stream", bip, "9000", "500", "10"),
        cluster.background("rs-c", "stream", bip, "9001", "500", "10"),
    ]
    try:
        await asyncio.sleep(1.0)
        old = _agent_pid(cluster, node)
        os.kill(old, signal.SIGKILL)

        async def restarted() -> None:
            pid = _agent_pid(cluster, node)
            assert pid != old
            services = await bus.discover(subjects.DATAPATH_SERVICE, timeout=0.3)
            assert node in {s.metadata.get("node") for s in services}

        await eventually(restarted, timeout=20, what="the agent to come back")
        allowed, denied = counted(senders, counters)
        assert allowed == 500, f"allowed path lost {500 - allowed} of 500 datagrams"
        assert denied == 0, f"denied path let {denied} datagrams through"
    finally:
        for proc in senders + counters:
            proc.kill()
        await clear_policy(bus, idb)
        cluster.run("pod", "delete", "rs-a", "rs-b", "rs-c")


def test_duplicate_pod_and_bad_input_are_clear_errors(cluster: Cluster) -> None:
    create_pod(cluster, "dup", "app=dup")
    try:
        again = cluster.run("pod", "create", "dup", check=False)
        assert again.returncode == 1
        assert "already exists" in again.stderr
        bad = cluster.run("pod", "create", "Not_Valid", check=False)
        assert bad.returncode == 1 and "metadata.name" in bad.stderr, bad.stderr
        listed = [p["name"] for p in cluster.json("pod", "list", "-A")]
        assert listed.count("dup") == 1 and "Not_Valid" not in listed
    finally:
        cluster.run("pod", "delete", "dup")


def test_apply_namespace_and_deployment(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(
        """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: blue}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, ports: [{containerPort: 80, name: http}]}]
"""
    )
    applied = cluster.run("apply", "-f", str(manifest))
    assert "deployment/web" in applied.stdout
    pods = [p for p in cluster.json("pod", "list", "-n", "shop")]
    assert len(pods) == 3
    assert {p["node"] for p in pods} == set(cluster.nodes)  # spread over both nodes
    assert len({p["identity"] for p in pods}) == 1  # replicas share one identity
    identity = cluster.json("identity", "get", str(pods[0]["identity"]))
    labels = set(identity["labels"])
    assert "k8s:io.cilium.k8s.namespace.labels.team=blue" in labels
    assert "k8s:io.kubernetes.pod.namespace=shop" in labels
    # idempotent
    assert "unchanged" in cluster.run("apply", "-f", str(manifest)).stdout
    # relabelling the namespace moves its pods to the identity of their new labels
    relabelled = tmp_path / "relabel.yaml"
    relabelled.write_text(manifest.read_text().replace("team: blue", "team: red"))
    cluster.run("apply", "-f", str(relabelled))
    deadline = time.monotonic() + 10
    while True:
        now = cluster.json("pod", "list", "-n", "shop")
        ids = {p["identity"] for p in now}
        labels = set(cluster.json("identity", "get", str(now[0]["identity"]))["labels"])
        if "k8s:io.cilium.k8s.namespace.labels.team=red" in labels and len(ids) == 1:
            break
        assert time.monotonic() < deadline, f"pods kept their old identity: {ids} {labels}"
        time.sleep(0.2)
    assert ids != {pods[0]["identity"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest.read_text().replace("containerPort: 80", "containerPort: 70000"))
    rejected = cluster.run("apply", "-f", str(bad), check=False)
    assert rejected.returncode == 1 and "containerPort" in rejected.stderr
    deleted = cluster.run("delete", "-f", str(manifest))
    assert "deleted" in deleted.stdout
    assert not cluster.json("pod", "list", "-n", "shop")


def test_cni_add_check_del_version(cluster: Cluster, tmp_path: Path) -> None:
    netns_name = f"{cluster.name}-cni-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    node = cluster.nodes[1]
    config = json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "membrane",
            "type": "membrane-cni",
            "agentSocket": f"/run/membrane/{node}/agent.sock",
        }
    )
    base = {
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": f"/run/netns/{netns_name}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=cni-pod",
        "CNI_PATH": "/opt/cni/bin",
    }

    def cni(command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shared.cni"],
            input=config,
            env={**os.environ, **base, "CNI_COMMAND": command, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        version = cni("VERSION")
        assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]
        added = cni("ADD")
        assert added.returncode == 0, added.stdout + added.stderr
        result = json.loads(added.stdout)
        assert result["cniVersion"] == "1.0.0"
        address = result["ips"][0]["address"]
        assert pod_info(cluster, "cni-pod")["ip"] == address.split("/")[0]
        assert cni("CHECK").returncode == 0
        missing = cni("ADD", CNI_NETNS="")
        assert missing.returncode != 0
        assert json.loads(missing.stdout)["code"] == 4  # invalid necessary environment variables
        assert cni("DEL").returncode == 0
        assert cni("DEL").returncode == 0  # DEL is idempotent
        pods = cluster.json("pod", "list", "-A")
        assert "cni-pod" not in [p["name"] for p in pods]
    finally:
        cni("DEL")
        subprocess.run(["ip", "netns", "del", netns_name], check=False)


def test_cilium_network_policy_through_the_policy_service(cluster: Cluster, tmp_path: Path) -> None:
    """A CNP applied with `membrane apply` is resolved, enforced on real packets, explained."""
    ds = create_pod(cluster, "deathstar", "org=empire,class=deathstar")
    create_pod(cluster, "tiefighter", "org=empire,class=tiefighter")
    create_pod(cluster, "xwing", "org=alliance,class=xwing")
    server = cluster.background("deathstar", "serve", "tcp", "80")
    policy = tmp_path / "cnp.yaml"
    policy.write_text(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: empire-only}
spec:
  description: only empire ships may reach the deathstar on 80/TCP
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
    )
    try:
        applied = cluster.run("apply", "-f", str(policy))
        assert "CiliumNetworkPolicy/default/empire-only created" in applied.stdout
        ip = str(ds["ip"])
        deadline = time.monotonic() + 10
        while cluster.probe("xwing", "tcp", ip, "80").returncode == 0:
            assert time.monotonic() < deadline, "the policy never took effect"
            time.sleep(0.2)
        assert cluster.probe("tiefighter", "tcp", ip, "80").returncode == 0
        allowed = cluster.run(
            "policy",
            "explain",
            "--from",
            "tiefighter",
            "--to",
            "deathstar",
            "--port",
            "80/TCP",
            check=False,
        )
        assert allowed.returncode == 0, allowed.stdout
        denied = cluster.run(
            "policy",
            "explain",
            "--from",
            "xwing",
            "--to",
            "deathstar",
            "--port",
            "80/TCP",
            check=False,
        )
        assert denied.returncode == 1
        assert "default/empire-only" in denied.stdout, denied.stdout
        assert "from default/xwing: identity" in denied.stdout, denied.stdout
        # docs/policy.md: 0 allowed, 1 dropped, 2 an error (here an unknown workload)
        unknown = cluster.run(
            "policy", "explain", "--from", "nobody", "--to", "deathstar", check=False
        )
        assert unknown.returncode == 2 and "no pod or deployment default/nobody" in unknown.stderr
        listed = cluster.json("policy", "list")
        assert [(p["name"], p["subjects"]) for p in listed] == [("empire-only", 1)]
        assert "empire-only" in cluster.run("policy", "get", "empire-only").stdout
        # a bad document is refused whole, naming the field; the stored policy is untouched
        bad = tmp_path / "bad.yaml"
        bad.write_text(policy.read_text().replace('port: "80"', 'port: "70000"'))
        refused = cluster.run("policy", "apply", "-f", str(bad), check=False)
        assert refused.returncode == 1 and "port" in refused.stderr, refused.stderr
        assert cluster.probe("tiefighter", "tcp", ip, "80").returncode == 0
        cluster.run("delete", "-f", str(policy))
        deadline = time.monotonic() + 10
        while cluster.probe("xwing", "tcp", ip, "80").returncode != 0:
            assert time.monotonic() < deadline, "deleting the policy did not open the port"
            time.sleep(0.2)
    finally:
        server.kill()
        cluster.run("policy", "delete", "empire-only", check=False)
        cluster.run("pod", "delete", "deathstar", "tiefighter", "xwing")


async def test_audit_mode_reports_and_lets_through(
    cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    target = create_pod(cluster, "audited", "app=audited")
    client = create_pod(cluster, "auditor", "app=auditor")
    server = cluster.background("audited", "serve", "tcp", "80")
    policy = tmp_path / "lockdown.yaml"
    policy.write_text(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {matchLabels: {app: audited}}
  ingress: [{}]
"""
    )
    tap = FlowTap()
    await tap.start(bus)
    try:
        await asyncio.to_thread(cluster.run, "policy", "apply", "--audit", "-f", str(policy))

        async def audited() -> None:
            # a new connection each time, until the policy is in and reported
            done = await asyncio.to_thread(cluster.probe, "auditor", "tcp", str(target["ip"]), "80")
            assert done.returncode == 0, done.stdout  # audit mode never drops
            found = [
                f
                for f in tap.flows
                if f["verdict"] == "AUDIT"
                and f["src_identity"] == client["identity"]
                and f["dst_identity"] == target["identity"]
            ]
            assert found and found[0]["reason"] == 133 and found[0]["direction"] == "ingress"

        await eventually(audited, timeout=15, what="an AUDIT flow for the would-be drop")
        explained = await asyncio.to_thread(
            cluster.run,
            "policy",
            "explain",
            "--from",
            "auditor",
            "--to",
            "audited",
            "--port",
            "80/TCP",
            check=False,
        )
        assert explained.returncode == 0 and "AUDIT" in explained.stdout, explained.stdout
    finally:
        await tap.sub.unsubscribe()
        server.kill()
        await asyncio.to_thread(cluster.run, "policy", "delete", "lockdown", check=False)
        await asyncio.to_thread(cluster.run, "pod", "delete", "audited", "auditor")


def test_the_agent_logs_as_membrane_up_asks(cluster: Cluster) -> None:
    """`membrane up` runs every service with MEMBRANE_LOG_FORMAT=json; the agent honours it
    (shared/startup.py), so its structlog lines are JSON naming the service and node. (Other
    lines, such as the C compiler's warnings, are not structlog's.)"""
    logs = StateDir(cluster.state).logs
    for node in cluster.nodes:
        lines = (logs / f"datapath-{node}.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        ready = [r for r in records if r.get("event") == "datapath agent ready"]
        assert ready, f"no JSON 'ready' line in the log of datapath-{node}"
        assert all(r["service"] == "datapath" and r["node"] == node for r in ready)
        console = [line for line in lines if "[info" in line or "[warning" in line]
        assert console == [], f"datapath-{node} logged in the console format"
