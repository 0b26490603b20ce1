"""Datapath: KV change to BPF map, pod-to-pod TCP with and without the programs, flow events/s.

Starts its own one-node cluster (``membrane up``, in a temporary state directory, removed with
``membrane down --purge`` at the end) and measures, side by side in one run:

1. KV change -> map entry: an ipcache entry, then a resolved policy, put into the KV one at a
   time while this process polls the pinned map (bpf(2) lookups, 50 µs apart) until the agent
   has written the entry. Printed with what the bus alone takes (the put's ack, the same change
   reaching a watcher in this process) and the baseline: this process writing the same entry
   into the map itself (bpf_update_elem), which is what the bus and the agent add to.
2. TCP between two pods on the node, programs attached against the same veth pair without them
   (tc filters deleted in the node namespace), alternating over several rounds because this
   machine is noisy; the programs come back by SIGKILLing the node's agent, whose successor
   re-attaches them on start-up. Request/response latency is sockperf ping-pong (its latency is
   half the round trip); the connection rate is a Python client (connect, 1 byte each way, close)
   against a Python accept loop. The server pod enforces ingress policy (an allow for the
   client), so "with" is the whole path: conntrack, policy lookup, a flow event per connection.
3. Ring buffer events/s decoded and published (bench/flows.py, run from here when present).

    sudo .venv/bin/python bench/datapath.py [--updates 2000] [--rounds 3] [--seconds 5] [--quick]

Needs root (namespaces, BPF) and sockperf (Debian package ``sockperf``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from nats.js.kv import KeyValue

from membrane.state import StateDir
from services.datapath.maps import IPCacheValue, pack_ipcache_key
from services.datapath.policy_compiler import (
    INGRESS,
    KEY_BITS,
    PROTO_TCP,
    PolicyKey,
    PolicyValue,
)
from services.datapath.ringbuf import bpf
from shared import subjects
from shared.bus import Bus
from shared.messages import IPCacheEntry, PolicyEntry, ResolvedPolicy

GOAL_KV_P99_MS = 5.0
GOAL_TCP_OVERHEAD = 0.10
BENCH_DIR = Path(__file__).resolve().parent
FLOWS_BENCH = BENCH_DIR / "flows.py"
BPFFS = Path("/sys/fs/bpf")

RR_PORT = 5001
CONN_PORT = 5002
POLL_SLEEP = 50e-6  # between map lookups while waiting for the agent
STEP_TIMEOUT = 5.0  # one change not in the map by then is an error, not a slow sample
FIRST_ID = 16_777_216 + 1000  # ipcache identities of the fresh addresses (CIDR identity range)
POLICY_PEER = 70_000  # the peer of the latency policy's allow entry (nobody holds it)
BOGUS_ENDPOINT = 0xFFFF_FF00  # the direct-write baseline's policy keys match no endpoint

# --- bpf(2) on pinned maps -------------------------------------------------------------------

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET = 7


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _ElemAttr(ctypes.Structure):
    # ctypes aligns the u64 members to 8 bytes, as the kernel's __aligned_u64
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def obj_get(path: Path) -> int:
    """A new fd for the map pinned at ``path``."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))


class MapEntry:
    """One key of one pinned map, with its buffers made once (so polling it is one syscall)."""

    def __init__(self, fd: int, key: bytes, value_size: int) -> None:
        self._key = ctypes.create_string_buffer(key, len(key))
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = _ElemAttr(
            map_fd=fd, key=ctypes.addressof(self._key), value=ctypes.addressof(self._value)
        )

    def get(self) -> bytes | None:
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, self._attr)
        except FileNotFoundError:
            return None
        return self._value.raw

    def set(self, value: bytes) -> None:
        ctypes.memmove(self._value, value, len(value))
        self._attr.flags = 0  # BPF_ANY
        bpf(BPF_MAP_UPDATE_ELEM, self._attr)

    def delete(self) -> None:
        # the kernel wants every field past ``key`` zero for a delete
        attr = _ElemAttr(map_fd=self._attr.map_fd, key=self._attr.key)
        with contextlib.suppress(FileNotFoundError):
            bpf(BPF_MAP_DELETE_ELEM, attr)


