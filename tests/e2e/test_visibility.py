"""`policy diff` and `policy suggest` on flows recorded from real packets (one cluster).

The Star Wars demo: deathstar serves 80/TCP, `empire-only` lets org=empire in; tiefighter's
connections are FORWARDED, xwing's DROPPED. `policy diff` replays those recorded flows through
the policy service with a candidate file and must name what would change, with the exit status
a CI gate reads; the live policy must be untouched afterwards (checked with packets).

A namespace `shop` with three workloads (frontend -> api:8080 -> db:5432, no policy): `policy
suggest` must write policies that parse, that `policy diff` finds change no observed flow, and
that, applied, let the observed connections through and deny an unobserved one (packets).

The web UI in Debian's chromium through Selenium (headless, a fresh profile): the map shows
tiefighter -> deathstar green and xwing -> deathstar red; the red edge lists the drop with its
policy; a new drop appears without a reload; the nodes view has every pair; while the UI
service or the monitor restarts the page says it is not live, and it is live again once they
are back (no reload). Screenshots go to test-artifacts/ui/ (or $MEMBRANE_TEST_ARTIFACTS/ui).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


# --- the web UI in a real browser -----------------------------------------------------------

ARTIFACTS = Path(os.environ.get("MEMBRANE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
GREEN, RED = "rgb(46, 125, 50)", "rgb(198, 40, 40)"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,800",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("chromium and chromium-driver are missing: run `make setup`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def edge_selector(source: str, destination: str, verdict: str) -> str:
    return (
        f'g.edge[data-source="{source}"][data-destination="{destination}"]'
        f'[data-verdict="{verdict}"]'
    )


def find(driver: Any, css: str, what: str, timeout: float = 30) -> Any:
    from selenium.webdriver.common.by import By

    def found() -> Any:
        elements = driver.find_elements(By.CSS_SELECTOR, css)
        assert elements, f"nothing matches {css}"
        return elements[0]

    return until(found, what, timeout)


def stroke(driver: Any, css: str) -> str:
    script = "return getComputedStyle(document.querySelector(arguments[0])).stroke"
    return str(driver.execute_script(script, css + " path"))


def click(driver: Any, css: str, what: str) -> None:
    """Clicks the element; the map lays itself out again when a new edge comes, so an element
    found a moment ago may be gone: find it again."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked() -> None:
        try:
            find(driver, css, what).click()
        except StaleElementReferenceException as exc:
            raise AssertionError("the map was drawn again") from exc

    until(clicked, what, timeout=15)


