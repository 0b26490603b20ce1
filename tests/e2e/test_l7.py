"""L7 policy on real packets: Cilium's Star Wars demo, manifests unchanged (examples/starwars).

Two nodes, VXLAN: the deathstar's two replicas land on both, so the ships' calls through the
Service reach the proxy of their own node and of the other one. The deathstar's API runs in both
deathstar replicas (tests/e2e/starwars.py);
the ships call it through the deathstar Service, as in Cilium's getting-started guide. The
policy restricts the deathstar's port 80 to POST /v1/request-landing from empire ships: the
tiefighter lands, its PUT /v1/exhaust-port gets 403 "Access denied" (a DROPPED L7 flow names the
policy), the xwing is dropped at L3/L4, and removing the policy restores the explosion.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from membrane.state import StateDir
from shared.proxy import from_proxy_mark
from tests.conftest import REPO, membrane_command
from tests.e2e.cluster import Cluster, down_leaving_nothing, free_octet, until, up

pytestmark = [pytest.mark.e2e, pytest.mark.root]

STARWARS = REPO / "examples" / "starwars"
APP = STARWARS / "http-sw-app.yaml"
POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
CLIENT = Path(__file__).with_name("starwars.py")
LANDING = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")
TIEFIGHTER_ANY = 257  # any identity will do: the mark must not survive the pod's veth
LANDED = {"status": 200, "body": "Ship landed\n"}
DENIED = {"status": 403, "body": "Access denied\r\n"}
# the same policy, with the exhaust port opened as well
POLICY_WITH_PUT = POLICY.read_text() + (
    '        - method: "PUT"\n          path: "/v1/exhaust-port"\n'
)


@dataclass
class Galaxy:
    cluster: Cluster
    vip: str

    def exec(self, ship: str, *args: str) -> list[str]:
        return membrane_command("pod", "exec", ship, "--", sys.executable, str(CLIENT), *args)

    def request(
        self, ship: str, *calls: tuple[str, str], timeout: float = 2
    ) -> list[dict[str, Any]]:
        """The answers to ``calls``, made one after the other on one connection from ``ship``."""
        args = [a for call in calls for a in call]
        result = subprocess.run(
            self.exec(ship, "request", str(timeout), self.vip, "80", *args),
            env=self.cluster.env(), capture_output=True, text=True,
            timeout=30 + timeout * len(calls),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def flows(self, *args: str) -> list[dict[str, Any]]:
        out = self.cluster.run("observe", "-o", "json", "--last", "2000", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def apply(self, text: str) -> str:
        return self.cluster.run("apply", "-f", "-", input_text=text).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    state = tmp_path_factory.mktemp("cluster") / "state"
    c = Cluster(state=state, name="l" + secrets.token_hex(3), nats_url="")
    up(c, free_octet())
    try:
        yield c
    finally:
        down_leaving_nothing(c)


@pytest.fixture(scope="module")
def galaxy(cluster: Cluster) -> Iterator[Galaxy]:
    cluster.run("apply", "-f", str(APP))
    servers = []
    for pod in cluster.json("pod", "list"):
        if pod["labels"].get("class") == "deathstar":
            server = subprocess.Popen(
                membrane_command("pod", "exec", pod["name"], "--", sys.executable, str(CLIENT),
                                 "serve", "80"),
                env=cluster.env(), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            servers.append(server)
    assert len(servers) == 2
    vip = cluster.json("service", "get", "deathstar")["frontends"][0]["ip"]
    galaxy = Galaxy(cluster, vip)
    # without a policy anyone can blow up the deathstar: the tests' own control
    (exploded,) = galaxy.request("tiefighter", EXHAUST, timeout=5)
    assert exploded["status"] == 503 and "exploded" in exploded["body"], exploded
    applied = cluster.run("apply", "-f", str(POLICY))
    assert "L7 rules" in applied.stdout
    until(lambda: _landed(galaxy), "the L7 policy in force")
    try:
        yield galaxy
    finally:
        for server in servers:
            server.kill()
            server.wait()


def _landed(galaxy: Galaxy) -> None:
    assert galaxy.request("tiefighter", LANDING, EXHAUST) == [LANDED, DENIED]


def test_exhaust_port_denied_landing_allowed_on_one_connection(galaxy: Galaxy) -> None:
    # one keep-alive connection: a denied request leaves it usable for the next
    answers = galaxy.request("tiefighter", LANDING, EXHAUST, LANDING, EXHAUST, ("GET", "/v1"))
    assert answers == [LANDED, DENIED, LANDED, DENIED, {"status": 403, "body": DENIED["body"]}]

    # the denied request as an L7 flow: both workloads, the request, the deciding policy
    def l7_drop() -> dict[str, Any]:
        flows = galaxy.flows("--type", "l7", "--http-method", "PUT", "--http-status", "403")
        assert flows, "no L7 flow for the PUT"
        return flows[-1]

    flow = until(l7_drop, "a DROPPED L7 flow for the exhaust port")
    assert flow["verdict"] == "DROPPED" and flow["policy"] == "default/rule1", flow
    assert flow["l7"]["url"] == "/v1/exhaust-port" and flow["l7"]["protocol"] == "http", flow
    assert flow["source"]["pod"] == "tiefighter", flow
    assert flow["destination"]["pod"].startswith("deathstar-"), flow
    landed = galaxy.flows("--type", "l7", "--http-path", "^/v1/request-landing$")
    assert landed and landed[-1]["verdict"] == "FORWARDED", landed
    assert landed[-1]["l7"]["status"] == 200 and landed[-1]["l7"]["latency_ms"] > 0
    # the datapath reported the connection going to the proxy: a trace on the client's node, a
    # policy verdict on the server's when the backend is on the other node
    steered = [
        f
        for kind in ("trace", "policy-verdict")
        for f in galaxy.flows("--from-pod", "tiefighter", "--type", kind)
        if f["observation_point"] == "to-proxy"
    ]
    assert steered, "no to-proxy event for the tiefighter's connections"


def test_a_pod_cannot_forge_the_proxys_mark(galaxy: Galaxy) -> None:
    """A tiefighter claiming to be the proxy (SO_MARK with the proxy's magic) is still sent to
    the proxy and checked: from_container never reads the mark, and the kernel scrubs it when
    the packet leaves the pod's namespace."""
    forged = hex(from_proxy_mark(TIEFIGHTER_ANY))
    result = subprocess.run(
        membrane_command("pod", "exec", "tiefighter", "--", "env", f"STARWARS_MARK={forged}",
                         sys.executable, str(CLIENT), "request", "2", galaxy.vip, "80",
                         *EXHAUST, *LANDING),
        env=galaxy.cluster.env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers == [DENIED, LANDED], answers


def test_xwing_times_out_at_l3_l4(galaxy: Galaxy) -> None:
    assert galaxy.request("xwing", LANDING) == [{"error": "TimeoutError"}]
    drops = galaxy.flows("--verdict", "DROPPED", "--from-pod", "xwing")
    assert drops and drops[-1]["drop_reason"] == 133 and drops[-1]["type"] == "drop", drops


def test_policy_change_applies_to_the_next_request_of_an_open_connection(
    galaxy: Galaxy,
) -> None:
    session = subprocess.Popen(
        galaxy.exec("tiefighter", "session", galaxy.vip, "80"),
        env=galaxy.cluster.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert session.stdin is not None and session.stdout is not None
    assert session.stdout.readline().strip() == "ready"

    asked: list[str] = []

    def ask(method: str, path: str) -> dict[str, Any]:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(f"{method} {path}\n")
        session.stdin.flush()
        asked.append(path)
        return dict(json.loads(session.stdout.readline()))

    try:
        assert ask(*EXHAUST) == DENIED
        galaxy.apply(POLICY_WITH_PUT)
        deadline = time.monotonic() + 15
        while (answer := ask(*EXHAUST)) == DENIED:  # the same connection all along
            assert time.monotonic() < deadline, "the opened exhaust port never applied"
            time.sleep(0.2)
        assert answer["status"] == 503, answer
        galaxy.apply(POLICY.read_text())
        deadline = time.monotonic() + 15
        while (answer := ask(*EXHAUST))["status"] == 503:
            assert time.monotonic() < deadline, "the closed exhaust port never applied"
            time.sleep(0.2)
        assert answer == DENIED and ask(*LANDING) == LANDED
    finally:
        session.kill()
        session.wait()
        galaxy.apply(POLICY.read_text())

    # every request of the session was one L7 flow, all on the one client connection (a
    # connection reopened behind the client's back would show a second port)
    def session_flows() -> list[dict[str, Any]]:
        flows = galaxy.flows("--type", "l7", "--from-pod", "tiefighter")[-len(asked) :]
        assert [f["l7"]["url"] for f in flows] == asked, flows
        return flows

    flows = until(session_flows, "the session's L7 flows")
    assert len({f["source"]["port"] for f in flows}) == 1, flows
    assert [f["l7"]["status"] for f in flows][-2:] == [403, 200], flows


def _reused(cluster: Cluster) -> float:
    """``membrane_proxy_upstreams_reused_total`` of every node's proxy, added up (each read
    inside its node, where it listens)."""
    total = 0.0
    for proxy in cluster.json("status")["services"]:
        if proxy["name"] != "membrane-proxy":
            continue
        url = f"http://{proxy['metadata']['metrics']}/metrics"
        read = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
        text = subprocess.run(
            ["ip", "netns", "exec", proxy["metadata"]["node"], sys.executable, "-c", read],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        for line in text.splitlines():
            if line.startswith("membrane_proxy_upstreams_reused_total "):
                total += float(line.split()[1])
    return total


def test_new_connections_reuse_the_proxys_upstreams_and_each_request_is_judged(
    galaxy: Galaxy,
) -> None:
    """A ship making a new connection per request (http.client, which ends its side after the
    answer): the proxies hand their upstream connections to the deathstar on from one client
    connection to the next (pool.py), every request still answered as the policy says."""
    before = _reused(galaxy.cluster)
    for call, expected in ((LANDING, "200"), (EXHAUST, "403")):
        hammer = subprocess.run(
            galaxy.exec("tiefighter", "hammer", "2", galaxy.vip, "80", *call),
            env=galaxy.cluster.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        outcomes = json.loads(hammer.stdout.splitlines()[-1])
        assert list(outcomes) == [expected] and outcomes[expected] > 20, outcomes
        if call == LANDING:
            landed = outcomes[expected]

    # (the metrics are brought up to date with the flow batches, every 50 ms)
    def reused() -> float:
        count = _reused(galaxy.cluster) - before
        assert count >= landed / 4, (count, landed)
        return count

    assert until(reused, "the upstreams reused") < landed  # a denied request takes none


# the deathstar's port 81, where nothing listens, opened to the tiefighter's POSTs through the proxy
CLOSED_PORT_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deathstar-81}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "81", protocol: TCP}]
      rules: {http: [{method: POST}]}
"""


def test_an_allowed_request_to_a_closed_port_is_answered_503_with_its_cause(
    galaxy: Galaxy,
) -> None:
    """Nothing listens on the deathstar's port 81: the proxy's upstream is refused, and the
    tiefighter gets 503 from the proxy, as from Envoy, instead of a connection that just ends;
    its L7 flow says why."""
    galaxy.apply(CLOSED_PORT_POLICY)
    try:
        deathstar = next(
            p for p in galaxy.cluster.json("pod", "list") if p["labels"].get("class") == "deathstar"
        )

        def refused() -> list[dict[str, Any]]:
            result = subprocess.run(
                galaxy.exec("tiefighter", "request", "2", deathstar["ip"], "81", *LANDING),
                env=galaxy.cluster.env(), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            answers = [json.loads(line) for line in result.stdout.splitlines()]
            assert answers == [{"status": 503, "body": "upstream connect error\r\n"}], answers
            return answers

        until(refused, "503 from the proxy for port 81")
        flows = galaxy.flows("--type", "l7", "--http-status", "503", "--to-port", "81")
        assert flows, "no L7 flow for the refused upstream"
        flow = flows[-1]
        assert flow["verdict"] == "FORWARDED" and flow["policy"] == "default/deathstar-81", flow
        assert flow["l7"]["error"] == "upstream connect error: Connection refused", flow
        assert flow["source"]["pod"] == "tiefighter", flow
    finally:
        galaxy.cluster.run("policy", "delete", "deathstar-81")


def _proxy_pids(cluster: Cluster) -> set[int]:
    pids = {p.pid for p in StateDir(cluster.state).processes() if p.name.startswith("proxy-")}
    assert len(pids) == len(cluster.nodes), pids
    return pids


def test_proxy_sigkill_lets_nothing_through_and_traffic_resumes(galaxy: Galaxy) -> None:
    hammer = subprocess.Popen(
        galaxy.exec("tiefighter", "hammer", "8", galaxy.vip, "80", *EXHAUST),
        env=galaxy.cluster.env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert hammer.stdout is not None and hammer.stdout.readline().strip() == "first"
    time.sleep(0.5)  # requests through the proxy, then the kill in their midst
    old = _proxy_pids(galaxy.cluster)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    out, _ = hammer.communicate(timeout=60)
    outcomes = json.loads(out)
    assert "503" not in outcomes, f"the exhaust port was reached unchecked: {outcomes}"
    assert outcomes.get("403", 0) > 0, outcomes
    assert not _proxy_pids(galaxy.cluster) & old
    until(lambda: _landed(galaxy), "traffic through the restarted proxy", timeout=60)
    # while no proxy listened, the datapath dropped the connections and said why
    # (datapath drops only: the L7 403s since then would crowd them out of the last 2000)
    drops = galaxy.flows("--type", "drop", "--from-pod", "tiefighter")
    assert any(f["drop_reason"] == 178 for f in drops), [f["drop_reason"] for f in drops]


def test_removing_the_policy_restores_the_explosion(galaxy: Galaxy) -> None:
    galaxy.cluster.run("policy", "delete", "rule1")

    def explodes() -> None:
        (answer,) = galaxy.request("tiefighter", EXHAUST)
        assert answer.get("status") == 503, answer

    until(explodes, "the explosion back once the policy is gone")


QUERY = """
import sys, dns.message, dns.query
query = dns.message.make_query("deathstar.empire", "A")
try:
    dns.query.udp(query, sys.argv[1], port=15053, timeout=1)
    print("answered")
except Exception as e:
    print("silent", type(e).__name__)
"""


def test_a_pod_cannot_talk_to_the_proxies_itself(galaxy: Galaxy) -> None:
    """The L7 proxy (TCP 15001) and the DNS proxy (UDP and TCP 15053) listen on the node's
    loopback address: what the datapath assigns reaches them, a pod talking to its node's address
    on their ports does not. Bound to every address, the DNS proxy took a query to its node's
    router address on 15053 for a query to that server and forwarded it to itself, a socket each
    time, thousands a second."""
    cluster = galaxy.cluster
    (ship,) = [p for p in cluster.json("pod", "list") if p["name"] == "tiefighter"]
    node = next(n for n in cluster.json("status")["nodes"] if n["name"] == ship["node"])
    router = str(node["router_ip"])
    asked = cluster.run(
        "pod", "exec", "tiefighter", "--", sys.executable, "-c", QUERY, router, timeout=30
    ).stdout
    assert asked.startswith("silent"), asked
    sockets = subprocess.run(
        ["ip", "netns", "exec", ship["node"], "ss", "-Huan", "dst", f"{router}:15053"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert sockets.strip() == "", f"the DNS proxy forwarded to itself:\n{sockets[:500]}"
    for port in ("15001", "15053"):
        probe = cluster.probe("tiefighter", "tcp", router, port)
        assert probe.returncode == 1 and "refused" in probe.stdout, (port, probe.stdout)
