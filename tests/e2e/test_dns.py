"""DNS-aware policy on real packets: the DNS proxy, toFQDNs and the flows that name addresses.

The "outside world" is a network namespace on the cluster's underlay bridge (like the hosts of
test_multinode's intruder), with addresses of TEST-NET-2 (198.51.100.0/24) that the node routes
to it -- outside the pod, service and underlay ranges, so they have the identity ``world``
until a toFQDNs rule gives one of them a CIDR identity. It runs a DNS server (dnspython,
tests/e2e/dnsworld.py, UDP and TCP) and HTTP servers on the answered addresses. Nothing leaves
the machine: the namespace has no default route, the nodes route only that /24 to it.

One node, native routing (the outside world routes the pod range back; tunnel mode would
masquerade the pods' connections to it, docs/routing.md). The DNS proxy's grace period
is 1 s here (MEMBRANE_FQDN_GRACE) so that expiry is quick to test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from membrane.state import StateDir
from shared import netns
from shared.proxy import DNS_PROXY_PORT
from tests.e2e.cluster import Cluster, down_leaving_nothing, free_octet, until, up

pytestmark = [pytest.mark.e2e, pytest.mark.root]

WORLD = Path(__file__).with_name("dnsworld.py")
DNS = "198.51.100.10"
API, CDN, BARE_CDN, EVIL, TTL_OLD, TTL_NEW = (
    "198.51.100.20",
    "198.51.100.21",
    "198.51.100.22",
    "198.51.100.30",
    "198.51.100.40",
    "198.51.100.41",
)
ZONE = {
    "api.example.com": {"ips": [API], "ttl": 60},
    "*.cdn.example.com": {"ips": [CDN], "ttl": 60},
    "cdn.example.com": {"ips": [BARE_CDN], "ttl": 60},
    "evil.example.org": {"ips": [EVIL], "ttl": 60},
    "ttl.example.com": {"ips": [TTL_OLD], "ttl": 2},
    "*.n.example.com": {"prefix": "198.51.100.", "ttl": 3},  # N.n.example.com -> .N, no server
}
MANY = IPv4Network("198.51.100.128/26")  # local in the outside namespace: a SYN gets a RST
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-fqdn, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [{DNS}/32]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns:
        - matchPattern: "*.example.com"
        - matchPattern: "*.cdn.example.com"
        - matchName: evil.example.org
        - matchPattern: "*.n.example.com"
  - toFQDNs:
    - matchName: api.example.com
    - matchPattern: "*.n.example.com"
    - matchPattern: "*.cdn.example.com"
    - matchName: ttl.example.com
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"""


class DnsCluster(Cluster):
    def env(self) -> dict[str, str]:
        return {**super().env(), "MEMBRANE_FQDN_GRACE": "1"}


