"""`policy diff` and `policy suggest` on flows recorded from real packets (one cluster).

The Star Wars demo: deathstar serves 80/TCP, `empire-only` lets org=empire in; tiefighter's
connections are FORWARDED, xwing's DROPPED. `policy diff` replays those recorded flows through
the policy service with a candidate file and must name what would change, with the exit status
a CI gate reads; the live policy must be untouched afterwards (checked with packets).

A namespace `shop` with three workloads (frontend -> api:8080 -> db:5432, no policy): `policy
suggest` must write policies that parse, that `policy diff` finds change no observed flow, and
that, applied, let the observed connections through and deny an unobserved one (packets).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, membrane_command
from tests.e2e.cluster import PROBE, Cluster, create_pod, pod_info, until

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


SHOP = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
"""


def probe(*args: str) -> tuple[str, ...]:
    return (sys.executable, str(PROBE), *args)


def shop_exec(cluster: Cluster, pod: str, *args: str, timeout: float = 15) -> int:
    command = ("pod", "exec", pod, "-n", "shop", "--", *probe(*args))
    return cluster.run(*command, check=False, timeout=timeout).returncode


@pytest.fixture(scope="module")
def shop(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Three workloads: frontend -> api:8080 -> db:5432, seen with real packets, no policy."""
    manifest = tmp_path_factory.mktemp("shop") / "namespace.yaml"
    manifest.write_text(SHOP)
    cluster.run("apply", "-f", str(manifest))
    ips = {}
    for index, name in enumerate(("frontend", "api", "db")):
        node = cluster.nodes[index % 2]
        cluster.run("pod", "create", name, "-n", "shop", "--labels", f"app={name}", "--node", node)
        ips[name] = str(pod_info(cluster, name)["ip"])
    servers = [
        subprocess.Popen(
            membrane_command("pod", "exec", pod, "-n", "shop", "--", *probe("serve", "tcp", port)),
            env=cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for pod, port in (("api", "8080"), ("db", "5432"))
    ]

    def seen() -> None:
        assert shop_exec(cluster, "frontend", "tcp", ips["api"], "8080") == 0
        assert shop_exec(cluster, "api", "tcp", ips["db"], "5432") == 0
        out = cluster.run("observe", "-o", "json", "--namespace", "shop", "--last", "200").stdout
        pairs = {
            (f["source"]["pod"], f["destination"]["pod"], f["verdict"])
            for f in map(json.loads, out.splitlines())
            if not f["is_reply"]
        }
        assert {("frontend", "api", "FORWARDED"), ("api", "db", "FORWARDED")} <= pairs, pairs

    until(seen, "both connections recorded", timeout=60)
    try:
        yield ips
    finally:
        for server in servers:
            server.kill()


def test_a_suggestion_parses_changes_no_observed_flow_and_denies_the_unobserved(
    cluster: Cluster, shop: dict[str, str], tmp_path: Path
) -> None:
    result = cluster.run("policy", "suggest", "-n", "shop")
    suggestion = tmp_path / "suggested.yaml"
    suggestion.write_text(result.stdout)
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout) if d]
    assert names == ["api-observed", "db-observed", "frontend-observed"], result.stdout

    code, out, err = diff(cluster, tmp_path, result.stdout, "-n", "shop")
    assert code == 0 and out.startswith("no recorded flow changes verdict"), out + err

    cluster.run("policy", "apply", "-f", str(suggestion))
    try:

        def enforced() -> None:
            assert shop_exec(cluster, "frontend", "tcp", shop["db"], "5432", timeout=10) == 1
            assert shop_exec(cluster, "db", "tcp", shop["api"], "8080", timeout=10) == 1

        until(enforced, "the unobserved connections denied")
        assert shop_exec(cluster, "frontend", "tcp", shop["api"], "8080") == 0
        assert shop_exec(cluster, "api", "tcp", shop["db"], "5432") == 0
    finally:
        cluster.run("policy", "delete", "-f", str(suggestion), check=False)
