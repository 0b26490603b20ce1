"""Overlay: cross-node TCP request/response and throughput, VXLAN vs native routing vs no BPF.

Starts its own two-node cluster (``membrane up --nodes 2``, tunnel mode, in a temporary state
directory, removed with ``membrane down --purge`` at the end), a client pod on node 1 and a
server pod on node 2, and measures side by side, on the same pods and the same veths, in
several alternating rounds (this machine is shared and noisy):

1. overlay: as the agents run it -- VXLAN, the client's identity in the VNI, the server's
   node enforcing with it (from_overlay);
2. native: the same programs with the overlay switched off (the mode in the pinned overlay
   config of both nodes, one map write each, which is what ``--routing native`` sets) and the
   routes native mode installs (each node's pod CIDR via its underlay address);
3. no BPF: the same native routes, the programs detached from both pods' veths: plain kernel
   forwarding between the same namespaces, the baseline.

The programs and tunnel mode come back by SIGKILLing both agents: their successors attach the
programs again and rewrite the overlay config. Request/response latency is sockperf
ping-pong (its latency is half the round trip); throughput is one TCP stream of 64 KiB writes
(a Python sender and sink). Client and server are pinned to one CPU (``--cpu``), so the
latency is the CPU cost of a round trip through both nodes, not cross-CPU wake-ups.

    sudo .venv/bin/python bench/overlay.py [--rounds 3] [--seconds 5]

Needs root (namespaces, BPF), sockperf (Debian package ``sockperf``) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datapath import (  # type: ignore[import-not-found]
    BPFFS,
    MapEntry,
    _free_octet,
    _sockperf_value,
    obj_get,
)

from membrane.state import StateDir

GOAL_RR_OVERHEAD = 0.15  # overlay over native, request/response
RR_PORT = 5001
STREAM_PORT = 5003
CHUNK = 64 * 1024
OVERLAY_LAYOUT = struct.Struct("<4sIII")  # bpf/overlay.h overlay_config (port+pad as one u32)
ROUTING_NATIVE, ROUTING_TUNNEL = 0, 1
VARIANTS = ("overlay", "native", "no BPF")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    ifname: str


@dataclass
class Run:
    rr_avg_us: float
    rr_p50_us: float
    rr_p99_us: float
    gbit_s: float


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=lambda: {v: [] for v in VARIANTS})


class Cluster:
    """A two-node ``membrane up`` in its own state directory, driven through the CLI."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.name = "o" + secrets_hex()
        self.nodes = [f"{self.name}-node-1", f"{self.name}-node-2"]
        self.octet = 0

    def env(self) -> dict[str, str]:
        env = {**os.environ, "MEMBRANE_STATE_DIR": str(self.state)}
        env.pop("MEMBRANE_NATS_URL", None)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "membrane", *args]

    def run(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            self.command(*args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"membrane {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def up(self) -> None:
        self.octet = _free_octet()
        self.run(
            *("up", "--name", self.name, "--nodes", "2", "--identity-replicas", "1"),
            *("--routing", "tunnel", "--underlay-cidr", f"172.31.{self.octet}.0/24"),
            *("--cluster-cidr", f"10.{self.octet}.0.0/16"),
            *("--service-cidr", f"10.{self.octet + 1}.0.0/16"),
            timeout=240,
        )

    def down(self) -> None:
        result = subprocess.run(
            self.command("down", "--purge"), env=self.env(), capture_output=True, text=True
        )
        if result.returncode != 0:
            print(f"membrane down --purge failed:\n{result.stderr}", file=sys.stderr)

    def create_pod(self, name: str, node: str) -> Pod:
        self.run("pod", "create", name, "--labels", f"app={name}", "--node", node)
        pods = json.loads(self.run("pod", "list", "-o", "json"))["items"]
        (found,) = [p for p in pods if p["name"] == name]
        return Pod(name, node, found["ip"], found["host_ifname"])

    def exec_in(self, pod: Pod, *command: str, cpu: int = -1) -> list[str]:
        pin = ["taskset", "-c", str(cpu)] if cpu >= 0 else []
        return self.command("pod", "exec", pod.name, "--", *pin, *command)

    def in_node(self, node: str, *command: str) -> str:
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{node}", *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def agent_pid(self, node: str) -> int | None:
        for proc in StateDir(self.state).processes():
            if proc.name == f"datapath-{node}" and proc.running:
                return proc.pid
        return None

    def nodes_info(self) -> list[dict[str, str]]:
        status = json.loads(self.run("status", "-o", "json"))
        return [n for n in status["nodes"] if n["name"] in self.nodes]


def secrets_hex() -> str:
    return os.urandom(2).hex()


# --- switching the variants ------------------------------------------------------------------


def set_mode(cluster: Cluster, mode: int) -> None:
    for node in cluster.nodes:
        fd = obj_get(BPFFS / "membrane" / node / "overlay")
        try:
            entry = MapEntry(fd, struct.pack("<I", 0), OVERLAY_LAYOUT.size)
            current = entry.get()
            if current is None:
                raise RuntimeError(f"{node}: no overlay config")
            underlay, ifindex, _, pad = OVERLAY_LAYOUT.unpack(current)
            entry.set(OVERLAY_LAYOUT.pack(underlay, ifindex, mode, pad))
        finally:
            os.close(fd)


def native_routes(cluster: Cluster) -> None:
    """What native mode installs: every other node's pod CIDR via its underlay address."""
    info = cluster.nodes_info()
    for node in cluster.nodes:
        for peer in info:
            if peer["name"] != node:
                cluster.in_node(
                    node, "ip", "route", "replace", peer["pod_cidr"], "via", peer["underlay_ip"]
                )


def tc_attached(cluster: Cluster, pod: Pod) -> bool:
    out = cluster.in_node(pod.node, "tc", "filter", "show", "dev", pod.ifname, "ingress")
    out += cluster.in_node(pod.node, "tc", "filter", "show", "dev", pod.ifname, "egress")
    return "from_container" in out and "to_container" in out


def detach(cluster: Cluster, pods: list[Pod]) -> None:
    for pod in pods:
        for direction in ("ingress", "egress"):
            cluster.in_node(pod.node, "tc", "filter", "del", "dev", pod.ifname, direction)
        if tc_attached(cluster, pod):
            raise RuntimeError(f"programs still on {pod.ifname}")


def restore(cluster: Cluster, pods: list[Pod]) -> None:
    """SIGKILL both agents; their successors attach the programs and set tunnel mode again."""
    old = {node: cluster.agent_pid(node) for node in cluster.nodes}
    for pid in old.values():
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        fresh = all(cluster.agent_pid(n) not in (None, old[n]) for n in cluster.nodes) and all(
            tc_attached(cluster, p) for p in pods
        )
        if fresh:
            # the agents answer on their sockets once start-up (adoption) is through
            cluster.run("bpf", "endpoints", "-o", "json", timeout=20)
            time.sleep(1.0)
            return
        time.sleep(0.1)
    raise RuntimeError("the agents did not come back within 90 s")


# --- measuring -------------------------------------------------------------------------------


class Bench:
    def __init__(self, cluster: Cluster, client: Pod, server: Pod, args: argparse.Namespace):
        self.cluster, self.client, self.server = cluster, client, server
        self.seconds: int = args.seconds
        self.cpu: int = args.cpu
        self.servers: list[subprocess.Popen[str]] = []

    def _run(self, command: list[str], seconds: float) -> str:
        result = subprocess.run(
            command, env=self.cluster.env(), capture_output=True, text=True, timeout=seconds + 30
        )
        output = _ANSI.sub("", result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
        return output

    def sockperf_pp(self, seconds: int) -> tuple[float, float, float]:
        output = self._run(
            self.cluster.exec_in(
                self.client,
                *("sockperf", "pp", "--tcp", "-i", self.server.ip, "-p", str(RR_PORT)),
                *("-t", str(seconds)),
                cpu=self.cpu,
            ),
            seconds,
        )
        return (
            _sockperf_value(output, r"avg-latency=([\d.]+)"),
            _sockperf_value(output, r"percentile 50\.000 =\s*([\d.]+)"),
            _sockperf_value(output, r"percentile 99\.000 =\s*([\d.]+)"),
        )

    def stream(self, seconds: int) -> float:
        output = self._run(
            self.cluster.exec_in(
                self.client,
                *(sys.executable, str(Path(__file__).resolve()), "--source"),
                f"{self.server.ip}:{STREAM_PORT}:{seconds}",
                cpu=self.cpu,
            ),
            seconds,
        )
        return float(json.loads(output.strip().splitlines()[-1])["gbit_s"])

    def measure(self) -> Run:
        avg, p50, p99 = self.sockperf_pp(self.seconds)
        return Run(avg, p50, p99, self.stream(max(1, self.seconds // 2)))

    def start_servers(self) -> None:
        sink = subprocess.Popen(
            self.cluster.exec_in(
                self.server,
                *(sys.executable, str(Path(__file__).resolve()), "--sink", str(STREAM_PORT)),
                cpu=self.cpu,
            ),
            env=self.cluster.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        rr = subprocess.Popen(
            self.cluster.exec_in(
                self.server,
                *("sockperf", "sr", "--tcp", "-i", self.server.ip, "-p", str(RR_PORT)),
                cpu=self.cpu,
            ),
            env=self.cluster.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.servers = [sink, rr]  # type: ignore[list-item]
        if sink.stdout is None or sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the sink did not start")
        for attempt in range(40):  # sockperf's server is ready once a ping-pong goes through
            try:
                self.sockperf_pp(1)
                return
            except RuntimeError:
                if attempt == 39:
                    raise
                time.sleep(0.25)

    def stop_servers(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()


def rounds(bench: Bench, args: argparse.Namespace) -> Results:
    results = Results()
    pods = [bench.client, bench.server]
    bench.start_servers()
    try:
        for round_ in range(args.rounds):
            if round_:
                restore(bench.cluster, pods)
            results.runs["overlay"].append(bench.measure())
            set_mode(bench.cluster, ROUTING_NATIVE)
            # every round: a restarted agent (tunnel mode) routes the other nodes' pod CIDRs
            # into the VXLAN device again, which native mode does not take
            native_routes(bench.cluster)
            results.runs["native"].append(bench.measure())
            detach(bench.cluster, pods)
            results.runs["no BPF"].append(bench.measure())
            o, n, b = (results.runs[v][-1] for v in VARIANTS)
            print(
                f"  round {round_ + 1}: RR avg {o.rr_avg_us:.2f} / {n.rr_avg_us:.2f} / "
                f"{b.rr_avg_us:.2f} µs, stream {o.gbit_s:.2f} / {n.gbit_s:.2f} / "
                f"{b.gbit_s:.2f} Gbit/s (overlay / native / no BPF)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        bench.stop_servers()
    return results


def report(results: Results, args: argparse.Namespace) -> float:
    def med(variant: str, metric: str) -> float:
        return float(statistics.median(getattr(r, metric) for r in results.runs[variant]))

    print(
        f"Cross-node TCP, client on node 1 and server on node 2, both pinned to CPU {args.cpu}; "
        f"median of {args.rounds} alternating rounds of {args.seconds} s"
    )
    header = f"{'':34}" + "".join(f"{v:>12}" for v in VARIANTS)
    print(header + f"{'overlay/native':>16}{'native/noBPF':>14}")
    for label, metric in (
        ("RR latency avg µs (half RTT)", "rr_avg_us"),
        ("RR latency p50 µs", "rr_p50_us"),
        ("RR latency p99 µs", "rr_p99_us"),
        ("stream Gbit/s (one connection)", "gbit_s"),
    ):
        values = [med(v, metric) for v in VARIANTS]
        row = f"{label:34}" + "".join(f"{x:12.2f}" for x in values)
        print(row + f"{values[0] / values[1]:16.3f}{values[1] / values[2]:14.3f}")
    # judged on the median round trip: on this shared machine the average and the tail are
    # dominated by other tenants preempting the pinned CPU (compare p99 between rounds)
    overhead = med("overlay", "rr_p50_us") / med("native", "rr_p50_us") - 1
    mean = med("overlay", "rr_avg_us") / med("native", "rr_avg_us") - 1
    verdict = "met" if overhead <= GOAL_RR_OVERHEAD else "NOT met"
    print(
        f"\ngoal: overlay overhead over native on request/response (p50) <= "
        f"{GOAL_RR_OVERHEAD:.0%}: {overhead:+.1%} ({verdict}); on the average: {mean:+.1%}"
    )
    return overhead


# --- helpers run inside the pods -------------------------------------------------------------


def sink(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    print("ready", flush=True)
    buffer = bytearray(1 << 20)
    while True:
        conn, _ = listener.accept()
        with conn:
            while conn.recv_into(buffer):
                pass


def source(spec: str) -> None:
    ip, port, seconds = spec.split(":")
    payload = b"x" * CHUNK
    sent = 0
    with socket.create_connection((ip, int(port)), timeout=10) as sock:
        started = time.perf_counter()
        deadline = started + float(seconds)
        while time.perf_counter() < deadline:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the sink closes once it has read everything
        elapsed = time.perf_counter() - started
    print(json.dumps({"bytes": sent, "seconds": elapsed, "gbit_s": sent * 8 / elapsed / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each RR run")
    parser.add_argument(
        "--cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="CPU for the client and server (default: the last; -1: not pinned)",
    )
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink is not None:
        sink(args.sink)
        return
    if args.source is not None:
        source(args.source)
        return
    if shutil.which("sockperf") is None:
        sys.exit("sockperf is missing: apt-get install sockperf (scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        cluster = Cluster(Path(tmp) / "state")
        print(f"cluster {cluster.name}: up", file=sys.stderr, flush=True)
        try:
            cluster.up()
            client = cluster.create_pod("ov-client", cluster.nodes[0])
            server = cluster.create_pod("ov-server", cluster.nodes[1])
            results = rounds(Bench(cluster, client, server, args), args)
        finally:
            print(f"cluster {cluster.name}: down", file=sys.stderr, flush=True)
            cluster.down()
    print()
    report(results, args)


if __name__ == "__main__":
    main()
