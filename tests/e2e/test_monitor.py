"""`membrane observe`, metrics and event subscriptions against a real cluster and real packets.

Three pods on one node; a CiliumNetworkPolicy lets tiefighter reach the deathstar on 80/TCP and
denies xwing outright. The denied connection must come out of `membrane observe` with both
pods' names, namespaces, labels and identities, the reason's name and the policy; the allowed
one as FORWARDED; the metrics must move over HTTP (read by a real Prometheus server too); and
an external subscriber must receive the drop on the documented subject.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, membrane_command
from tests.e2e.cluster import Cluster, create_pod, until

pytestmark = [pytest.mark.e2e, pytest.mark.root]


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: empire-guard
  namespace: default
spec:
  endpointSelector:
    matchLabels: {app: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: tiefighter}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: xwing}
"""


def observe(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    out = cluster.run("observe", "-o", "json", "--last", "1000", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metrics_addresses(cluster: Cluster) -> dict[str, list[str]]:
    status = cluster.json("status")
    found: dict[str, list[str]] = {}
    for service in status["services"]:
        address = service["metadata"].get("metrics")
        if address:
            found.setdefault(service["name"], []).append(address)
    return found


@pytest.fixture(scope="module")
def world(cluster: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    pods = {
        "deathstar": create_pod(cluster, "deathstar", "app=deathstar,org=empire"),
        "xwing": create_pod(cluster, "xwing", "app=xwing,org=alliance"),
        "tiefighter": create_pod(cluster, "tiefighter", "app=tiefighter,org=empire"),
    }
    server = cluster.background("deathstar", "serve", "tcp", "80")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(POLICY)
        f.flush()
        cluster.run("apply", "-f", f.name)
    ip = str(pods["deathstar"]["ip"])

    def enforced() -> None:
        assert cluster.probe("tiefighter", "tcp", ip, "80").returncode == 0
        assert cluster.probe("xwing", "tcp", ip, "80", timeout=10).returncode == 1

    until(enforced, "the policy to be enforced")
    try:
        yield pods
    finally:
        server.kill()
        cluster.run("policy", "delete", "empire-guard", check=False)
        cluster.run("pod", "delete", *pods, check=False)


def test_a_denied_connection_names_both_pods_the_reason_and_the_policy(
    cluster: Cluster, world: dict[str, dict[str, Any]]
) -> None:
    ds, xw = world["deathstar"], world["xwing"]
    cluster.probe("xwing", "tcp", str(ds["ip"]), "80", timeout=10)

    def dropped() -> dict[str, Any]:
        flows = observe(cluster, "--verdict", "DROPPED", "--from-pod", "default/xwing")
        assert flows, "no drop from xwing yet"
        return flows[-1]

    flow = until(dropped, "xwing's drop in observe")
    src, dst = flow["source"], flow["destination"]
    assert flow["verdict"] == "DROPPED" and flow["type"] == "drop"
    assert (src["namespace"], src["pod"], src["identity"]) == ("default", "xwing", xw["identity"])
    assert (dst["namespace"], dst["pod"], dst["identity"]) == (
        "default",
        "deathstar",
        ds["identity"],
    )
    assert "k8s:app=xwing" in src["labels"] and "k8s:org=alliance" in src["labels"]
    assert "k8s:app=deathstar" in dst["labels"]
    assert flow["drop_reason"] == 181 and flow["drop_reason_desc"] == "Policy denied by denylist"
    assert flow["policy"] == "default/empire-guard" and flow["rule"].startswith(
        "default/empire-guard["
    )
    assert dst["port"] == 80 and flow["protocol"] == "TCP" and "SYN" in flow["tcp_flags"]
    assert flow["direction"] == "ingress" and flow["node"] == cluster.nodes[0]

    # no rule matches tiefighter on 81: a default-deny drop names the policy that enforces it
    cluster.probe("tiefighter", "tcp", str(ds["ip"]), "81", timeout=10)

    def default_deny() -> dict[str, Any]:
        flows = observe(cluster, "--verdict", "DROPPED", "--from-pod", "tiefighter")
        assert flows, "no drop from tiefighter yet"
        return flows[-1]

    flow = until(default_deny, "tiefighter's default-deny drop")
    assert flow["drop_reason_desc"] == "Policy denied" and flow["rule"] == ""
    assert flow["policy"] == "default/empire-guard"

    # the compact line, as people read it
    line = cluster.run("observe", "--verdict", "DROPPED", "--from-pod", "xwing", "--last", "1")
    assert "default/xwing:" in line.stdout and "-> default/deathstar:80" in line.stdout
    assert (
        "Policy denied by denylist DROPPED (TCP Flags: SYN) by default/empire-guard" in line.stdout
    )


def test_allowed_traffic_is_forwarded_and_filters_select_what_they_say(
    cluster: Cluster, world: dict[str, dict[str, Any]]
) -> None:
    ds = world["deathstar"]
    assert cluster.probe("tiefighter", "tcp", str(ds["ip"]), "80").returncode == 0
    cluster.probe("xwing", "tcp", str(ds["ip"]), "80", timeout=10)

    def forwarded() -> list[dict[str, Any]]:
        flows = observe(cluster, "--verdict", "FORWARDED", "--from-pod", "tiefighter")
        assert any(f["destination"]["pod"] == "deathstar" for f in flows)
        return flows

    flows = until(forwarded, "tiefighter's connection as FORWARDED")
    verdict = [
        f for f in flows if f["type"] == "policy-verdict" and f["destination"]["pod"] == "deathstar"
    ]
    assert verdict and verdict[-1]["policy"] == "default/empire-guard"

    everything = observe(cluster, "--to-pod", "deathstar")
    assert {f["verdict"] for f in everything} >= {"FORWARDED", "DROPPED"}
    assert all(f["destination"]["pod"] == "deathstar" for f in everything)
    not_dropped = observe(cluster, "--to-pod", "deathstar", "--not", "--verdict", "DROPPED")
    assert not_dropped and all(f["verdict"] != "DROPPED" for f in not_dropped)
    assert len(not_dropped) < len(everything)
    by_label = observe(cluster, "--from-label", "org=empire", "--to-port", "80")
    assert by_label and all(f["source"]["pod"] == "tiefighter" for f in by_label)
    by_identity = observe(cluster, "--from-identity", str(world["xwing"]["identity"]))
    assert by_identity and all(f["source"]["pod"] == "xwing" for f in by_identity)
    not_xwing = observe(cluster, "--to-pod", "deathstar", "--not", "--from-pod", "xwing")
    assert not_xwing and all(f["source"]["pod"] != "xwing" for f in not_xwing)
    assert not observe(cluster, "--to-pod", "deathstar", "--node", "no-such-node")
    assert not observe(cluster, "--to-pod", "deathstar", "--protocol", "UDP")
    table = cluster.run("observe", "--to-pod", "deathstar", "-o", "table", "--last", "5").stdout
    assert table.splitlines()[0].split()[:3] == ["TIMESTAMP", "SOURCE", "DESTINATION"]
    bad = cluster.run("observe", "--verdict", "MAYBE", check=False)
    assert bad.returncode == 1 and "unknown verdict" in bad.stderr


def test_follow_and_an_external_subscriber_receive_new_flows(
    cluster: Cluster, world: dict[str, dict[str, Any]]
) -> None:
    env = cluster.env()
    follow = subprocess.Popen(
        membrane_command(
            "observe",
            "--follow",
            "--ready",
            "--verdict",
            "DROPPED",
            "--from-pod",
            "xwing",
            "-o",
            "json",
            "--max-flows",
            "1",
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    subscriber = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "examples" / "flow_subscriber.py"),
            cluster.nats_url,
            "membrane.events.flowbatches.DROPPED.default",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stderr is not None and subscriber.stderr is not None
        assert follow.stderr.readline().strip() == "following"
        assert subscriber.stderr.readline().startswith("subscribed")
        cluster.probe("xwing", "tcp", str(world["deathstar"]["ip"]), "80", timeout=10)
        out, _err = follow.communicate(timeout=30)
        flow = json.loads(out.splitlines()[0])
        assert flow["source"]["pod"] == "xwing" and flow["verdict"] == "DROPPED"
        assert subscriber.stdout is not None
        line = subscriber.stdout.readline()
        assert line.startswith(
            "membrane.events.flowbatches.DROPPED.default: default/xwing -> default/deathstar:80"
        )
        assert "policy=default/empire-guard" in line
    finally:
        follow.kill()
        subscriber.kill()
        follow.wait()
        subscriber.wait()


def test_metrics_move_with_the_traffic_and_prometheus_scrapes_them(
    cluster: Cluster, world: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    addresses = metrics_addresses(cluster)
    (monitor,) = addresses["membrane-monitor"]
    agents = addresses["membrane-datapath"]
    denylist = (("direction", "ingress"), ("reason", "Policy denied by denylist"))
    drops = ("membrane_monitor_drops_total", denylist)
    packets = ("membrane_datapath_packets_total", denylist)

    def agent_packets() -> float:
        return sum(scrape(a).get(packets, 0.0) for a in agents)

    before, before_agents = scrape(monitor).get(drops, 0.0), agent_packets()
    for _ in range(3):
        cluster.probe("xwing", "tcp", str(world["deathstar"]["ip"]), "80", timeout=10)

    def moved() -> None:
        assert scrape(monitor).get(drops, 0.0) >= before + 3
        assert agent_packets() >= before_agents + 3

    until(moved, "drop counters to move")
    assert scrape(agents[0]).get(("membrane_datapath_map_capacity", (("map", "policy"),)), 0) > 0

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("the Debian package prometheus is missing: run scripts/setup.sh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            global: {{scrape_interval: 1s, scrape_timeout: 1s}}
            scrape_configs:
            - job_name: membrane
              static_configs:
              - targets: {json.dumps([monitor, *agents])}
            """
        )
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> float:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        except OSError as exc:
            raise AssertionError(f"prometheus not answering: {exc}") from exc
        result = body["data"]["result"]
        assert result, f"no samples for {expr}"
        return float(result[0]["value"][1])

    try:
        until(lambda: query('count(up{job="membrane"} == 1)'), "prometheus to scrape", 60)
        expr = 'sum(membrane_monitor_drops_total{reason="Policy denied by denylist"})'
        first = until(lambda: query(expr), "the drop counter in prometheus", 60)
        agent_expr = 'sum(membrane_datapath_bytes_total{reason="Policy denied by denylist"})'
        assert until(lambda: query(agent_expr), "agent bytes in prometheus", 60) > 0
        cluster.probe("xwing", "tcp", str(world["deathstar"]["ip"]), "80", timeout=10)

        def grew() -> None:
            assert query(expr) > first

        until(grew, "prometheus to see the counter grow", 60)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_status_lists_services_nodes_counts_and_map_pressure(
    cluster: Cluster, world: dict[str, dict[str, Any]]
) -> None:
    status = cluster.json("status")
    names = {s["name"] for s in status["services"]}
    assert {
        "membrane-monitor",
        "membrane-datapath",
        "membrane-identity",
        "membrane-policy",
    } <= names
    assert [n["name"] for n in status["nodes"]] == cluster.nodes
    assert all(n["alive"] for n in status["nodes"])
    counts = status["counts"]
    assert counts["identities"] >= 3  # the three pods'; reserved ones are not in the bucket
    assert counts["endpoints"] >= 3 and counts["policies"] >= 1
    (monitor,) = status["monitor"]
    assert monitor["flows_seen"] > 0 and monitor["malformed_batches"] == 0
    assert set(status["map_pressure"]) == set(cluster.nodes)
    pressure = status["map_pressure"][cluster.nodes[0]]
    assert pressure["endpoints"][0] >= 3 and pressure["policy"][1] > 0
    table = cluster.run("status").stdout
    for part in ("membrane-monitor", "IDENTITIES", "PRESSURE", cluster.nodes[1], "FLOWS SEEN"):
        assert part in table, part