def wait_for_value(entry: MapEntry, expected: bytes, deadline: float) -> float:
    """Poll until the map holds ``expected`` under the key; the moment it was seen. Runs in a
    thread, so that the event loop sends the put and takes its ack meanwhile."""
    while True:
        if entry.get() == expected:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"map entry not written within {STEP_TIMEOUT:g}s")
        time.sleep(POLL_SLEEP)


# --- results ---------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


@dataclass
class Latencies:
    name: str
    seconds: list[float] = field(default_factory=list)

    def ms(self, p: float) -> float:
        return percentile(self.seconds, p) * 1000


@dataclass
class TcpRun:
    """One measurement of one variant (with or without the programs)."""

    rr_avg_us: float
    rr_p50_us: float
    rr_p99_us: float
    rr_per_s: float
    conn_per_s: float
    conn_errors: int


@dataclass
class FlowRow:
    name: str
    events: int
    rate: float
    vs_baseline: float


@dataclass
class FlowFigures:
    rows: list[FlowRow]
    goal: float
    note: str = ""


# --- the cluster -----------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    ip: str
    identity: int
    ifindex: int
    ifname: str


class Cluster:
    """A one-node ``membrane up`` in its own state directory, driven through the CLI."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.name = "b" + secrets.token_hex(2)
        self.node = f"{self.name}-node-1"
        self.node_netns = f"/run/netns/{self.node}"
        self.pins = BPFFS / "membrane" / self.node
        self.nats_url = ""
        self.octet = 0  # X of the address ranges, chosen by up()

    def env(self) -> dict[str, str]:
        env = {**os.environ, "MEMBRANE_STATE_DIR": str(self.state)}
        env.pop("MEMBRANE_NATS_URL", None)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "membrane", *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"membrane {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def up(self) -> None:
        octet = _free_octet()
        self.run(
            "up",
            "--name",
            self.name,
            "--nodes",
            "1",
            "--identity-replicas",
            "1",
            "--underlay-cidr",
            f"172.31.{octet}.0/24",
            "--cluster-cidr",
            f"10.{octet}.0.0/16",
            "--service-cidr",
            f"10.{octet + 1}.0.0/16",
            timeout=180,
        )
        info = StateDir(self.state).read_cluster()
        if info is None:
            raise RuntimeError("membrane up wrote no cluster.json")
        self.nats_url = info.nats_url
        self.octet = octet

    def down(self) -> None:
        result = subprocess.run(
            self.command("down", "--purge"),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            print(f"membrane down --purge failed:\n{result.stderr}", file=sys.stderr)

    def create_pod(self, name: str) -> Pod:
        self.run("pod", "create", name, "--labels", f"app={name}", "--node", self.node)
        pods = json.loads(self.run("pod", "list", "-o", "json").stdout)
        (found,) = [p for p in pods if p["name"] == name]
        return Pod(
            name=name,
            ip=found["ip"],
            identity=int(found["identity"]),
            ifindex=int(found["host_ifindex"]),
            ifname=found["host_ifname"],
        )

    def exec_in(self, pod: Pod, *command: str) -> list[str]:
        return self.command("pod", "exec", pod.name, "--", *command)

    def tc(self, *args: str) -> str:
        result = subprocess.run(
            ["nsenter", f"--net={self.node_netns}", "tc", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def agent_pid(self) -> int | None:
        """The node agent's pid from the supervisor's record, checked against the process."""
        for proc in StateDir(self.state).processes():
            if proc.name != f"datapath-{self.node}" or not proc.running:
                continue
            try:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            except OSError:
                return None
            if b"datapath" in cmdline and f"MEMBRANE_NODE={self.node}".encode() in environ:
                return proc.pid
        return None


def _free_octet() -> int:
    """X for 172.31.X.0/24, 10.X.0.0/16 and 10.(X+1).0.0/16, none routed (in use) yet."""
    routes = subprocess.run(["ip", "-o", "route"], capture_output=True, text=True).stdout
    for _ in range(50):
        octet = 150 + secrets.randbelow(50)
        taken = (f"172.31.{octet}.", f"10.{octet}.", f"10.{octet + 1}.")
        if not any(prefix in routes for prefix in taken):
            return octet
    raise RuntimeError("no free 172.31.X.0/24 in 150..199")


# --- 1. KV change -> map entry ---------------------------------------------------------------


class Watcher:
    """Watches one bucket from this process; resolves a future when a given value arrives."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.waiting: dict[tuple[str, bytes], asyncio.Future[float]] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        async with contextlib.aclosing(Bus.watch(self.kv)) as events:
            async for event in events:
                if event is None:
                    self.synced.set()
                    continue
                future = self.waiting.pop((event.key, event.value or b""), None)
                if future is not None and not future.done():
                    future.set_result(time.perf_counter())

    def expect(self, key: str, value: bytes) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[(key, value)] = future
        return future


