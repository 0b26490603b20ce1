"""`policy diff` and `policy suggest` on flows recorded from real packets (one cluster).

The Star Wars demo: deathstar serves 80/TCP, `empire-only` lets org=empire in; tiefighter's
connections are FORWARDED, xwing's DROPPED. `policy diff` replays those recorded flows through
the policy service with a candidate file and must name what would change, with the exit status
a CI gate reads; the live policy must be untouched afterwards (checked with packets).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.cluster import Cluster, create_pod, until

pytestmark = [pytest.mark.e2e, pytest.mark.root]


EMPIRE_ONLY = REPO / "examples" / "empire-only.yaml"
REPLACEMENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: empire-only}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - %s
    toPorts: [{ports: [{port: "%s", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def starwars(cluster: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    pods = {
        "deathstar": create_pod(cluster, "deathstar", "org=empire,class=deathstar"),
        "tiefighter": create_pod(cluster, "tiefighter", "org=empire,class=tiefighter", node=2),
        "xwing": create_pod(cluster, "xwing", "org=alliance,class=xwing"),
    }
    server = cluster.background("deathstar", "serve", "tcp", "80")
    cluster.run("apply", "-f", str(EMPIRE_ONLY))
    ip = str(pods["deathstar"]["ip"])

    def enforced_and_recorded() -> None:
        assert cluster.probe("tiefighter", "tcp", ip, "80").returncode == 0
        assert cluster.probe("xwing", "tcp", ip, "80", timeout=10).returncode == 1
        out = cluster.run("observe", "-o", "json", "--to-pod", "deathstar", "--last", "100")
        verdicts = {
            (f["source"]["pod"], f["verdict"])
            for f in map(json.loads, out.stdout.splitlines())
            if not f["is_reply"]
        }
        assert {("tiefighter", "FORWARDED"), ("xwing", "DROPPED")} <= verdicts, verdicts

    until(enforced_and_recorded, "the policy enforced and both flows recorded", timeout=60)
    try:
        yield pods
    finally:
        server.kill()


def diff(cluster: Cluster, tmp_path: Path, text: str, *args: str) -> tuple[int, str, str]:
    path = tmp_path / f"candidate-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    result = cluster.run("policy", "diff", "-f", str(path), *args, check=False)
    return result.returncode, result.stdout, result.stderr


def test_a_policy_that_would_cut_an_observed_flow_exits_1_and_names_it(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    cut = REPLACEMENT % ("fromEndpoints: [{matchLabels: {org: empire}}]", "81")
    code, out, err = diff(cluster, tmp_path, cut)
    assert code == 1, out + err
    row = next(line for line in out.splitlines() if line.startswith("NEWLY DENIED"))
    assert "default/tiefighter" in row and "default/deathstar" in row and "80/TCP" in row
    assert "default/empire-only" in row and "allowed" in row
    assert "xwing" not in out  # dropped before, dropped after: no change

    code, out, _ = diff(cluster, tmp_path, cut, "-o", "json")
    report = json.loads(out)
    (change,) = report["changes"]
    assert (change["before"], change["after"], change["direction"]) == (
        "allowed",
        "dropped",
        "ingress",
    )
    assert change["group"]["count"] >= 1 and change["group"]["first"] <= change["group"]["last"]

    # the trial left the live policy as it was: tiefighter still gets in
    ip = str(starwars["deathstar"]["ip"])
    assert cluster.probe("tiefighter", "tcp", ip, "80").returncode == 0


def test_an_unrelated_policy_reports_nothing_and_exits_0(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    unrelated = REPLACEMENT.replace("empire-only", "other").replace("deathstar", "nothing")
    code, out, err = diff(cluster, tmp_path, unrelated % ("fromEndpoints: [{}]", "80"))
    assert code == 0, out + err
    assert out.startswith("no recorded flow changes verdict"), out


def test_a_policy_that_allows_a_dropped_flow_lists_it_as_newly_allowed(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    wider = REPLACEMENT % ("fromEntities: [cluster]", "80")
    code, out, err = diff(cluster, tmp_path, wider, "--since", "10m", "-n", "default")
    assert code == 0, out + err
    row = next(line for line in out.splitlines() if line.startswith("NEWLY ALLOWED"))
    assert "default/xwing" in row and "default/deathstar" in row and "dropped" in row


def test_bad_input_is_the_parsers_error_or_says_there_is_nothing(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    broken = REPLACEMENT % ("fromEndpoints: [{matchLabels: {org: empire}}]", "70000")
    code, out, err = diff(cluster, tmp_path, broken)
    assert code == 2 and not out, out
    assert "toPorts" in err and "70000" in err, err

    code, out, err = diff(
        cluster, tmp_path, REPLACEMENT % ("fromEndpoints: [{}]", "80"), "-n", "hoth"
    )
    assert code == 0, err
    assert out.startswith("no recorded flows in namespace hoth"), out