@dataclass
class World:
    cluster: DnsCluster
    zone: Path

    def client(self, *args: str, timeout: float = 30) -> str:
        result = self.cluster.run(
            "pod", "exec", "client", "--", sys.executable, str(WORLD), *args, timeout=timeout
        )
        return result.stdout.strip()

    def query(self, name: str, *transport: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.client("query", DNS, name, *transport))
        return found

    def fetch(self, name: str) -> dict[str, Any]:
        """Resolve, then connect at once to the first address (no CLI call in between)."""
        found: dict[str, Any] = json.loads(self.client("fetch", DNS, name))
        return found

    def get(self, ip: str) -> str:
        return self.cluster.run(
            "pod", "exec", "client", "--", sys.executable, str(WORLD), "get", ip, check=False
        ).stdout.strip()

    def flows(self, *args: str) -> list[dict[str, Any]]:
        out = self.cluster.run("observe", "-o", "json", "--last", "500", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def proxy_metrics(self) -> str:
        """The node's proxy's /metrics, read from inside the node (where it listens)."""
        (proxy,) = [s for s in self.cluster.json("status")["services"]
                    if s["name"] == "membrane-proxy"]  # fmt: skip
        (node,) = self.cluster.nodes
        url = f"http://{proxy['metadata']['metrics']}/metrics"
        read = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
        return subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", read],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip

    def cache(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cluster.json("fqdn", "cache", "list")
        return items


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    scratch = tmp_path_factory.mktemp("dns")
    cluster = DnsCluster(state=scratch / "state", name="d" + secrets.token_hex(3), nats_url="",
                         node_count=1)  # fmt: skip
    up(cluster, free_octet(), routing="native")
    outside = f"{cluster.name}-ext"
    server: subprocess.Popen[str] | None = None
    try:
        info = StateDir(cluster.state).read_cluster()
        assert info is not None
        underlay = IPv4Network(info.underlay_cidr)
        address = IPv4Interface(f"{underlay.network_address + 8}/{underlay.prefixlen}")
        netns.ensure_node(outside, f"{cluster.name}-br", address, f"{cluster.name}-ex")
        (node,) = cluster.json("status")["nodes"]
        ips = [DNS, API, CDN, BARE_CDN, EVIL, TTL_OLD, TTL_NEW]
        script = [f"ip addr add {ip}/32 dev lo" for ip in ips] + [
            "ip link set lo up",
            f"ip route add local {MANY} dev lo",
            f"ip route add {node['pod_cidr']} via {node['underlay_ip']}",
        ]
        for line in script:
            subprocess.run(["ip", "netns", "exec", outside, *line.split()], check=True)
        subprocess.run(["ip", "netns", "exec", node["name"], "ip", "route", "add",
                        "198.51.100.0/24", "via", str(address.ip)], check=True)  # fmt: skip
        zone = scratch / "zone.json"
        zone.write_text(json.dumps(ZONE))
        server = subprocess.Popen(
            ["ip", "netns", "exec", outside, sys.executable, str(WORLD), "serve", str(zone),
             *ips],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        cluster.run("pod", "create", "client", "--labels", "app=client")
        w = World(cluster, zone)
        # no policy: the world answers, every address is reachable (the tests' own control)
        assert w.fetch("evil.example.org")["http"] == EVIL
        cluster.run("apply", "-f", "-", input_text=POLICY)
        until(lambda: _refused(w), "the DNS rules in force")
        yield w
    finally:
        if server is not None:
            server.kill()
            server.wait()
        netns.remove_node(outside, f"{cluster.name}-ex")
        down_leaving_nothing(cluster)


def _refused(world: World) -> None:
    assert world.query("nope.example.net")["rcode"] == "REFUSED"


def test_lookup_then_the_first_connection_succeeds(world: World) -> None:
    fetched = world.fetch("api.example.com")
    assert fetched == {"rcode": "NOERROR", "answers": [API], "ttl": 60, "http": API}
    assert world.query("api.example.com", "tcp")["answers"] == [API]  # DNS over TCP too
    explained = world.cluster.run("policy", "explain", "--from", "client", "--to", API,
                                  "--port", "80/TCP").stdout  # fmt: skip
    assert f"{API} was answered for api.example.com: toFQDNs matchName api.example.com" in (
        explained
    ), explained
    (cache,) = world.cache()
    assert cache["endpoint"] == "default/client"
    assert {n["name"]: [a["ip"] for a in n["addresses"]] for n in cache["names"]}[
        "api.example.com"
    ] == [API]


def test_the_first_connection_after_an_answer_is_never_dropped(world: World) -> None:
    # The policy service is held (SIGSTOP): the cluster-wide path (fqdn bucket -> policy
    # service -> ipcache/selectors -> agent) cannot move, so each answer's address can only be
    # allowed by the node's agent, asked by the proxy before it releases the answer. Before
    # that fast path the answer waited 2 s for the cluster path, then went out unallowed and
    # its connection was dropped. Every name is new (a new address each): a connection opened
    # the moment the answer arrives must get through, every time.
    names = [f"{host}.n.example.com" for host in range(MANY[1].packed[3], MANY[-1].packed[3])]
    policy = _pid(world.cluster, "policy-1")
    os.kill(policy, signal.SIGSTOP)
    try:
        first = json.loads(world.client("first-connect", DNS, *names[:30], timeout=60))
        assert first == {"reached": 30, "dropped": [], "failed": []}, first
        # TTL 3 s + grace 1 s: what the cluster path never confirmed leaves the node again
        until(lambda: _unreachable(world, f"198.51.100.{names[0].split('.')[0]}"),
              "the unconfirmed address out at its expiry", timeout=15)  # fmt: skip
    finally:
        os.kill(policy, signal.SIGCONT)
    # with the policy service back, the fast path and the cluster path agree (neither removes
    # what the other put in); the name's expiry takes it out through the cluster path
    again = json.loads(world.client("first-connect", DNS, *names[30:40], timeout=60))
    assert again == {"reached": 10, "dropped": [], "failed": []}, again
    until(lambda: _unreachable(world, f"198.51.100.{names[30].split('.')[0]}"),
          "the address out after its TTL", timeout=15)  # fmt: skip


def _pid(cluster: Cluster, name: str) -> int:
    (pid,) = [p.pid for p in StateDir(cluster.state).processes() if p.name == name and p.running]
    return pid


def test_resolved_but_not_selected_is_dropped(world: World) -> None:
    evil = world.fetch("evil.example.org")  # the DNS rules let it resolve
    assert evil["answers"] == [EVIL] and evil["http"] == "TimeoutError"  # toFQDNs do not hold it


def test_a_name_outside_the_dns_rules_is_refused_and_reported(world: World) -> None:
    assert world.query("nope.example.net") == {"rcode": "REFUSED", "answers": [], "ttl": 0}

    def reported() -> dict[str, Any]:
        flows = world.flows("--type", "dns", "--verdict", "DROPPED")
        found = [f for f in flows if (f.get("l7") or {}).get("query") == "nope.example.net"]
        assert found, flows
        return found[-1]

    flow = until(reported, "the DROPPED DNS flow", timeout=10)
    assert flow["l7"]["rcode"] == "REFUSED" and flow["rule"] == "default/client-fqdn[0]"


def test_match_pattern_takes_one_label(world: World) -> None:
    assert world.fetch("a.cdn.example.com")["http"] == CDN
    bare = world.fetch("cdn.example.com")  # the DNS rules let it resolve; toFQDNs does not match
    assert bare["answers"] == [BARE_CDN] and bare["http"] == "TimeoutError"


def test_flows_show_the_query_the_answer_and_the_name(world: World) -> None:
    assert world.fetch("api.example.com")["http"] == API

    def seen() -> tuple[dict[str, Any], dict[str, Any]]:
        answers = world.flows("--type", "dns", "--fqdn", "api.example.com")
        assert answers and answers[-1]["l7"]["answers"] == [API], answers
        later = [f for f in world.flows("--fqdn", "api.example.com") if f["type"] != "l7"]
        assert later, "no connection flow names api.example.com"
        return answers[-1], later[-1]

    answer, connection = until(seen, "the DNS flow and the named connection", timeout=10)
    assert answer["l7"]["rcode"] == "NOERROR" and answer["l7"]["ttl"] == 60
    assert connection["destination_names"] == ["api.example.com"]
    assert connection["destination"]["ip"] == API


def test_expiry_drops_the_old_address_and_follows_a_new_answer(world: World) -> None:
    assert world.fetch("ttl.example.com")["http"] == TTL_OLD
    # TTL 2 s, grace 1 s, then the proxy's next expiry round (every second): new connections
    # are dropped, the one opened before keeps working
    dropped = json.loads(world.client("until-dropped", TTL_OLD, "15"))
    # (the held connection was opened first, so the address was allowed when this began)
    assert dropped["after"] is not None, dropped
    assert dropped["held"] == TTL_OLD, dropped
    assert "ttl.example.com" not in {n["name"] for c in world.cache() for n in c["names"]}
    zone = json.loads(world.zone.read_text())
    zone["ttl.example.com"] = {"ips": [TTL_NEW], "ttl": 60}
    world.zone.write_text(json.dumps(zone))
    followed = json.loads(world.client("fetch", DNS, "ttl.example.com", TTL_OLD))
    assert (followed["http"], followed["also"]) == (TTL_NEW, "TimeoutError"), followed


def test_malformed_queries_are_dropped(world: World) -> None:
    assert world.client("garbage", DNS) == "silent"
    assert world.query("api.example.com")["answers"] == [API]  # the proxy goes on


def test_queries_addressed_to_the_proxy_itself_are_dropped(world: World) -> None:
    # a pod no policy restricts reaches its node's address, where the proxy's own socket
    # listens: never forwarded (the proxy would send the query to itself, again and again)
    world.cluster.run("pod", "create", "prober", "--labels", "app=prober")
    (node,) = world.cluster.json("status")["nodes"]
    target = f"{node['router_ip']}:{DNS_PROXY_PORT}"
    probe = [sys.executable, str(WORLD), "query", target, "api.example.com"]
    for transport in ([], ["tcp"]):
        out = world.cluster.run("pod", "exec", "prober", "--", *probe, *transport).stdout
        assert "error" in json.loads(out), out
    # the proxy's sockets are on the node's loopback address (services/proxy/sockets.py): the
    # pod's queries to the node's address never reach them, and nothing was forwarded in a loop
    # (the proxy's own check of queries addressed to itself stays, behind that)
    metrics = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in world.proxy_metrics().splitlines()
        if line.startswith("membrane_proxy_dns_")
    }
    assert metrics.get('membrane_proxy_dns_malformed_total{source="direct"}', 0) == 0, metrics
    assert metrics["membrane_proxy_dns_upstream_errors_total"] == 0, metrics
    assert world.query("api.example.com")["answers"] == [API]


def test_a_stopped_proxy_means_no_dns(world: World) -> None:
    (pid,) = [
        p.pid for p in StateDir(world.cluster.state).processes() if p.name.startswith("proxy-")
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert world.query("api.example.com") == {"error": "Timeout"}  # never around the proxy
    finally:
        os.kill(pid, signal.SIGCONT)
    assert world.query("api.example.com")["answers"] == [API]


def test_apply_refuses_a_bad_pattern(world: World) -> None:
    bad = POLICY.replace('"*.cdn.example.com"', '"*.cdn.exa mple.com"', 1)
    result = world.cluster.run("apply", "-f", "-", input_text=bad, check=False)
    assert result.returncode != 0
    assert "spec.egress[0].toPorts[0].rules.dns[1].matchPattern" in result.stderr, result.stderr


def test_cache_clean_takes_the_addresses_out(world: World) -> None:
    assert world.fetch("b.cdn.example.com")["http"] == CDN
    out = world.cluster.run("fqdn", "cache", "clean", "--matchpattern", "*.cdn.example.com")
    removed = int(out.stdout.split(": ")[1].split()[0])  # "<node>: N names removed"
    assert removed >= 1, out.stdout
    until(lambda: _unreachable(world, CDN), "the cleaned address out of the policy", timeout=10)


def _unreachable(world: World, ip: str) -> None:
    assert world.get(ip) == "TimeoutError"
