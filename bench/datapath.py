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
   against a Python accept loop on 16 ports (so that every connection is new to conntrack).
   Client and server are pinned to one CPU, so both figures are the CPU cost of a round trip or
   a connection. The server pod enforces ingress policy (an allow for the client), so "with" is
   the whole path: conntrack, policy lookup, flow events for each new connection. Before the
   rounds, a profile: the programs' own run time (the kernel's BPF run-time stats, switched on
   for those runs only), once more for connections with the agent SIGSTOPped, which shows what
   waking the ring buffer's reader costs.
3. Ring buffer events/s decoded and published (bench/flows.py, run from here when present).

    sudo .venv/bin/python bench/datapath.py [--updates 2000] [--rounds 3] [--seconds 5] [--quick]

Needs root (namespaces, BPF), sockperf (Debian package ``sockperf``) and taskset (util-linux).
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
import selectors
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
from services.datapath.ringbuf import bpf
from shared import subjects
from shared.bus import Bus
from shared.messages import IPCacheEntry, PodCIDR, PolicyEntry, ResolvedPolicy
from shared.policy_map import (
    INGRESS,
    KEY_BITS,
    PROTO_TCP,
    PolicyKey,
    PolicyValue,
)

GOAL_KV_P99_MS = 5.0
GOAL_TCP_OVERHEAD = 0.10
BENCH_DIR = Path(__file__).resolve().parent
FLOWS_BENCH = BENCH_DIR / "flows.py"
BPFFS = Path("/sys/fs/bpf")

RR_PORT = 5001
# the connection loop spreads over this many server ports, so that no 4-tuple comes back while
# its conntrack entry (kept 10 s after close) lives: every connection is new to the datapath
CONN_PORT = 5002
CONN_PORTS = 16
MAX_UPDATES = 20 * 256  # fresh addresses: 10.X.200.0 on (timed), 10.X.100.0 on (baseline)
POLL_SLEEP = 50e-6  # between map lookups while waiting for the agent
STEP_TIMEOUT = 5.0  # one change not in the map by then is an error, not a slow sample
# ipcache identities of the fresh addresses: a pod's range (all a node may name), above every
# identity the identity service hands out
FIRST_ID = 1_000_000
POLICY_PEER = 70_000  # the peer of the latency policy's allow entry (nobody holds it)
BOGUS_ENDPOINT = 0xFFFF_FF00  # the direct-write baseline's policy keys match no endpoint

