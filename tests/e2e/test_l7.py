"""L7 policy on real packets: Cilium's Star Wars demo, manifests unchanged (examples/starwars).

The deathstar's API runs in both deathstar replicas (tests/e2e/starwars.py); the ships call it
through the deathstar Service, as in Cilium's getting-started guide. The policy restricts the
deathstar's port 80 to POST /v1/request-landing from empire ships: the tiefighter's
PUT /v1/exhaust-port must never get through, the xwing is dropped at L3/L4, and removing the
policy restores the explosion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, membrane_command
from tests.e2e.cluster import Cluster, until

pytestmark = [pytest.mark.e2e, pytest.mark.root]

STARWARS = REPO / "examples" / "starwars"
APP = STARWARS / "http-sw-app.yaml"
POLICY = STARWARS / "sw_l3_l4_l7_policy.yaml"
CLIENT = Path(__file__).with_name("starwars.py")
LANDING = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")


@dataclass
class Galaxy:
    cluster: Cluster
    vip: str

    def request(
        self, ship: str, *calls: tuple[str, str], timeout: float = 2
    ) -> list[dict[str, Any]]:
        """The answers to ``calls``, made one after the other on one connection from ``ship``."""
        args = [a for call in calls for a in call]
        result = self.cluster.run(
            "pod", "exec", ship, "--", sys.executable, str(CLIENT),
            "request", str(timeout), self.vip, "80", *args,
            check=False, timeout=30 + timeout * len(calls),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def flows(self, *args: str) -> list[dict[str, Any]]:
        out = self.cluster.run("observe", "-o", "json", "--last", "2000", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


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
    try:
        yield Galaxy(cluster, vip)
    finally:
        cluster.run("policy", "delete", "rule1", check=False)
        for server in servers:
            server.kill()
            server.wait()
        cluster.run("delete", "-f", str(APP), check=False)


def test_exhaust_port_never_gets_through_an_l7_policy(galaxy: Galaxy) -> None:
    # without a policy anyone can blow up the deathstar: the test's own control
    (exploded,) = galaxy.request("tiefighter", EXHAUST, timeout=5)
    assert exploded["status"] == 503 and "exploded" in exploded["body"], exploded
    applied = galaxy.cluster.run("apply", "-f", str(POLICY))
    assert "L7 rules" in applied.stdout
    try:

        def blocked() -> None:
            assert galaxy.request("tiefighter", EXHAUST) == [{"error": "TimeoutError"}]

        until(blocked, "the exhaust port closed by the L7 policy")
        for _ in range(3):  # never once through
            blocked()

        # until the proxy takes them, L7 connections are dropped with a reason naming the rule
        def l7_drop() -> dict[str, Any]:
            flows = galaxy.flows("--verdict", "DROPPED", "--from-pod", "tiefighter")
            found = [f for f in flows if f["drop_reason"] == 180]
            assert found, flows
            return found[-1]

        flow = until(l7_drop, "a DROPPED flow for the tiefighter")
        assert flow["drop_reason_desc"] == "Proxy redirection not supported for protocol"
        assert flow["policy"] == "default/rule1", flow
        assert flow["destination"]["pod"].startswith("deathstar"), flow

        # the xwing is not an empire ship: dropped at L3/L4, the policy's default deny
        assert galaxy.request("xwing", LANDING) == [{"error": "TimeoutError"}]
    finally:
        galaxy.cluster.run("policy", "delete", "rule1")

    def explodes() -> None:
        (answer,) = galaxy.request("tiefighter", EXHAUST)
        assert answer.get("status") == 503, answer

    until(explodes, "the explosion back once the policy is gone")