@dataclass
class Propagation:
    acked: Latencies
    watched: Latencies
    mapped: Latencies


async def propagate(
    kv: KeyValue, watcher: Watcher, steps: Iterator[tuple[str, bytes, MapEntry, bytes]], label: str
) -> Propagation:
    """For each (KV key, payload, map entry, expected value): put, then time the ack, the
    watcher's copy and the map entry, one change at a time."""
    result = Propagation(
        Latencies(f"{label}: KV put acked (bus only)"),
        Latencies(f"{label}: KV put -> watch event here"),
        Latencies(f"{label}: KV put -> map entry (agent)"),
    )
    for key, payload, entry, expected in steps:
        seen = watcher.expect(key, payload)
        started = time.perf_counter()
        poll = asyncio.ensure_future(
            asyncio.to_thread(wait_for_value, entry, expected, started + STEP_TIMEOUT)
        )
        await kv.put(key, payload)
        acked = time.perf_counter()
        mapped = await poll
        watched = await asyncio.wait_for(seen, STEP_TIMEOUT)
        result.acked.seconds.append(acked - started)
        result.watched.seconds.append(watched - started)
        result.mapped.seconds.append(mapped - started)
    return result


def direct_writes(label: str, entries: list[tuple[MapEntry, bytes]]) -> Latencies:
    """The baseline: this process writes each entry itself (and removes it again)."""
    result = Latencies(f"{label}: bpf_update_elem here (baseline)")
    for entry, value in entries:
        started = time.perf_counter()
        entry.set(value)
        result.seconds.append(time.perf_counter() - started)
        entry.delete()
    return result


def fresh_addresses(octet: int, third: int, count: int) -> list[IPv4Address]:
    """``count`` addresses from 10.octet.third.0 on, far from the node's pod CIDR."""
    first = IPv4Address(f"10.{octet}.{third}.0")
    return [first + i for i in range(count)]


