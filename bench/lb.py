"""Services: membrane's BPF hash maps against kube-proxy's iptables model, side by side.

    sudo .venv/bin/python bench/lb.py [--services 20000] [--updates 50] [--connections 300]
    sudo .venv/bin/python bench/lb.py --services 20000 --bulk-only   # only the bulk apply

Starts its own two-node cluster (``membrane up``, removed with ``membrane down --purge``) and
measures, for the same services (one TCP port, two backends each, from EndpointSlices):

1. membrane, each on a fresh cluster: the time from applying all the services to every
   service entry present in the BPF maps of every node, polled through the pinned maps:
   (a) the documents sent to the lb service's apply endpoint, as a Kubernetes watcher or any
   API client sends them; (b) ``membrane apply -f`` of the same services as one YAML file,
   which adds the CLI's start and its reading of about 9 MB of YAML. Then, on a third
   cluster, single-service updates (a backend's port changed, apply -> the backend entry in
   node 1's map) with 100, 1,000 and all services present: p50/p99; and, for the goals,
   updates alternating between the third cluster with 100 services and the first with all
   of them, so that the machine's load falls on both alike.
2. kube-proxy's iptables model in scratch network namespaces: KUBE-SERVICES / KUBE-SVC-* /
   KUBE-SEP-* chains (statistic random, DNAT, masquerade mark) for the same services, loaded
   with iptables-restore; then one service added with ``iptables`` commands at each scale,
   with the legacy and the nft backends.
3. New-connection latency to a service address with 100 vs all services: a client pod
   through membrane's maps, in rounds alternating between the third cluster (100 services
   then) and the first (all of them), side by side; and a client namespace through
   iptables-legacy DNAT.

Services use random backend selection (annotation lb.membrane.io/algorithm: random), as
kube-proxy does; bench/maglev.py measures Maglev at this scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import uvloop
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from bench.datapath import BPFFS, Cluster, MapEntry, obj_get  # noqa: E402
from membrane.client import lb as lb_client  # noqa: E402
from services.datapath.lb_sync import backend_value, service_key  # noqa: E402
from shared import apply  # noqa: E402
from shared.bus import Bus  # noqa: E402

GOAL_BULK_SECONDS = 3.0  # through the apply endpoint
GOAL_CLI_SECONDS = 2.0  # `membrane apply -f` (issue 19)
GOAL_P99_MS = 5.0
GOAL_FLAT = 1.5
GOAL_VS_LEGACY = 100.0
GOAL_CONNECT = 0.10
SCALES = (100, 1000)
POLL = 0.0002
SETTLE_SECONDS = 5.0


# libyaml's emitter when there is one: the Python one takes longer than what is measured
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Plan:
    """The services: cluster IPs from the cluster's service range, backends from a range no
    pod uses (their answers are not needed: only maps and rules are measured), except the one
    measured service, whose backend is a real pod."""

    def __init__(self, octet: int, count: int, algorithm: str = "random") -> None:
        self.octet = octet
        self.count = count
        self.algorithm = algorithm

    def vip(self, i: int) -> str:
        return str(IPv4Address(f"10.{self.octet + 1}.0.0") + 10 + i)

    def backends(self, i: int) -> list[str]:
        base = IPv4Address("10.250.0.0") + 2 * i
        return [str(base), str(base + 1)]

    def documents(self, first: int, last: int) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        for i in range(first, last):
            name = f"s{i}"
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": name,
                        "namespace": "bench",
                        "annotations": {"lb.membrane.io/algorithm": self.algorithm},
                    },
                    "spec": {"clusterIP": self.vip(i), "ports": [{"name": "http", "port": 80}]},
                }
            )
            docs.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-1",
                        "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080}],
                    "endpoints": [{"addresses": [ip]} for ip in self.backends(i)],
                }
            )
        return docs


def wait_all(entries: list[MapEntry], deadline: float) -> float:
    """Poll until every entry exists; the moment the last was seen."""
    index = 0
    while index < len(entries):
        if entries[index].get() is not None:
            index += 1
            continue
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(entries) - index} entries missing")
        time.sleep(POLL)
    return time.perf_counter()


def wait_value(entry: MapEntry, value: bytes, deadline: float) -> float:
    while entry.get() != value:
        if time.perf_counter() > deadline:
            raise TimeoutError("map entry not written")
        time.sleep(POLL)
    return time.perf_counter()


class Membrane:
    def __init__(self, cluster: Cluster, plan: Plan) -> None:
        self.cluster = cluster
        self.plan = plan
        self.nodes = [f"{cluster.name}-node-1", f"{cluster.name}-node-2"]
        self.fds = {
            node: {
                m: obj_get(BPFFS / "membrane" / node / m) for m in ("lb_services", "lb_backends")
            }
            for node in self.nodes
        }
        self.ids: dict[int, int] = {}

    def service_entries(self, first: int, last: int) -> list[MapEntry]:
        return [
            MapEntry(self.fds[node]["lb_services"], service_key(self.plan.vip(i), 80, 6), 20)
            for node in self.nodes
            for i in range(first, last)
        ]

    async def bulk(self, bus: Bus, first: int, last: int) -> float:
        """The documents straight to the lb service (as a Kubernetes watcher would send them)."""
        docs = self.plan.documents(first, last)
        entries = self.service_entries(first, last)
        started = time.perf_counter()
        poll = asyncio.ensure_future(asyncio.to_thread(wait_all, entries, started + 300))
        await apply.apply_services(bus, docs, "bench", dry_run=False)
        done = await poll
        return done - started

    async def bulk_cli(self, first: int, last: int, path: Path) -> tuple[float, float]:
        """``membrane apply -f FILE`` (written already): (CLI returned, every entry in every
        node's maps)."""
        entries = self.service_entries(first, last)
        started = time.perf_counter()
        poll = asyncio.ensure_future(asyncio.to_thread(wait_all, entries, started + 600))
        proc = await asyncio.create_subprocess_exec(
            *self.cluster.command("apply", "-f", str(path)),
            env=self.cluster.env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        returned = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"membrane apply failed: {err.decode()[-2000:]}")
        done = await poll
        return returned, done - started

    async def updates(self, bus: Bus, count: int) -> list[float]:
        """A backend port of service 0 changed, ``count`` times: apply -> node 1's map."""
        await self.learn_update_ids(bus)
        seconds = []
        for n in range(count):
            seconds.append(await self.update(bus, n))
            await asyncio.sleep(0.01)
        return seconds

    async def learn_update_ids(self, bus: Bus) -> None:
        """A backend is (address, port): each of the two ports update() alternates between
        is a backend id of its own; apply both once and learn them."""
        ip = self.plan.backends(0)[0]
        for port in (9000, 9001):
            await apply.apply_services(bus, self._update_docs(port), "bench", dry_run=False)
            record = await lb_client.get(bus, "bench", "s0")
            self.ids[port] = next(b.id for b in record.frontends[0].backends if b.ip == ip)

    def _update_docs(self, port: int) -> list[dict[str, Any]]:
        docs = self.plan.documents(0, 1)[1:]  # service 0's EndpointSlice
        docs[0]["ports"][0]["port"] = port
        return docs

    async def update(self, bus: Bus, n: int) -> float:
        """The ``n``-th single update (its port alternates, so every apply is a change):
        seconds from the apply to the new backend entry in node 1's map."""
        ip = self.plan.backends(0)[0]
        port = 9000 + (n % 2)
        docs = self._update_docs(port)
        entry = MapEntry(
            self.fds[self.nodes[0]]["lb_backends"], self.ids[port].to_bytes(4, "little"), 8
        )
        started = time.perf_counter()
        # polled from the moment of the apply: the entry is often in the map before the lb
        # service's reply is back (the reply waits for the spec's write as well)
        poll = asyncio.ensure_future(
            asyncio.to_thread(wait_value, entry, backend_value(ip, port, False), started + 10)
        )
        await apply.apply_services(bus, docs, "bench", dry_run=False)
        done = await poll
        return done - started


async def updates_side_by_side(
    few: tuple[Membrane, Bus], many: tuple[Membrane, Bus], count: int
) -> tuple[list[float], list[float]]:
    """Single updates alternating between two clusters, one update each in turn: what the
    machine does meanwhile falls on both alike."""
    for lb, bus in (few, many):
        await lb.learn_update_ids(bus)
    a: list[float] = []
    b: list[float] = []
    for n in range(count):
        a.append(await few[0].update(few[1], n))
        b.append(await many[0].update(many[1], n))
        await asyncio.sleep(0.01)
    return a, b


# --- iptables --------------------------------------------------------------------------------


def iptables_rules(plan: Plan, first: int, last: int, chains: bool = True) -> Iterator[str]:
    """kube-proxy's nat table for services first..last-1 (iptables-restore syntax, no header)."""
    for i in range(first, last):
        svc = f"KUBE-SVC-{i:012d}"
        seps = [f"KUBE-SEP-{i:010d}A", f"KUBE-SEP-{i:010d}B"]
        if chains:
            yield f":{svc} - [0:0]"
            for sep in seps:
                yield f":{sep} - [0:0]"
    for i in range(first, last):
        svc = f"KUBE-SVC-{i:012d}"
        a, b = plan.backends(i)
        endpoints = [(f"KUBE-SEP-{i:010d}A", a), (f"KUBE-SEP-{i:010d}B", b)]
        yield (
            f"-A KUBE-SERVICES -d {plan.vip(i)}/32 -p tcp -m comment --comment bench/s{i}:http"
            f" -m tcp --dport 80 -j {svc}"
        )
        yield f"-A {svc} -m statistic --mode random --probability 0.5 -j {endpoints[0][0]}"
        yield f"-A {svc} -j {endpoints[1][0]}"
        for sep, ip in endpoints:
            yield f"-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ"
            yield f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:8080"


def iptables_table(plan: Plan, count: int, measured: tuple[str, str] | None = None) -> str:
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        "-A PREROUTING -j KUBE-SERVICES",
        "-A OUTPUT -j KUBE-SERVICES",
        "-A POSTROUTING -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE",
    ]
    lines.extend(iptables_rules(plan, 0, count))
    if measured is not None:  # the service connections are timed against: last in the walk
        vip, backend = measured
        lines += [
            ":KUBE-SVC-MEASURED - [0:0]",
            f"-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-MEASURED",
            f"-A KUBE-SVC-MEASURED -p tcp -j DNAT --to-destination {backend}:8080",
        ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)

    def run(self, *cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        )

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def iptables_add_one(ns: Netns, binary: str, plan: Plan, i: int) -> float:
    """What ``iptables`` commands take to add service ``i`` (3 chains, 7 rules)."""
    rules = list(iptables_rules(plan, i, i + 1, chains=False))
    chains = [f"KUBE-SVC-{i:012d}", f"KUBE-SEP-{i:010d}A", f"KUBE-SEP-{i:010d}B"]
    started = time.perf_counter()
    for chain in chains:
        ns.run(binary, "-w", "-t", "nat", "-N", chain)
    for rule in rules:
        ns.run(binary, "-w", "-t", "nat", *rule.split())
    return time.perf_counter() - started