# --- bpf(2) on pinned maps -------------------------------------------------------------------

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


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


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info up to run_cnt (offsets from linux/bpf.h)
    _fields_ = [
        ("head", ctypes.c_uint8 * 192),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


def prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program; counted only while stats are enabled."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    try:
        info = _ProgInfo()
        bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
        return int(info.run_time_ns), int(info.run_cnt)
    finally:
        os.close(fd)


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """The kernel counts programs' run time while the fd BPF_ENABLE_STATS gives is open (it
    costs two clock reads per run: never on during a measured run)."""
    fd = bpf(BPF_ENABLE_STATS, _StatsAttr(BPF_STATS_RUN_TIME))
    try:
        yield
    finally:
        os.close(fd)


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
    agent_cpu_ms: float  # CPU time of the node agent and of nats-server during both runs
    nats_cpu_ms: float


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


# the node the ipcache steps pretend to come from (no such node runs)
OTHER_NODE = "bench-peer"


class Cluster:
    """A one-node ``membrane up`` in its own state directory, driven through the CLI."""

    NODES = 1

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
            str(self.NODES),
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

    def pod_ip(self, name: str) -> str:
        pods = json.loads(self.run("pod", "list", "-o", "json").stdout)["items"]
        return str(next(p["ip"] for p in pods if p["name"] == name))

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
        pods = json.loads(self.run("pod", "list", "-o", "json").stdout)["items"]
        (found,) = [p for p in pods if p["name"] == name]
        return Pod(
            name=name,
            ip=found["ip"],
            identity=int(found["identity"]),
            ifindex=int(found["host_ifindex"]),
            ifname=found["host_ifname"],
        )

    def exec_in(self, pod: Pod, *command: str, cpu: int = -1) -> list[str]:
        pin = ["taskset", "-c", str(cpu)] if cpu >= 0 else []
        return self.command("pod", "exec", pod.name, "--", *pin, *command)

    def tc(self, *args: str) -> str:
        result = subprocess.run(
            ["nsenter", f"--net={self.node_netns}", "tc", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def process_pid(self, name: str) -> int | None:
        for proc in StateDir(self.state).processes():
            if proc.name == name and proc.running:
                return proc.pid
        return None

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
    """X for 172.31.X.0/24, 10.X.0.0/16 and 10.(X+1).0.0/16, none routed (in use) yet. From
    200..248, above the test suite's 100..198 (tests/e2e/cluster.py), so a bench run while the
    suite runs never takes a range a test cluster is about to."""
    routes = subprocess.run(["ip", "-o", "route"], capture_output=True, text=True).stdout
    for _ in range(50):
        octet = 200 + 2 * secrets.randbelow(25)
        taken = (f"172.31.{octet}.", f"10.{octet}.", f"10.{octet + 1}.")
        if not any(prefix in routes for prefix in taken):
            return octet
    raise RuntimeError("no free 172.31.X.0/24 in 200..248")


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
        # the agents believe a node's entries only inside the pod CIDR the identity service
        # gave it (shared/ipcache_guard.py): the bench, as admin, gives its peer 10.X.192.0/18
        pod_cidrs = await bus.kv(subjects.KV_POD_CIDRS)
        peer_cidr = PodCIDR(node=OTHER_NODE, cidr=f"10.{cluster.octet}.192.0/18")
        await pod_cidrs.put(subjects.pod_cidr_key(OTHER_NODE), msgspec.json.encode(peer_cidr))

        def ipcache_steps(addrs: list[IPv4Address]) -> Iterator[tuple[str, bytes, MapEntry, bytes]]:
            for ip in addrs:
                identity = FIRST_ID + int(ip) % 65536
                # as a node of the cluster would write them, inside its pod CIDR
                payload = msgspec.json.encode(
                    IPCacheEntry(cidr=f"{ip}/32", identity=identity, node=OTHER_NODE)
                )
                key = pack_ipcache_key(IPv4Network(f"{ip}/32"))
                expected = IPCacheValue(identity).pack()
                yield (
                    subjects.ipcache_key(ip, OTHER_NODE),
                    payload,
                    MapEntry(ipcache_fd, key, value_size),
                    expected,
                )

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
            for ip in fresh_addresses(cluster.octet, 100, args.updates)
        ]
        results += [direct_writes("ipcache", baseline), timed.acked, timed.watched, timed.mapped]
        # the fresh addresses go again, so that the TCP runs see the usual small ipcache
        await asyncio.gather(
            *(ipcache_kv.delete(subjects.ipcache_key(ip, OTHER_NODE)) for ip in addresses)
        )
        await pod_cidrs.delete(subjects.pod_cidr_key(OTHER_NODE))
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
        # what the policy service writes when no policy selects an identity (a deleted entry
        # would leave the pod pending: dropping)
        unselected = ResolvedPolicy(identity=target.identity, revision=0)
        await resolved_kv.put(str(target.identity), msgspec.json.encode(unselected))
        print(f"  policy: p99 {timed.mapped.ms(0.99):.2f} ms", file=sys.stderr, flush=True)
        return results
    finally:
        os.close(ipcache_fd)
        os.close(policy_fd)
        await bus.close()


async def allow_client(cluster: Cluster, client: Pod, server: Pod) -> None:
    """Enforce ingress on the server pod with an allow for the client on the bench's ports;
    returns once the agent has installed it."""
    bus = await Bus.connect(cluster.nats_url, "bench", retry_for=10)
    fd = obj_get(cluster.pins / "policy")
    try:
        kv = await bus.kv(subjects.KV_RESOLVED)
        policy = ResolvedPolicy(
            identity=server.identity,
            revision=1,
            ingress_enforced=True,
            ingress=[
                PolicyEntry(
                    peer=client.identity,
                    protocol=PROTO_TCP,
                    port=RR_PORT,
                    end_port=CONN_PORT + CONN_PORTS - 1,
                    rule_id=1,
                )
            ],
            rules={1: "bench/allow-client[0]"},
        )
        await kv.put(str(server.identity), msgspec.json.encode(policy))
        # a port of the range (its key is a /127 prefix: the lookup finds it all the same)
        last = CONN_PORT + CONN_PORTS - 1
        key = PolicyKey(KEY_BITS, server.ifindex, INGRESS, client.identity, PROTO_TCP, last)
        expected = PolicyValue(1, False).pack()
        deadline = time.perf_counter() + STEP_TIMEOUT
        await asyncio.to_thread(
            wait_for_value, MapEntry(fd, key.pack(), len(expected)), expected, deadline
        )
    finally:
        os.close(fd)
        await bus.close()


# --- 2. TCP with and without the programs ----------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROG_ID = re.compile(r"\bid (\d+)")


def _sockperf_value(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    if match is None:
        raise RuntimeError(f"sockperf output has no {pattern!r}:\n{output}")
    return float(match.group(1))


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ConnProfile:
    """The programs over one connection-loop run."""

    ns_per_run: dict[str, float]  # program -> ns per run
    ns_per_connection: float  # all programs
    runs_per_connection: float
    rate: float  # connections/s of this run (stats on)


@dataclass
class Profile:
    """BPF run time of each program over one RR run and two connection-loop runs: one as
    usual, one with the agent stopped, so that the ring buffer never wakes a reader."""

    rr_ns: dict[str, float]  # program -> ns per run, RR
    conn: ConnProfile
    conn_agent_stopped: ConnProfile

    @property
    def rr_ns_per_exchange(self) -> float:
        # each program runs twice per round trip: on the sender's veth, on the receiver's
        return 2 * sum(self.rr_ns.values())


class TcpBench:
    """The client and server pods, their servers, and one measurement of the current state.

    Client and server processes run pinned to one CPU (``--cpu``): a ping-pong whose two ends
    sit on different CPUs of this VM measures cross-CPU wake-ups (tens of µs, bimodal), not the
    datapath; on one CPU both metrics are the CPU cost of a round trip or a connection.
    """

    def __init__(self, cluster: Cluster, client: Pod, server: Pod, args: argparse.Namespace):
        self.cluster = cluster
        self.client = client
        self.server = server
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
        return result.stdout if "--connect-loop" in command else output

    def sockperf_pp(self, seconds: int) -> tuple[float, float, float, float]:
        """(avg, p50, p99 latency in µs, round trips/s) of one ping-pong run."""
        output = self._run(
            self.cluster.exec_in(
                self.client,
                *("sockperf", "pp", "--tcp", "-i", self.server.ip, "-p", str(RR_PORT)),
                *("-t", str(seconds)),
                cpu=self.cpu,
            ),
            seconds,
        )
        valid = re.search(
            r"\[Valid Duration\] RunTime=([\d.]+) sec;.*ReceivedMessages=(\d+)", output
        )
        if valid is None:
            raise RuntimeError(f"sockperf output has no valid duration:\n{output}")
        return (
            _sockperf_value(output, r"avg-latency=([\d.]+)"),
            _sockperf_value(output, r"percentile 50\.000 =\s*([\d.]+)"),
            _sockperf_value(output, r"percentile 99\.000 =\s*([\d.]+)"),
            int(valid.group(2)) / float(valid.group(1)),
        )

    def connection_rate(self, seconds: int) -> tuple[int, float, int]:
        """(connections, seconds, failed attempts) of the client loop."""
        output = self._run(
            self.cluster.exec_in(
                self.client,
                sys.executable,
                str(Path(__file__).resolve()),
                "--connect-loop",
                f"{self.server.ip}:{CONN_PORT}:{CONN_PORTS}:{seconds}",
                cpu=self.cpu,
            ),
            seconds,
        )
        counts = json.loads(output.strip().splitlines()[-1])
        return int(counts["connections"]), float(counts["seconds"]), int(counts["errors"])

    def measure(self) -> TcpRun:
        agent, nats = self.cluster.agent_pid(), self.cluster.process_pid("nats-server")
        cpu_before = cpu_seconds(agent), cpu_seconds(nats)
        avg, p50, p99, rate = self.sockperf_pp(self.seconds)
        connections, elapsed, errors = self.connection_rate(self.seconds)
        return TcpRun(
            avg,
            p50,
            p99,
            rate,
            connections / elapsed,
            errors,
            (cpu_seconds(agent) - cpu_before[0]) * 1000,
            (cpu_seconds(nats) - cpu_before[1]) * 1000,
        )

    def profile(self, seconds: int) -> Profile:
        """Where the "with" time goes: each program's run time, counted by the kernel over one
        RR run and one connection-loop run (separate from the measured runs)."""
        ids: dict[str, int] = {}
        for direction in ("ingress", "egress"):
            shown = self.cluster.tc("filter", "show", "dev", self.server.ifname, direction)
            match = _PROG_ID.search(shown)
            if match is None:
                raise RuntimeError(f"no program id in tc filter show:\n{shown}")
            ids["from_container" if direction == "ingress" else "to_container"] = int(
                match.group(1)
            )

        def snapshot() -> dict[str, tuple[int, int]]:
            return {name: prog_stats(prog_id) for name, prog_id in ids.items()}

        def per_run(
            before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
        ) -> tuple[dict[str, float], int, int]:
            ns = {n: (after[n][0] - before[n][0]) / max(1, after[n][1] - before[n][1]) for n in ids}
            total_ns = sum(after[n][0] - before[n][0] for n in ids)
            runs = sum(after[n][1] - before[n][1] for n in ids)
            return ns, total_ns, runs

        def connection_run() -> ConnProfile:
            before = snapshot()
            connections, elapsed, _ = self.connection_rate(seconds)
            ns, total_ns, runs = per_run(before, snapshot())
            per = max(1, connections)
            return ConnProfile(ns, total_ns / per, runs / per, connections / elapsed)

        with bpf_run_time_stats():
            before = snapshot()
            self.sockperf_pp(seconds)
            rr_ns, _, _ = per_run(before, snapshot())
            conn = connection_run()
            # A stopped agent never catches up with the ring buffer, and the kernel wakes its
            # reader only when a record lands where the reader stands (bpf_ringbuf_commit):
            # the difference is the cost of those wake-ups. The ring (8 MiB by default) holds
            # the events of these few seconds; the agent reads them when it goes on.
            agent = self.cluster.agent_pid()
            if agent is None:
                raise RuntimeError(f"no running agent for {self.cluster.node}")
            os.kill(agent, signal.SIGSTOP)
            try:
                stopped = connection_run()
            finally:
                os.kill(agent, signal.SIGCONT)
        return Profile(rr_ns, conn, stopped)

    def start_servers(self) -> None:
        self.servers = [
            subprocess.Popen(
                self.cluster.exec_in(
                    self.server,
                    *("sockperf", "sr", "--tcp", "-i", self.server.ip, "-p", str(RR_PORT)),
                    cpu=self.cpu,
                ),
                env=self.cluster.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            ),
            subprocess.Popen(
                self.cluster.exec_in(
                    self.server,
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--accept-loop",
                    f"{self.server.ip}:{CONN_PORT}:{CONN_PORTS}",
                    cpu=self.cpu,
                ),
                env=self.cluster.env(),
                stdout=subprocess.PIPE,
                text=True,
            ),
        ]
        out = self.servers[1].stdout
        if out is None or out.readline().strip() != "ready":
            raise RuntimeError("the accept loop did not start")
        # sockperf's server: ready once a short ping-pong goes through (also the warm-up)
        for attempt in range(20):
            try:
                self.sockperf_pp(1)
                return
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def stop_servers(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()


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


@dataclass
class TcpResults:
    with_runs: list[TcpRun]
    without_runs: list[TcpRun]
    restarts: list[float]
    profile: Profile | None


def tcp_rounds(bench: TcpBench, args: argparse.Namespace) -> TcpResults:
    """Alternating with/without each round; the programs' profile first (they are attached)."""
    pods = [bench.client, bench.server]
    results = TcpResults([], [], [], None)
    bench.start_servers()
    try:
        if args.profile:
            results.profile = bench.profile(max(1, args.seconds // 2))
            time.sleep(1.0)  # the agent catches up with the events of the stopped run
        for round_ in range(args.rounds):
            if round_:
                results.restarts.append(reattach(bench.cluster, pods))
                time.sleep(0.5)  # let the new agent's start-up work settle
            results.with_runs.append(bench.measure())
            detach(bench.cluster, pods)
            results.without_runs.append(bench.measure())
            w, wo = results.with_runs[-1], results.without_runs[-1]
            print(
                f"  round {round_ + 1}: RR avg {w.rr_avg_us:.2f} / {wo.rr_avg_us:.2f} µs, "
                f"conn/s {w.conn_per_s:.0f} / {wo.conn_per_s:.0f} (with / without)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        bench.stop_servers()
    return results


# --- helpers run inside the pods -------------------------------------------------------------


def accept_loop(spec: str) -> None:
    """Accept on each port, read a byte, answer a byte, close first (so that the client keeps
    no TIME_WAIT and never runs out of ports)."""
    host, first, count = spec.rsplit(":", 2)
    selector = selectors.DefaultSelector()
    listeners: dict[int, socket.socket] = {}
    for port in range(int(first), int(first) + int(count)):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(4096)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ)
        listeners[listener.fileno()] = listener
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            while True:
                try:
                    conn, _ = listeners[key.fd].accept()
                except BlockingIOError:
                    break
                conn.setblocking(True)
                try:
                    if conn.recv(16):
                        conn.sendall(b"y")
                except OSError:
                    pass
                finally:
                    conn.close()


def connect_loop(spec: str) -> None:
    """Connect, send a byte, read until the server closes, close; as often as possible, over
    the server's ports in turn."""
    host, first, count, seconds = spec.rsplit(":", 3)
    addresses = [(host, port) for port in range(int(first), int(first) + int(count))]
    connections = errors = 0
    started = time.perf_counter()
    deadline = started + float(seconds)
    while time.perf_counter() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(addresses[(connections + errors) % len(addresses)])
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
        sys.modules[spec.name] = flows  # its dataclasses look their module up there
        spec.loader.exec_module(flows)
        options = argparse.Namespace(events=args.flow_events, ring_mib=8, chunk=16384)
        run: Callable[[argparse.Namespace], Coroutine[Any, Any, tuple[list[Any], list[Any]]]] = (
            flows.run
        )
        published, decoded = uvloop.run(run(options))
        rows = []
        for results in (published, decoded):  # ours first, ..., the bcc baseline last
            baseline = results[-1]
            rows += [FlowRow(r.name, r.events, r.rate, r.rate / baseline.rate) for r in results]
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
    ("agent CPU ms per measurement (other CPU)", "agent_cpu_ms", True),
    ("nats-server CPU ms per measurement", "nats_cpu_ms", True),
)


def report_tcp(results: TcpResults, seconds: int, cpu: int) -> list[tuple[str, float]]:
    """Prints the table and the profile; returns (metric, overhead) for the goal lines."""
    with_runs, without_runs = results.with_runs, results.without_runs
    where = f"client and server pinned to CPU {cpu}" if cpu >= 0 else "not pinned"
    print(
        f"2. pod -> pod TCP on one node, programs attached vs not ({where}): median of "
        f"{len(with_runs)} alternating round(s) of {seconds}s each"
    )
    print(
        f"{'metric':46} {'with':>10} {'without':>10} {'with/without':>13} {'overhead':>9}"
        "   rounds (with | without)"
    )
    overheads = []
    for label, attr, lower_better in TCP_METRICS:
        w, wo = _median(with_runs, attr), _median(without_runs, attr)
        overhead = (w / wo if lower_better else wo / w) - 1
        per_round = " ".join(f"{getattr(r, attr):.4g}" for r in with_runs)
        per_round += " | " + " ".join(f"{getattr(r, attr):.4g}" for r in without_runs)
        if attr.endswith("cpu_ms"):
            print(f"{label:46} {w:10.0f} {wo:10.0f} {'':>13} {'':>9}   {per_round}")
            continue
        overheads.append((label, overhead))
        print(f"{label:46} {w:10.2f} {wo:10.2f} {w / wo:12.3f}x {overhead:+8.1%}   {per_round}")
    errors = sum(r.conn_errors for r in with_runs + without_runs)
    if errors:
        print(f"(failed connection attempts over all runs: {errors})")
    if results.restarts:
        print(
            "(programs re-attached by killing the agent: "
            + ", ".join(f"{s:.1f}s" for s in results.restarts)
            + " until attached and the new agent answered)"
        )
    profile = results.profile
    if profile is not None:
        rtt_delta = 2000 * (_median(with_runs, "rr_avg_us") - _median(without_runs, "rr_avg_us"))
        conn_delta = 1e9 / _median(with_runs, "conn_per_s") - 1e9 / _median(
            without_runs, "conn_per_s"
        )
        print("where the time goes (kernel BPF run-time stats, separate runs with stats on):")
        print(
            "  RR: "
            + ", ".join(f"{n} {ns:.0f} ns/run" for n, ns in profile.rr_ns.items())
            + f" -> {profile.rr_ns_per_exchange:.0f} ns of programs per round trip (4 runs); "
            f"measured with - without: {rtt_delta:.0f} ns per round trip"
        )
        for what, conn in (
            ("agent running", profile.conn),
            ("agent SIGSTOPped, no ring buffer wake-ups", profile.conn_agent_stopped),
        ):
            print(
                f"  connections, {what}: "
                + ", ".join(f"{n} {ns:.0f} ns/run" for n, ns in conn.ns_per_run.items())
                + f" -> {conn.ns_per_connection:.0f} ns of programs per connection "
                f"({conn.runs_per_connection:.1f} runs), {conn.rate:.0f} connections/s"
            )
        print(f"  connections: measured with - without: {conn_delta:.0f} ns per connection")
    return overheads


def report_flows(figures: FlowFigures) -> None:
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
        "the datapath's share of each connection)"
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
            tcp = tcp_rounds(TcpBench(cluster, client, server, args), args)
        finally:
            print(f"cluster {cluster.name}: down", file=sys.stderr, flush=True)
            cluster.down()
    print("3. flow events/s", file=sys.stderr, flush=True)
    figures = flow_figures(args)
    print()
    report_kv(kv, args.updates)
    print()
    overheads = report_tcp(tcp, args.seconds, args.cpu)
    print()
    report_flows(figures)
    report_goals(kv, overheads, figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--updates", type=int, help="KV changes timed per map (default 2000)")
    parser.add_argument("--rounds", type=int, help="with/without rounds (default 3)")
    parser.add_argument("--seconds", type=int, help="length of each TCP run (default 5)")
    parser.add_argument("--flow-events", type=int, help="events for bench/flows.py (default 1M)")
    parser.add_argument(
        "--cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="CPU for the TCP client and server (default: the last; -1: not pinned)",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the BPF run-time profile of the programs",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, 2 s runs")
    parser.add_argument("--accept-loop", metavar="IP:PORT:COUNT", help=argparse.SUPPRESS)
    parser.add_argument("--connect-loop", metavar="IP:PORT:COUNT:SECONDS", help=argparse.SUPPRESS)
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
    if not 0 < args.updates <= MAX_UPDATES:
        parser.error(f"--updates must be 1..{MAX_UPDATES} (the fresh addresses' range)")
    if os.geteuid() != 0:
        sys.exit("bench/datapath.py creates namespaces and reads BPF maps: run it as root")
    sys.setswitchinterval(0.0005)  # the map-polling thread must not wait 5 ms for the GIL
    run(args)


if __name__ == "__main__":
    main()