async def kv_latency(cluster: Cluster, target: Pod, args: argparse.Namespace) -> list[Latencies]:
    bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
    ipcache_fd = obj_get(cluster.pins / "ipcache")
    policy_fd = obj_get(cluster.pins / "policy")
    try:
        ipcache_kv = await bus.kv(subjects.KV_IPCACHE)
        resolved_kv = await bus.kv(subjects.KV_RESOLVED)
        results: list[Latencies] = []
        warm = max(10, args.updates // 20)

        # ipcache: a fresh /32 each step (after a few untimed ones)
        value_size = len(IPCacheValue(0).pack())
        addresses = fresh_addresses(cluster.octet, 200, warm + args.updates)

        def ipcache_steps(addrs: list[IPv4Address]) -> Iterator[tuple[str, bytes, MapEntry, bytes]]:
            for ip in addrs:
                identity = FIRST_ID + int(ip) % 65536
                payload = msgspec.json.encode(IPCacheEntry(cidr=f"{ip}/32", identity=identity))
                key = pack_ipcache_key(IPv4Network(f"{ip}/32"))
                expected = IPCacheValue(identity).pack()
                yield str(ip), payload, MapEntry(ipcache_fd, key, value_size), expected

        watcher = Watcher(ipcache_kv)
        watch = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher.synced.wait(), 30)
        await propagate(ipcache_kv, watcher, ipcache_steps(addresses[:warm]), "warm-up")
        timed = await propagate(ipcache_kv, watcher, ipcache_steps(addresses[warm:]), "ipcache")
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        baseline = [
            (
                MapEntry(ipcache_fd, pack_ipcache_key(IPv4Network(f"{ip}/32")), value_size),
                IPCacheValue(FIRST_ID).pack(),
            )
            for ip in fresh_addresses(cluster.octet, 220, args.updates)
        ]
        results += [direct_writes("ipcache", baseline), timed.acked, timed.watched, timed.mapped]
        # the fresh addresses go again, so that the TCP runs see the usual small ipcache
        await asyncio.gather(*(ipcache_kv.delete(str(ip)) for ip in addresses))
        print(f"  ipcache: p99 {timed.mapped.ms(0.99):.2f} ms", file=sys.stderr, flush=True)

        # resolved policy: one allow entry whose port (and rule id) changes every step
        value_size = len(PolicyValue(0, False).pack())

        def policy_steps(first: int, count: int) -> Iterator[tuple[str, bytes, MapEntry, bytes]]:
            for step in range(first, first + count):
                port = 1024 + step % 60000
                policy = ResolvedPolicy(
                    identity=target.identity,
                    revision=step + 1,
                    ingress_enforced=True,
                    ingress=[
                        PolicyEntry(
                            peer=POLICY_PEER, protocol=PROTO_TCP, port=port, rule_id=step + 1
                        )
                    ],
                    rules={step + 1: "bench/latency[0]"},
                )
                key = PolicyKey(KEY_BITS, target.ifindex, INGRESS, POLICY_PEER, PROTO_TCP, port)
                expected = PolicyValue(step + 1, False).pack()
                entry = MapEntry(policy_fd, key.pack(), value_size)
                yield str(target.identity), msgspec.json.encode(policy), entry, expected

        watcher = Watcher(resolved_kv)
        watch = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher.synced.wait(), 30)
        await propagate(resolved_kv, watcher, policy_steps(0, warm), "warm-up")
        timed = await propagate(resolved_kv, watcher, policy_steps(warm, args.updates), "policy")
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        baseline = [
            (
                MapEntry(
                    policy_fd,
                    PolicyKey(
                        KEY_BITS, BOGUS_ENDPOINT, INGRESS, POLICY_PEER, PROTO_TCP, 1024 + i
                    ).pack(),
                    value_size,
                ),
                PolicyValue(i + 1, False).pack(),
            )
            for i in range(args.updates)
        ]
        results += [direct_writes("policy", baseline), timed.acked, timed.watched, timed.mapped]
        await resolved_kv.delete(str(target.identity))
        print(f"  policy: p99 {timed.mapped.ms(0.99):.2f} ms", file=sys.stderr, flush=True)
        return results
    finally:
        os.close(ipcache_fd)
        os.close(policy_fd)
        await bus.close()