def iptables_scale(plan: Plan, scales: list[int]) -> dict[str, dict[int, tuple[float, float]]]:
    """(load seconds, one-service add seconds) per backend and scale."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for binary in ("iptables-legacy", "iptables-nft"):
        out[binary] = {}
        for count in scales:
            ns = Netns(f"lbb-{secrets.token_hex(3)}")
            try:
                table = iptables_table(plan, count)
                started = time.perf_counter()
                ns.run(f"{binary}-restore", stdin=table)
                load = time.perf_counter() - started
                adds = [iptables_add_one(ns, binary, plan, count + k) for k in range(3)]
                out[binary][count] = (load, statistics.median(adds))
            finally:
                ns.delete()
            print(
                f"  {binary:16} {count:>6} services: restore {load:7.2f} s, "
                f"one service added {out[binary][count][1] * 1000:9.1f} ms",
                flush=True,
            )
    return out


CONNECT_SCRIPT = """
import socket, sys, time, statistics
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(); t = time.perf_counter()
    s.connect((ip, port)); out.append(time.perf_counter() - t); s.close()
out.sort()
print(out[len(out) // 2] * 1e6, out[int(len(out) * 0.9)] * 1e6)
"""
# the same measurement, a round per line on stdin: a client that stays up between rounds, so
# that rounds alternating between two clusters are short and close together in time
CONNECT_ROUNDS_SCRIPT = """
import os, socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    os.sched_setaffinity(0, {int(sys.argv[3])})
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for _ in range(int(line)):
        s = socket.socket(); t = time.perf_counter()
        s.connect((ip, port)); out.append(time.perf_counter() - t); s.close()
    out.sort()
    print(out[len(out) // 2] * 1e6, flush=True)
"""
SERVE_SCRIPT = """
import os, socket, sys
if len(sys.argv) > 1:
    os.sched_setaffinity(0, {int(sys.argv[1])})
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080)); l.listen(1024); print("ready", flush=True)
while True:
    c, _ = l.accept(); c.close()
"""


def iptables_connect(plan: Plan, counts: list[int], n: int) -> dict[int, float]:
    """Median connect latency, client namespace with kube-proxy's table -> server namespace."""
    client, server = Netns(f"lbc-{secrets.token_hex(3)}"), Netns(f"lbs-{secrets.token_hex(3)}")
    veth = f"lbv{secrets.token_hex(3)}"
    proc = None
    try:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                veth,
                "netns",
                client.name,
                "type",
                "veth",
                "peer",
                "name",
                veth + "p",
                "netns",
                server.name,
            ],
            check=True,
        )
        client.run("ip", "addr", "add", "192.168.77.1/24", "dev", veth)
        client.run("ip", "link", "set", veth, "up")
        client.run("ip", "link", "set", "lo", "up")
        client.run("ip", "route", "add", "default", "via", "192.168.77.2")
        server.run("ip", "addr", "add", "192.168.77.2/24", "dev", veth + "p")
        server.run("ip", "link", "set", veth + "p", "up")
        server.run("ip", "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", server.name, sys.executable, "-c", SERVE_SCRIPT],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        out = {}
        vip = plan.vip(plan.count + 5)
        for count in counts:
            client.run(
                "iptables-legacy-restore", stdin=iptables_table(plan, count, (vip, "192.168.77.2"))
            )
            result = client.run(sys.executable, "-c", CONNECT_SCRIPT, vip, "80", str(n))
            out[count] = float(result.stdout.split()[0])
        return out
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        client.delete()
        server.delete()