def test_the_service_map_shows_verdicts_flows_live_drops_and_nodes(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], browser: Any
) -> None:
    url = cluster.run("ui").stdout.strip()
    assert url.startswith("http://127.0.0.1:"), url
    browser.get(url)
    allowed = edge_selector("default/tiefighter", "default/deathstar", "FORWARDED")
    denied = edge_selector("default/xwing", "default/deathstar", "DROPPED")
    find(browser, allowed, "tiefighter -> deathstar")
    find(browser, denied, "xwing -> deathstar")
    assert stroke(browser, allowed) == GREEN and stroke(browser, denied) == RED
    assert browser.find_element("id", "status").text == "Live"
    for control in ("namespace", "pause", "filter", "tab-nodes"):  # accessible names
        element = browser.find_element("id", control)
        assert element.accessible_name, control
    browser.save_screenshot(str(ARTIFACTS / "service-map.png"))

    # the red edge -> the drop, with the policy that decided
    click(browser, denied + " text", "the red edge's label")  # at the middle of the edge

    def drop_listed() -> None:
        rows = [r.text for r in browser.find_elements("css selector", "#flow-table tbody tr")]
        assert any("DROPPED" in r and "default/empire-only" in r for r in rows), rows
        assert all("default/xwing" in r for r in rows), rows

    until(drop_listed, "the drop listed with its policy")
    browser.save_screenshot(str(ARTIFACTS / "edge-flows.png"))

    # a new drop (tiefighter on 81: no rule allows it) appears without a reload
    browser.execute_script("window.notReloaded = true")
    ip = str(starwars["deathstar"]["ip"])
    assert cluster.probe("tiefighter", "tcp", ip, "81", timeout=10).returncode == 1
    find(browser, edge_selector("default/tiefighter", "default/deathstar", "DROPPED"), "new drop")
    assert browser.execute_script("return window.notReloaded === true")

    # L7 requests in the flow table read as `membrane observe` reads them
    def l7(**fields: Any) -> str:
        return str(browser.execute_script("return l7Text(arguments[0])", fields))

    http = {"protocol": "http", "method": "PUT", "url": "/v1/exhaust-port", "latency_ms": 0.25}
    assert l7(**http, status=403) == "PUT /v1/exhaust-port → 403 (0.3 ms)"
    refused = "upstream connect error: Connection refused"
    assert (
        l7(**http, status=503, error=refused) == f"PUT /v1/exhaust-port → 503 (0.3 ms, {refused})"
    )
    assert (
        l7(protocol="grpc", method="POST", url="/a.B/C", status=200, grpc_status=7, latency_ms=1)
        == "grpc /a.B/C → grpc-status 7 (1.0 ms)"
    )
    assert (
        l7(protocol="kafka", api_key="produce", api_version=9, topics=["t"], error_code=29)
        == "kafka produce v9 [t] → error 29 (0.0 ms)"
    )
    assert (
        l7(protocol="dns", qtype="A", query="api.example.com.", rcode="NOERROR",
           answers=["1.2.3.4"], ttl=60)
        == "dns A api.example.com. → NOERROR 1.2.3.4 TTL 60"
    )  # fmt: skip
    assert l7(protocol="http2", error="malformed HTTP/2: x") == "http2 malformed HTTP/2: x"

    # the nodes view: every pair of nodes
    click(browser, "#tab-nodes", "the nodes tab")
    nodes = cluster.nodes

    def every_pair() -> None:
        cells = browser.execute_script(  # in one go: the matrix is drawn again every 5 s
            "return [...document.querySelectorAll('#matrix td[data-state]')]"
            ".map(c => [c.dataset.from, c.dataset.to, c.dataset.state])"
        )
        assert {(a, b) for a, b, _ in cells} == {(a, b) for a in nodes for b in nodes if a != b}
        assert all(state == "ok" for _, _, state in cells), cells

    until(every_pair, "every node pair in the matrix")
    browser.save_screenshot(str(ARTIFACTS / "nodes.png"))


def test_the_page_is_not_live_while_the_ui_or_the_monitor_restarts_and_comes_back(
    cluster: Cluster, starwars: dict[str, dict[str, Any]], browser: Any
) -> None:
    browser.get(cluster.run("ui").stdout.strip())

    def status(starts: str) -> Callable[[], None]:
        def check() -> None:
            text = browser.find_element("id", "status").text
            assert text.startswith(starts), text

        return check

    until(status("Live"), "the page live")
    browser.execute_script("window.notReloaded = true")

    def pid(process: str) -> int:
        (found,) = [p["pid"] for p in cluster.json("status")["processes"] if p["name"] == process]
        return int(found)

    # frozen (so that it stays away as long as the test needs): not live, then live again
    for process, why in (("ui-1", "reconnecting to the UI service"), ("monitor-1", "no monitor")):
        frozen = pid(process)
        os.kill(frozen, signal.SIGSTOP)
        try:
            until(status(f"Not live: {why}"), f"the page not live without {process}", timeout=15)
            assert "stale" in (
                browser.find_element("tag name", "body").get_attribute("class") or ""
            )
            browser.save_screenshot(str(ARTIFACTS / f"not-live-{process}.png"))
        finally:
            os.kill(frozen, signal.SIGCONT)
        until(status("Live"), f"the page live again with {process} back", timeout=30)

    # restarted: the page reconnects by itself, to the port the cluster keeps for the UI
    old = pid("ui-1")
    os.kill(old, signal.SIGTERM)

    def restarted() -> float:
        assert pid("ui-1") != old, "not restarted yet"
        return float(browser.execute_script("return Date.now()"))

    since = until(restarted, "the UI service restarted", timeout=30)

    def reconnected() -> None:
        status("Live")()
        assert browser.execute_script("return window.membrane.lastBatch") > since

    until(reconnected, "batches from the restarted UI service", timeout=60)
    assert browser.execute_script("return window.notReloaded === true")