async def allow_client(cluster: Cluster, client: Pod, server: Pod) -> None:
    """Enforce ingress on the server pod with an allow for the client on both ports; returns
    once the agent has installed it."""
    bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
    fd = obj_get(cluster.pins / "policy")
    try:
        kv = await bus.kv(subjects.KV_RESOLVED)
        policy = ResolvedPolicy(
            identity=server.identity,
            revision=1,
            ingress_enforced=True,
            ingress=[
                PolicyEntry(peer=client.identity, protocol=PROTO_TCP, port=port, rule_id=1)
                for port in (RR_PORT, CONN_PORT)
            ],
            rules={1: "bench/allow-client[0]"},
        )
        await kv.put(str(server.identity), msgspec.json.encode(policy))
        key = PolicyKey(KEY_BITS, server.ifindex, INGRESS, client.identity, PROTO_TCP, CONN_PORT)
        expected = PolicyValue(1, False).pack()
        deadline = time.perf_counter() + STEP_TIMEOUT
        await asyncio.to_thread(wait_for_value, MapEntry(fd, key.pack(), 8), expected, deadline)
    finally:
        os.close(fd)
        await bus.close()


# --- 2. TCP with and without the programs ----------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _sockperf_value(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    if match is None:
        raise RuntimeError(f"sockperf output has no {pattern!r}:\n{output}")
    return float(match.group(1))


def sockperf_pp(cluster: Cluster, client: Pod, server: Pod, seconds: int) -> tuple[float, ...]:
    """(avg, p50, p99 latency in µs, round trips/s) of one ping-pong run."""
    command = cluster.exec_in(
        client, "sockperf", "pp", "--tcp", "-i", server.ip, "-p", str(RR_PORT), "-t", str(seconds)
    )
    result = subprocess.run(
        command, env=cluster.env(), capture_output=True, text=True, timeout=seconds + 30
    )
    output = _ANSI.sub("", result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"sockperf pp failed ({result.returncode}):\n{output}")
    valid = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec;.*ReceivedMessages=(\d+)", output)
    if valid is None:
        raise RuntimeError(f"sockperf output has no valid duration:\n{output}")
    return (
        _sockperf_value(output, r"avg-latency=([\d.]+)"),
        _sockperf_value(output, r"percentile 50\.000 =\s*([\d.]+)"),
        _sockperf_value(output, r"percentile 99\.000 =\s*([\d.]+)"),
        int(valid.group(2)) / float(valid.group(1)),
    )


def connection_rate(cluster: Cluster, client: Pod, server: Pod, seconds: int) -> tuple[float, int]:
    """(connections/s, failed attempts) of the client loop against the server pod."""
    command = cluster.exec_in(
        client,
        sys.executable,
        str(Path(__file__).resolve()),
        "--connect-loop",
        f"{server.ip}:{CONN_PORT}:{seconds}",
    )
    result = subprocess.run(
        command, env=cluster.env(), capture_output=True, text=True, timeout=seconds + 30
    )
    if result.returncode != 0:
        raise RuntimeError(f"connection loop failed:\n{result.stdout}\n{result.stderr}")
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    return counts["connections"] / counts["seconds"], int(counts["errors"])


def measure_tcp(cluster: Cluster, client: Pod, server: Pod, seconds: int) -> TcpRun:
    avg, p50, p99, rate = sockperf_pp(cluster, client, server, seconds)
    conns, errors = connection_rate(cluster, client, server, seconds)
    return TcpRun(avg, p50, p99, rate, conns, errors)


def attached(cluster: Cluster, pods: list[Pod]) -> bool:
    for pod in pods:
        if "from_container" not in cluster.tc("filter", "show", "dev", pod.ifname, "ingress"):
            return False
        if "to_container" not in cluster.tc("filter", "show", "dev", pod.ifname, "egress"):
            return False
    return True


def detach(cluster: Cluster, pods: list[Pod]) -> None:
    for pod in pods:
        for direction in ("ingress", "egress"):
            cluster.tc("filter", "del", "dev", pod.ifname, direction)
    if attached(cluster, pods):
        raise RuntimeError("the programs are still attached after tc filter del")