CONNECT_ROUNDS = 21
MEASURED_VIP = "10.249.0.1"
# client and server pinned, the same in both clusters: where the scheduler put them (one CPU
# or two, a wake-up across CPUs or not) moved a round's median by 10 us either way
CLIENT_CPU, SERVER_CPU = "0", "1"


class ConnectProbe:
    """A client pod and a server pod on node 1 of a cluster, the server behind a service:
    rounds of new connections from the client to the service's address."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        node = f"{cluster.name}-node-1"
        cluster.run("pod", "create", "bench-server", "--node", node, "--labels", "app=bs")
        cluster.run("pod", "create", "bench-client", "--node", node, "--labels", "app=bc")
        pods = json.loads(cluster.run("pod", "list", "-o", "json").stdout)["items"]
        server_ip = next(p["ip"] for p in pods if p["name"] == "bench-server")
        self.server = subprocess.Popen(
            cluster.command(
                "pod", "exec", "bench-server", "--", sys.executable, "-c", SERVE_SCRIPT, SERVER_CPU
            ),
            env=cluster.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        assert self.server.stdout.readline().strip() == "ready"
        cluster.run(
            "service",
            "create",
            "measured",
            "--frontend",
            f"{MEASURED_VIP}:80/TCP",
            "--backend",
            f"{server_ip}:8080",
        )
        time.sleep(1)
        self.client = subprocess.Popen(
            cluster.command(
                "pod",
                "exec",
                "bench-client",
                "--",
                sys.executable,
                "-c",
                CONNECT_ROUNDS_SCRIPT,
                MEASURED_VIP,
                "80",
                CLIENT_CPU,
            ),
            env=cluster.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.client.stdout is not None
        assert self.client.stdout.readline().strip() == "ready"

    def round(self, n: int) -> float:
        """The median connect latency of ``n`` connections, in microseconds."""
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(f"{n}\n")
        self.client.stdin.flush()
        return float(self.client.stdout.readline())

    def close(self) -> None:
        for proc in (self.client, self.server):
            proc.kill()
            proc.wait()


def connect_side_by_side(few: ConnectProbe, many: ConnectProbe, n: int) -> tuple[float, float]:
    """Median connect latency through each probe's cluster, rounds alternating between the
    two (one round's median moved by tens of percent with what else this shared machine ran
    at that moment): the median of CONNECT_ROUNDS round medians each."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(CONNECT_ROUNDS):
        a.append(few.round(n))
        b.append(many.round(n))
    return statistics.median(a), statistics.median(b)


# --- the run ---------------------------------------------------------------------------------


class TwoNodeCluster(Cluster):
    NODES = 2

    def up(self) -> None:
        with self._logs_on_failure():
            super().up()

    @contextlib.contextmanager
    def _logs_on_failure(self) -> Iterator[None]:
        """The services' last log lines when ``up`` fails (the state directory goes with the
        temporary directory)."""
        try:
            yield
        except RuntimeError:
            for path in sorted((self.state / "logs").glob("*.log")):
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {path.name}\n" + "\n".join(tail), file=sys.stderr)
            raise


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


async def membrane_part(
    cluster: Cluster, args: argparse.Namespace, loaded: ConnectProbe
) -> dict[str, Any]:
    """Single updates at each scale; new connections with the first scale's services
    present, side by side with ``loaded``, a cluster holding all of them."""
    plan = Plan(cluster.octet, args.services)
    lb = Membrane(cluster, plan)
    res: dict[str, Any] = {"updates": {}}
    bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
    probe = await asyncio.to_thread(ConnectProbe, cluster)
    try:
        done = 0
        for scale in SCALES:
            seconds = await lb.bulk(bus, done, scale)
            print(
                f"  applied services {done}..{scale}: {seconds:.2f} s to every node's maps",
                flush=True,
            )
            done = scale
            res["updates"][scale] = await lb.updates(bus, args.updates)
            if scale == SCALES[0]:
                res["connect"] = await asyncio.to_thread(
                    connect_side_by_side, probe, loaded, args.connections
                )
                big = Membrane(loaded.cluster, Plan(loaded.cluster.octet, args.services))
                big_bus = await Bus.connect(loaded.cluster.nats_url, "bench", retry_for=10)
                try:
                    res["updates_side_by_side"] = await updates_side_by_side(
                        (lb, bus), (big, big_bus), args.updates
                    )
                finally:
                    await big_bus.close()
        seconds = await lb.bulk(bus, done, args.services)
        print(
            f"  applied services {done}..{args.services}: {seconds:.2f} s to every node's maps",
            flush=True,
        )
        # the lb service and the agents read the bulk's KV entries for a moment after the
        # last ack: updates right then wait behind that; the single-update figures are for
        # services present, at steady state
        await asyncio.sleep(SETTLE_SECONDS)
        res["updates"][args.services] = await lb.updates(bus, args.updates)
    finally:
        probe.close()
        await bus.close()
    return res