def reattach(cluster: Cluster, pods: list[Pod]) -> float:
    """SIGKILL the node agent; its successor attaches the programs again. Returns the seconds
    until both veths have both programs and the new agent answers on its socket."""
    old = cluster.agent_pid()
    if old is None:
        raise RuntimeError(f"no running agent for {cluster.node}")
    started = time.monotonic()
    os.kill(old, signal.SIGKILL)
    deadline = started + 60
    while time.monotonic() < deadline:
        pid = cluster.agent_pid()
        if pid is not None and pid != old and attached(cluster, pods):
            # the agent's own socket answers once its start-up (adoption) is through
            cluster.run("bpf", "endpoints", "-o", "json", timeout=10)
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError("the restarted agent did not re-attach the programs within 60s")


def start_servers(cluster: Cluster, server: Pod) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            cluster.exec_in(server, "sockperf", "sr", "--tcp", "-i", server.ip, "-p", str(RR_PORT)),
            env=cluster.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        ),
        subprocess.Popen(
            cluster.exec_in(
                server,
                sys.executable,
                str(Path(__file__).resolve()),
                "--accept-loop",
                f"{server.ip}:{CONN_PORT}",
            ),
            env=cluster.env(),
            stdout=subprocess.PIPE,
            text=True,
        ),
    ]
    assert procs[1].stdout is not None
    if procs[1].stdout.readline().strip() != "ready":
        raise RuntimeError("the accept loop did not start")
    return procs


def tcp_rounds(
    cluster: Cluster, client: Pod, server: Pod, args: argparse.Namespace
) -> tuple[list[TcpRun], list[TcpRun], list[float]]:
    """(with, without, re-attach seconds), alternating with/without each round."""
    pods = [client, server]
    with_runs: list[TcpRun] = []
    without_runs: list[TcpRun] = []
    restarts: list[float] = []
    servers = start_servers(cluster, server)
    try:
        # warm-up, and a check that the sockperf server is listening
        for attempt in range(20):
            try:
                sockperf_pp(cluster, client, server, 1)
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.25)
        for round_ in range(args.rounds):
            if round_:
                restarts.append(reattach(cluster, pods))
                time.sleep(0.5)  # let the new agent's start-up work settle
            with_runs.append(measure_tcp(cluster, client, server, args.seconds))
            detach(cluster, pods)
            without_runs.append(measure_tcp(cluster, client, server, args.seconds))
            print(
                f"  round {round_ + 1}: conn/s {with_runs[-1].conn_per_s:.0f} with, "
                f"{without_runs[-1].conn_per_s:.0f} without; RR avg "
                f"{with_runs[-1].rr_avg_us:.2f} / {without_runs[-1].rr_avg_us:.2f} µs",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    return with_runs, without_runs, restarts


# --- helpers run inside the pods -------------------------------------------------------------


def accept_loop(spec: str) -> None:
    """Accept, read a byte, answer a byte, close first (so the client keeps no TIME_WAIT)."""
    host, port = spec.rsplit(":", 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(4096)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            if conn.recv(16):
                conn.sendall(b"y")
        except OSError:
            pass
        finally:
            conn.close()


def connect_loop(spec: str) -> None:
    """Connect, send a byte, read until the server closes, close; as often as possible."""
    host, port, seconds = spec.rsplit(":", 2)
    address = (host, int(port))
    connections = errors = 0
    started = time.perf_counter()
    deadline = started + float(seconds)
    while time.perf_counter() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            sock.sendall(b"x")
            while sock.recv(16):
                pass
            connections += 1
        except OSError:
            errors += 1
        finally:
            sock.close()
    elapsed = time.perf_counter() - started
    print(json.dumps({"connections": connections, "errors": errors, "seconds": elapsed}))


# --- 3. ring buffer events/s (bench/flows.py) ------------------------------------------------


def flow_figures(args: argparse.Namespace) -> FlowFigures:
    if not FLOWS_BENCH.exists():
        return FlowFigures([], 0, note=f"skipped: {FLOWS_BENCH} does not exist")
    try:
        spec = importlib.util.spec_from_file_location("bench_flows", FLOWS_BENCH)
        assert spec is not None and spec.loader is not None
        flows: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(flows)
        options = argparse.Namespace(events=args.flow_events, ring_mib=8, chunk=16384)
        run: Callable[[argparse.Namespace], Coroutine[Any, Any, tuple[list[Any], list[Any]]]] = (
            flows.run
        )
        published, decoded = uvloop.run(run(options))
        rows = []
        for ours, baseline in (published, decoded):
            rows += [
                FlowRow(r.name, r.events, r.rate, r.rate / baseline.rate) for r in (ours, baseline)
            ]
        return FlowFigures(rows, float(flows.GOAL))
    except Exception as exc:  # another bench's interface: report, do not fail this one
        return FlowFigures([], 0, note=f"skipped: bench/flows.py failed: {exc!r}")


# --- report ----------------------------------------------------------------------------------


def report_kv(results: list[Latencies], updates: int) -> None:
    print(f"1. KV change -> BPF map entry, one change at a time ({updates} each)")
    print(
        f"{'path':46} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'vs direct p50':>14}"
    )
    base = results[0]
    for r in results:
        if "baseline" in r.name:
            base = r
        ratio = "-" if r is base else f"{r.ms(0.5) / base.ms(0.5):.0f}x"
        print(
            f"{r.name:46} {r.ms(0.5):8.3f} {r.ms(0.9):8.3f} {r.ms(0.99):8.3f} {r.ms(1.0):8.3f} "
            f"{ratio:>14}"
        )


def _median(runs: list[TcpRun], metric: str) -> float:
    return float(statistics.median(getattr(r, metric) for r in runs))


TCP_METRICS = (
    # (label, attribute, lower is better)
    ("RR latency avg µs (sockperf, half RTT)", "rr_avg_us", True),
    ("RR latency p50 µs", "rr_p50_us", True),
    ("RR latency p99 µs", "rr_p99_us", True),
    ("RR round trips/s", "rr_per_s", False),
    ("connections/s (connect, 1 B each way, close)", "conn_per_s", False),
)


def report_tcp(
    with_runs: list[TcpRun], without_runs: list[TcpRun], restarts: list[float], seconds: int
) -> list[tuple[str, float]]:
    """Prints the table; returns (metric, overhead) for the goal lines."""
    print(
        f"2. pod -> pod TCP on one node, programs attached vs not: median of {len(with_runs)} "
        f"alternating round(s) of {seconds}s each"
    )
    print(
        f"{'metric':46} {'with':>10} {'without':>10} {'with/without':>13} {'overhead':>9}"
        "   rounds (with | without)"
    )
    overheads = []
    for label, attr, lower_better in TCP_METRICS:
        w, wo = _median(with_runs, attr), _median(without_runs, attr)
        overhead = (w / wo if lower_better else wo / w) - 1
        overheads.append((label, overhead))
        per_round = " ".join(f"{getattr(r, attr):.4g}" for r in with_runs)
        per_round += " | " + " ".join(f"{getattr(r, attr):.4g}" for r in without_runs)
        print(f"{label:46} {w:10.2f} {wo:10.2f} {w / wo:12.3f}x {overhead:+8.1%}   {per_round}")
    errors = sum(r.conn_errors for r in with_runs + without_runs)
    if errors:
        print(f"(failed connection attempts over all runs: {errors})")
    if restarts:
        print(
            "(programs re-attached by killing the agent: "
            + ", ".join(f"{s:.1f}s" for s in restarts)
            + " until attached and the new agent answered)"
        )
    return overheads


def report_flows(figures: FlowFigures, events: int) -> None:
    print("3. ring buffer events decoded and published by one FlowPublisher (bench/flows.py)")
    if not figures.rows:
        print(figures.note)
        return
    print(f"{'path':46} {'events':>9} {'events/s':>10} {'vs bcc':>8}")
    for r in figures.rows:
        print(f"{r.name:46} {r.events:9d} {r.rate:10.0f} {r.vs_baseline:7.2f}x")


def report_goals(
    kv: list[Latencies], overheads: list[tuple[str, float]], figures: FlowFigures
) -> None:
    print()
    for r in kv:
        if r.name.endswith("map entry (agent)"):
            p99 = r.ms(0.99)
            verdict = "MET" if p99 <= GOAL_KV_P99_MS else "MISSED"
            what = r.name.split(":")[0]
            print(
                f"goal KV change -> map entry p99 <= {GOAL_KV_P99_MS:g} ms ({what}): "
                f"{p99:.2f} ms {verdict}"
            )
    for label, overhead in overheads:
        verdict = "MET" if overhead <= GOAL_TCP_OVERHEAD else "MISSED"
        name = label.split(" (")[0]
        print(f"goal overhead <= {GOAL_TCP_OVERHEAD:.0%} ({name}): {overhead:+.1%} {verdict}")
    if figures.rows:
        rate = figures.rows[0].rate
        verdict = "MET" if rate >= figures.goal else "MISSED"
        print(f"goal flow events/s >= {figures.goal:.0f} (published): {rate:.0f}/s {verdict}")
    print(
        f"(host: {os.cpu_count()} cores shared by nats-server, the agent, both pods and this "
        "process; the connection rate is bound by the Python client and server, which dilutes "
        "the datapath's share)"
    )


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    if shutil.which("sockperf") is None:
        sys.exit("sockperf is missing: apt-get install sockperf (scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        cluster = Cluster(Path(tmp) / "state")
        print(f"cluster {cluster.name}: up", file=sys.stderr, flush=True)
        try:
            cluster.up()
            target = cluster.create_pod("bench-pol")
            client = cluster.create_pod("bench-a")
            server = cluster.create_pod("bench-b")
            print("1. KV -> map latency", file=sys.stderr, flush=True)
            kv = uvloop.run(kv_latency(cluster, target, args))
            uvloop.run(allow_client(cluster, client, server))
            print("2. TCP with/without the programs", file=sys.stderr, flush=True)
            with_runs, without_runs, restarts = tcp_rounds(cluster, client, server, args)
        finally:
            print(f"cluster {cluster.name}: down", file=sys.stderr, flush=True)
            cluster.down()
    print("3. flow events/s", file=sys.stderr, flush=True)
    figures = flow_figures(args)
    print()
    report_kv(kv, args.updates)
    print()
    overheads = report_tcp(with_runs, without_runs, restarts, args.seconds)
    print()
    report_flows(figures, args.flow_events)
    report_goals(kv, overheads, figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--updates", type=int, help="KV changes timed per map (default 2000)")
    parser.add_argument("--rounds", type=int, help="with/without rounds (default 3)")
    parser.add_argument("--seconds", type=int, help="length of each TCP run (default 5)")
    parser.add_argument("--flow-events", type=int, help="events for bench/flows.py (default 1M)")
    parser.add_argument("--quick", action="store_true", help="small counts, 2 s runs")
    parser.add_argument("--accept-loop", metavar="IP:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--connect-loop", metavar="IP:PORT:SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accept_loop:
        accept_loop(args.accept_loop)
        return
    if args.connect_loop:
        connect_loop(args.connect_loop)
        return
    defaults = (200, 2, 2, 100_000) if args.quick else (2000, 3, 5, 1_000_000)
    for name, default in zip(
        ("updates", "rounds", "seconds", "flow_events"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if os.geteuid() != 0:
        sys.exit("bench/datapath.py creates namespaces and reads BPF maps: run it as root")
    sys.setswitchinterval(0.0005)  # the map-polling thread must not wait 5 ms for the GIL
    run(args)


if __name__ == "__main__":
    main()