async def bulk_once(cluster: Cluster, args: argparse.Namespace, via: str) -> dict[str, float]:
    """Every service at once on a fresh cluster, ``via`` the lb service's apply endpoint
    ("api") or ``membrane apply -f`` ("cli")."""
    plan = Plan(cluster.octet, args.services)
    lb = Membrane(cluster, plan)
    if via == "api":
        bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
        try:
            return {"seconds": await lb.bulk(bus, 0, args.services)}
        finally:
            await bus.close()
    bulk_file = Path(args.workdir) / "bulk.yaml"
    text = yaml.dump_all(plan.documents(0, args.services), Dumper=_Dumper)
    await asyncio.to_thread(bulk_file.write_text, text)
    returned, seconds = await lb.bulk_cli(0, args.services, bulk_file)
    return {"seconds": seconds, "returned": returned, "bytes": len(text)}


def bulk_both(args: argparse.Namespace, keep: list[Cluster]) -> dict[str, dict[str, float]]:
    """The bulk through each path, each on its own fresh two-node cluster; the first
    cluster, holding every service, is appended to ``keep`` and left up (the caller downs it)."""
    out = {}
    for via in ("api", "cli"):
        cluster = TwoNodeCluster(Path(args.workdir) / f"state-{via}")
        print(f"starting a two-node cluster {cluster.name} for the bulk via {via} ...", flush=True)
        cluster.up()
        kept = False
        try:
            out[via] = uvloop.run(bulk_once(cluster, args, via))
            if via == "api":
                keep.append(cluster)
                kept = True
        finally:
            if not kept:
                cluster.down()
        print(f"  {via}: {out[via]['seconds']:.2f} s to every node's maps", flush=True)
    return out


def print_bulk(n: int, bulk: dict[str, dict[str, float]]) -> None:
    api, cli = bulk["api"]["seconds"], bulk["cli"]["seconds"]
    print(
        f"membrane, {n} services (+ their EndpointSlices) applied at once -> in every node's "
        f"maps: {api:.2f} s through the lb service's apply endpoint (goal <= "
        f"{GOAL_BULK_SECONDS:g} s: {'met' if api <= GOAL_BULK_SECONDS else 'NOT met'}); "
        f"{cli:.2f} s from `membrane apply -f` of a {bulk['cli']['bytes'] / 1e6:.1f} MB YAML "
        f"file (goal <= {GOAL_CLI_SECONDS:g} s: {'met' if cli <= GOAL_CLI_SECONDS else 'NOT met'}"
        f"; the CLI returned after {bulk['cli']['returned']:.2f} s); load average "
        f"{os.getloadavg()[0]:.2f}"
    )


def run(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/lb.py needs root (namespaces, BPF, iptables)")
    kept: list[Cluster] = []  # the cluster of the bulk through the API, holding every service
    if args.bulk_only:
        with tempfile.TemporaryDirectory(prefix="membrane-lb-bench-") as tmp:
            args.workdir = tmp
            try:
                print_bulk(args.services, bulk_both(args, kept))
            finally:
                for spare in kept:
                    spare.down()
        return
    scales = [*SCALES, args.services]
    with tempfile.TemporaryDirectory(prefix="membrane-lb-bench-") as tmp:
        args.workdir = tmp
        print("1. membrane: every service at once", flush=True)
        try:
            bulk = bulk_both(args, kept)
            loaded = ConnectProbe(kept[0])
            cluster = TwoNodeCluster(Path(tmp) / "state")
            print(f"starting a two-node cluster {cluster.name} ...", flush=True)
            cluster.up()
            try:
                print("1. membrane: single updates and connections", flush=True)
                mem = uvloop.run(membrane_part(cluster, args, loaded))
            finally:
                loaded.close()
                cluster.down()
        finally:
            for spare in kept:
                spare.down()
    plan = Plan(200, args.services)
    print("2. kube-proxy's iptables model (scratch namespaces)", flush=True)
    ipt = iptables_scale(plan, scales)
    print("3. new-connection latency, iptables-legacy DNAT", flush=True)
    ipt_connect = iptables_connect(plan, [SCALES[0], args.services], args.connections)

    n = args.services
    print()
    print(f"== services: {n} (2 backends each), updates {args.updates} per scale ==")
    print_bulk(n, bulk)
    p99 = {}
    for scale in scales:
        values = mem["updates"][scale]
        p50, p99[scale] = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
        legacy = ipt["iptables-legacy"][scale][1] * 1000
        nft = ipt["iptables-nft"][scale][1] * 1000
        print(
            f"single update with {scale:>6} services: membrane p50 {p50:6.2f} ms p99 "
            f"{p99[scale]:6.2f} ms | iptables-legacy {legacy:9.1f} ms ({ratio(legacy, p99[scale])}"
            f" of membrane p99) | iptables-nft {nft:9.1f} ms ({ratio(nft, p99[scale])})"
        )
    print(
        f"  (one scale after another on one cluster: p99 at {n} / p99 at {SCALES[0]} "
        f"{p99[n] / p99[SCALES[0]]:.2f})"
    )
    # the goals, from updates alternating between two clusters (what the machine does
    # meanwhile falls on both alike)
    small, big = (sorted(v) for v in mem["updates_side_by_side"])
    s50, s99 = percentile(small, 0.5) * 1000, percentile(small, 0.99) * 1000
    b50, b99 = percentile(big, 0.5) * 1000, percentile(big, 0.99) * 1000
    flat = b99 / s99
    print(
        f"single update, {len(small)} alternating between two clusters: with {SCALES[0]} "
        f"services p50 {s50:.2f} ms p99 {s99:.2f} ms, with {n} p50 {b50:.2f} ms p99 {b99:.2f} ms"
    )
    print(
        f"p99 at {n} / p99 at {SCALES[0]}: {flat:.2f} (goal <= {GOAL_FLAT}: "
        f"{'met' if flat <= GOAL_FLAT else 'NOT met'}); p99 goal <= {GOAL_P99_MS} ms: "
        f"{'met' if max(s99, b99) <= GOAL_P99_MS else 'NOT met'}"
    )
    vs_legacy = ipt["iptables-legacy"][n][1] * 1000 / b99
    print(
        f"iptables-legacy single add / membrane p99 at {n}: {vs_legacy:.0f}x (goal >= "
        f"{GOAL_VS_LEGACY:g}x: {'met' if vs_legacy >= GOAL_VS_LEGACY else 'NOT met'})"
    )
    for binary, rows in ipt.items():
        print(
            f"{binary} restore of {n} services: {rows[n][0]:.2f} s; add at {n} / add at "
            f"{SCALES[0]}: {ratio(rows[n][1], rows[SCALES[0]][1])}"
        )
    few, many = mem["connect"]
    growth = many / few - 1
    print(
        f"new connection (median of {CONNECT_ROUNDS} alternating rounds of {args.connections}, "
        f"two clusters side by side): membrane {few:.1f} us with {SCALES[0]} services, "
        f"{many:.1f} us with {n} ({growth:+.1%}, goal within {GOAL_CONNECT:.0%}: "
        f"{'met' if abs(growth) <= GOAL_CONNECT else 'NOT met'})"
    )
    ig = ipt_connect[n] / ipt_connect[SCALES[0]] - 1
    print(
        f"new connection (median): iptables-legacy {ipt_connect[SCALES[0]]:.0f} us at "
        f"{SCALES[0]}, {ipt_connect[n]:.0f} us at {n} ({ig:+.1%}); membrane / iptables at "
        f"{n}: {ratio(many, ipt_connect[n])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--services", type=int, default=20000)
    parser.add_argument("--updates", type=int, default=50, help="single updates per scale")
    parser.add_argument("--connections", type=int, default=300, help="connections per sample")
    parser.add_argument(
        "--bulk-only", action="store_true", help="only the bulk apply of every service"
    )
    args = parser.parse_args()
    if args.services <= SCALES[-1]:
        parser.error(f"--services must be more than {SCALES[-1]}")
    run(args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
