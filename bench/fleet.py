"""A fleet by simulation: one real agent and up to 1,000 simulated ones on one NATS.

    sudo .venv/bin/python bench/fleet.py [--nodes 100,300,1000] [--endpoints 20]
        [--per-process 50]

Starts a one-node cluster (``membrane up``: the real agent, identity, policy, lb services on
one nats-server) with a real pod, then simulated agents in worker processes (``--per-process``
nodes each, one asyncio loop): each simulated node connects to NATS on its own connection,
registers itself in ``nodes`` and heartbeats on its heartbeat subject every 5 s, publishes
``--endpoints`` pod addresses in ``ipcache``, and follows ``ipcache``, ``resolved``,
``services``, ``nodes`` and ``liveness``
with ``shared/kv_watch.follow`` as the agent does (snapshot, then changes), without BPF: an
event is counted and, for the keys being measured, its arrival time noted. Keys are spelled by
``shared/subjects.py``. At each fleet size (the nodes added to those already up) it measures,
from the write to the moment each node has seen it:

- a new pod's ``ipcache`` entry (written as an agent writes it);
- a policy change: a CiliumNetworkPolicy selecting the real pod applied through the policy
  service, to the pod identity's ``resolved`` entry;
- a service change: a Service and its EndpointSlice applied through the lb service, to its
  ``services`` record;

then p50/p99 over the nodes, nats-server's resident memory and CPU seconds, and the time a
restarted agent (one simulated node's five watches started again) takes to resync.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats.errors
import uvloop
from nats.js.errors import KeyWrongLastSequenceError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.datapath import Cluster
from shared import apply, kv_watch, services_bucket, subjects
from shared.bus import Bus, KVEvent
from shared.messages import REREGISTER_EVERY, IPCacheEntry, Node, NodeHeartbeat

WATCHED = (
    subjects.KV_IPCACHE,
    subjects.KV_RESOLVED,
    subjects.KV_SERVICES,
    subjects.KV_NODES,
    subjects.KV_LIVENESS,
)
HEARTBEAT_S = 5.0
GOAL_P99_S = 1.0
PROPAGATION_TIMEOUT_S = 60.0
ANSWER = "fleet-answer "
ANSWER_TIMEOUT_S = 600.0  # a worker starved of CPU (load 30) took longer than 120 s to answer


def node_name(i: int) -> str:
    return f"fleet-{i:04d}"


def pod_address(node: int, pod: int) -> IPv4Address:
    """Addresses of simulated pods: 10.128.0.0/9, 128 per node at most."""
    return IPv4Address("10.128.0.0") + node * 128 + pod


# --- the simulated agents (worker processes) ---------------------------------------------------

START_TIMEOUT_S = 120.0  # a simulated agent's start (connect, register, its ipcache entries)


class StartHung(Exception):
    pass


async def bounded(work: Any, seconds: float) -> Any:
    """``work``'s result, or StartHung after ``seconds``: the work is cancelled but not waited
    for (a cancellation Python 3.11's wait_for swallowed would make waiting hang too)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        raise StartHung
    return task.result()


class SimNode:
    def __init__(self, index: int, url: str, endpoints: int) -> None:
        self.index = index
        self.name = node_name(index)
        self.url = url
        self.endpoints = endpoints
        self.events = 0
        self.synced: set[str] = set()
        self.seen: dict[tuple[str, str], float] = {}
        self.watching: set[tuple[str, str]] = set()
        self.follows: list[asyncio.Task[None]] = []
        self.bus: Bus | None = None
        self.kvs: dict[str, Any] = {}
        self.beats = 0
        self.timeouts = 0  # KV writes whose acknowledgement did not come in time (retried)
        self.watch_restarts: collections.Counter[str] = collections.Counter()
        self.stage = "not started"  # where start() is, for a start that hangs

    def record(self) -> Node:
        ip = IPv4Address("172.30.0.0") + self.index + 1
        cidr = pod_address(self.index, 0)
        return Node(
            name=self.name,
            underlay_ip=str(ip),
            pod_cidr=f"{cidr}/25",
            router_ip=str(cidr),
            heartbeat=time.time(),
            version="fleet",
            routing="tunnel",
        )

    async def start(self) -> None:
        self.stage = "connect"
        self.bus = await Bus.connect(self.url, self.name, retry_for=30)
        self.stage = "bind buckets"
        for bucket in WATCHED:
            self.kvs[bucket] = await self.bus.kv(bucket)
        record = self.record()
        self.stage = "register"
        await self.put(subjects.KV_NODES, self.name, msgspec.json.encode(record))
        await self.heartbeat()
        self.stage = "ipcache entries"
        for pod in range(1, self.endpoints + 1):
            ip = pod_address(self.index, pod)
            entry = IPCacheEntry(
                cidr=f"{ip}/32", identity=70000 + pod, node=self.name, host_ip=record.underlay_ip
            )
            await self.put(
                subjects.KV_IPCACHE, subjects.ipcache_key(ip, self.name), msgspec.json.encode(entry)
            )
        self.follow_all()

    async def put(self, bucket: str, key: str, value: bytes) -> None:
        """A KV write, retried while its acknowledgement times out (counted)."""
        while True:
            try:
                await self.kvs[bucket].put(key, value)
                return
            except nats.errors.TimeoutError:
                self.timeouts += 1

    def follow_all(self) -> None:
        self.synced = set()
        self.follows = [asyncio.create_task(self.follow(b)) for b in WATCHED]

    async def follow(self, bucket: str) -> None:
        """A watch started again when it fails, after 1 s doubling to 30 s, as the agent's
        TaskGroup does (shared/runtime.py); counted by cause. Before, a watch whose start
        failed (a consumer create timing out under load) ended its task unseen, and its node
        never synced."""
        delay = 1.0
        while True:
            try:
                await kv_watch.follow(
                    self.kvs[bucket], self.handler(bucket), self.on_synced(bucket)
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.watch_restarts[f"{bucket}: {type(exc).__name__}: {exc}"[:120]] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def handler(self, bucket: str) -> Any:
        def handle(event: KVEvent) -> None:
            self.events += 1
            key = (bucket, event.key)
            if key in self.watching and key not in self.seen:
                self.seen[key] = time.time()

        return handle

    def on_synced(self, bucket: str) -> Any:
        def synced() -> None:
            self.synced.add(bucket)

        return synced

    async def heartbeat(self) -> None:
        """As the agent's (services/datapath/service.py _heartbeat): to the failure detector;
        every REREGISTER_EVERY-th beat the ``nodes`` entry is created if it is missing."""
        assert self.bus is not None
        await self.bus.publish(
            subjects.node_heartbeat(self.name), NodeHeartbeat(node=self.name, time=time.time())
        )
        self.beats += 1
        if self.beats % REREGISTER_EVERY == 0:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.kvs[subjects.KV_NODES].create(
                    self.name, msgspec.json.encode(self.record())
                )

    async def resync(self) -> float:
        """The five watches started again, as a restarted agent does: seconds to synced."""
        for task in self.follows:
            task.cancel()
        await asyncio.gather(*self.follows, return_exceptions=True)
        started = time.perf_counter()
        self.follow_all()
        while len(self.synced) < len(WATCHED):  # noqa: ASYNC110 (five callbacks set it)
            await asyncio.sleep(0.005)
        return time.perf_counter() - started


async def worker(first: int, count: int, url: str, endpoints: int) -> None:
    nodes = [SimNode(i, url, endpoints) for i in range(first, first + count)]

    restarts: collections.Counter[str] = collections.Counter()  # why a node's start failed

    async def start_node(n: SimNode) -> None:
        """As the supervisor restarts an agent whose start failed (a second later). Before, the
        first failure ended the worker's start task, unseen: its later nodes never joined; and
        a start that hung (no timeout at some await) held its worker's later nodes forever."""
        while True:
            try:
                await bounded(n.start(), START_TIMEOUT_S)
                return
            except StartHung:
                restarts[f"start hung {START_TIMEOUT_S:.0f} s at {n.stage}"] += 1
            except Exception as exc:  # any cause: counted by type, then started again
                restarts[f"{type(exc).__name__}: {exc}"[:120]] += 1
            for task in n.follows:  # the failed start's watches and connection go
                task.cancel()
            if n.bus is not None:
                with contextlib.suppress(Exception):
                    await bounded(n.bus.close(), 10.0)
            n.bus, n.follows = None, []
            await asyncio.sleep(1.0)

    async def start() -> None:
        for chunk in range(0, count, 10):  # connect in steps: NATS's accept queue is finite
            await asyncio.gather(*(start_node(n) for n in nodes[chunk : chunk + 10]))

    async def heartbeats() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for n in nodes:
                if n.follows:  # started (it beat once then)
                    with contextlib.suppress(Exception):
                        await n.heartbeat()

    # the nodes start while the driver's questions are answered: a slow join is measured,
    # not a silent worker
    starting = asyncio.create_task(start())
    beat = asyncio.create_task(heartbeats())
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := (await reader.readline()).decode().split():
        command, *rest = line
        out: Any = None
        if command == "synced":
            out = sum(1 for n in nodes if len(n.synced) == len(WATCHED))
        elif command == "watch":
            for n in nodes:  # from now: a node that joined since had it in its snapshot
                n.watching.add((rest[0], rest[1]))
                n.seen.pop((rest[0], rest[1]), None)
            out = "ok"
        elif command == "seen":
            out = [n.seen.get((rest[0], rest[1])) for n in nodes]
        elif command == "events":
            watch_restarts: collections.Counter[str] = collections.Counter()
            for n in nodes:
                watch_restarts.update(n.watch_restarts)
            out = [
                sum(n.events for n in nodes),
                sum(n.timeouts for n in nodes),
                dict(restarts),
                dict(watch_restarts),
            ]
        elif command == "resync":
            out = await nodes[0].resync()
        print(ANSWER + json.dumps(out), flush=True)  # the services' logs may share stdout
    beat.cancel()
    starting.cancel()


# --- the driver ------------------------------------------------------------------------------


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, *words: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((" ".join(words) + "\n").encode())
        await self.proc.stdin.drain()
        while True:
            answer = await asyncio.wait_for(self.proc.stdout.readline(), ANSWER_TIMEOUT_S)
            if not answer:
                raise RuntimeError(f"a worker process ended ({self.proc.returncode}); see stderr")
            if answer.startswith(ANSWER.encode()):
                return json.loads(answer[len(ANSWER) :])
            sys.stderr.write(answer.decode(errors="replace"))


async def ask_all(workers: list[Worker], *words: str) -> list[Any]:
    return list(await asyncio.gather(*(w.ask(*words) for w in workers)))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def nats_usage(pid: int) -> tuple[float, float]:
    """(resident MB, CPU seconds) of nats-server."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, cpu_seconds(pid)


def nats_pid(url: str) -> int:
    port = str(urlsplit(url).port)  # the URL may carry TLS options (?ca=...)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "nats-server":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if port in cmdline:
                    return int(entry.name)
                for conf in cmdline.split()[1:]:  # the port may be in its configuration file
                    with contextlib.suppress(OSError):
                        if f":{port}" in Path(conf).read_text():
                            return int(entry.name)
    raise RuntimeError(f"no nats-server on port {port}")


async def propagation(
    workers: list[Worker], bucket: str, key: str, change: Any, total: int
) -> tuple[list[float], int]:
    """Seconds from ``change()`` to each node's first event of ``key``; nodes that never saw it."""
    await ask_all(workers, "watch", bucket, key)
    started = time.time()
    await change()
    print(f"    {bucket}: written in {time.time() - started:.2f} s", flush=True)
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while True:
        seen = [t for answer in await ask_all(workers, "seen", bucket, key) for t in answer]
        arrived = [t - started for t in seen if t is not None]
        if len(arrived) == total or time.monotonic() > deadline:
            return arrived, total - len(arrived)
        await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone (a service restarted): its CPU is not counted
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_processes(nats: int) -> dict[str, int]:
    """The one-node cluster's processes (the supervisor's children: nats-server, redis, the
    real agent ``datapath``, identity, policy, lb, monitor, ...): name -> pid."""

    def stat(pid: str) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    supervisor = stat(str(nats))[1]
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if stat(entry.name)[1] != supervisor:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
            words = [a.decode() for a in args if a]
            name = (
                words[words.index("run") + 1] if "run" in words else Path(words[0].split()[0]).name
            )
            found[name] = int(entry.name)
    return found


def cpu_split(nats: int, workers: list[Worker]) -> dict[str, float]:
    """CPU seconds so far: nats-server, the simulated agents (all workers), each process of
    the one-node cluster (the real agent is ``datapath``)."""
    split = {f"cluster {name}": cpu_seconds(pid) for name, pid in cluster_processes(nats).items()}
    split.pop("cluster nats-server", None)
    split["nats-server"] = cpu_seconds(nats)
    split["simulated agents"] = sum(cpu_seconds(w.proc.pid) for w in workers)
    return split


async def steady(workers: list[Worker], pid: int, seconds: float) -> dict[str, float]:
    """The fleet left alone for ``seconds`` (heartbeats only): nats-server's and the
    simulated agents' CPU (% of one core) and the watch events delivered per second."""
    procs = [w.proc.pid for w in workers]
    events0 = sum(c[0] for c in await ask_all(workers, "events"))
    nats0, sims0, started = cpu_seconds(pid), sum(map(cpu_seconds, procs)), time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    events1 = sum(c[0] for c in await ask_all(workers, "events"))
    return {
        "idle_nats_cpu": 100 * (cpu_seconds(pid) - nats0) / elapsed,
        "idle_sims_cpu": 100 * (sum(map(cpu_seconds, procs)) - sims0) / elapsed,
        "idle_events_s": (events1 - events0) / elapsed,
    }


async def measure_step(
    bus: Bus,
    workers: list[Worker],
    total: int,
    step: int,
    pod: dict[str, Any],
    pid: int,
    idle: float,
) -> dict[str, Any]:
    res: dict[str, Any] = {"nodes": total}
    if idle > 0:
        res.update(await steady(workers, pid, idle))
    rss0, cpu0 = nats_usage(pid)
    # a new pod's ipcache entry, written as its agent writes it
    ip = IPv4Address("10.127.0.0") + step
    node = node_name(0)  # as if a pod started on the first simulated node
    entry = IPCacheEntry(cidr=f"{ip}/32", identity=80000 + step, node=node)
    ipcache = await bus.kv(subjects.KV_IPCACHE)
    key = subjects.ipcache_key(ip, node)

    async def put_pod() -> None:
        await ipcache.put(key, msgspec.json.encode(entry))

    res["ipcache"] = await propagation(workers, subjects.KV_IPCACHE, key, put_pod, total)
    policy = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "fleet-probe", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "fleet-probe"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": f"client-{step}"}}],
                    "toPorts": [{"ports": [{"port": str(8000 + step), "protocol": "TCP"}]}],
                }
            ],
        },
    }

    async def apply_policy() -> None:
        await apply.apply_policies(bus, [policy], "fleet", audit=False, dry_run=False)

    res["policy"] = await propagation(
        workers,
        subjects.KV_RESOLVED,
        subjects.identity_key(int(pod["identity"])),
        apply_policy,
        total,
    )
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"fleet-{step}", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"fleet-{step}-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": f"fleet-{step}"},
            },
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [str(pod["ip"])]}],
        },
    ]

    async def apply_service() -> None:
        await apply.apply_services(bus, docs, "fleet", dry_run=False)

    res["service"] = await propagation(
        workers,
        subjects.KV_SERVICES,
        # the services bucket holds records in shards: the service's shard's next write
        services_bucket.shard_key(
            services_bucket.shard_of(subjects.service_key("default", f"fleet-{step}"))
        ),
        apply_service,
        total,
    )
    res["resync"] = await workers[0].ask("resync")
    rss1, cpu1 = nats_usage(pid)
    res["nats_rss_mb"], res["nats_cpu_s"] = rss1, cpu1 - cpu0
    res["nats_rss_before_mb"] = rss0
    counts = await ask_all(workers, "events")
    res["events"] = sum(c[0] for c in counts)
    res["timeouts"] = sum(c[1] for c in counts)
    res["restarts"] = restarts_of(counts)
    res["watch_restarts"] = restarts_of(counts, 3)
    return res


def join_split(cpu: dict[str, float], events: int, seconds: float) -> str:
    """Where the join's CPU went, per process, and per watch event delivered."""
    total = sum(cpu.values())
    parts = ", ".join(
        f"{name} {value:.1f} s ({100 * value / total if total else 0:.0f} %)"
        for name, value in sorted(cpu.items(), key=lambda kv: -kv[1])
        if value >= 0.05
    )
    per = f"{1e6 * total / events:.0f} us" if events else "-"
    cores = total / seconds if seconds else 0.0
    return (
        f"join CPU {total:.1f} s in {seconds:.1f} s ({cores:.2f} cores): "
        f"{parts}; {events} watch events delivered to the simulated agents, {per} of CPU each "
        f"(nats-server {1e6 * cpu.get('nats-server', 0) / max(events, 1):.0f} us, simulated "
        f"agents {1e6 * cpu.get('simulated agents', 0) / max(events, 1):.0f} us)"
    )


def restarts_of(counts: list[Any], which: int = 2) -> dict[str, int]:
    """Simulated agents' failed starts (each started again a second later), by cause."""
    total: collections.Counter[str] = collections.Counter()
    for c in counts:
        total.update(c[which])
    return dict(total)


def line(name: str, result: tuple[list[float], int]) -> str:
    arrived, missing = result
    if not arrived:
        return f"{name}: no node saw it"
    p50, p99 = percentile(arrived, 0.5), percentile(arrived, 0.99)
    verdict = "met" if p99 <= GOAL_P99_S and not missing else "NOT met"
    return (
        f"{name} p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms max {max(arrived) * 1000:.0f} ms"
        f"{f', {missing} nodes never saw it' if missing else ''} (goal p99 <= 1 s: {verdict})"
    )


async def drive(args: argparse.Namespace, cluster: Cluster) -> list[dict[str, Any]]:
    bus = await Bus.connect(cluster.nats_url, "fleet-bench", retry_for=10)
    pid = nats_pid(cluster.nats_url)
    workers: list[Worker] = []
    results: list[dict[str, Any]] = []
    cluster.run("pod", "create", "fleet-probe", "--labels", "app=fleet-probe")
    listing = json.loads(cluster.run("pod", "list", "-A", "-o", "json").stdout)["items"]
    (pod,) = [p for p in listing if p["name"] == "fleet-probe"]
    try:
        up = 0
        for step, target in enumerate(args.nodes):
            started = time.perf_counter()
            cpu0 = cpu_split(pid, workers)
            events0 = sum(c[0] for c in await ask_all(workers, "events")) if workers else 0
            load0 = os.getloadavg()[0]
            said = started
            while up < target:
                count = min(args.per_process, target - up)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--worker",
                    f"{up},{count},{args.endpoints}",
                    env={**os.environ, "MEMBRANE_FLEET_NATS": cluster.nats_url},
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                workers.append(Worker(proc))
                up += count
                # one worker's nodes joined and synced before the next starts: a join storm
                # of hundreds of agents at once is another measure
                while (synced := sum(await ask_all(workers, "synced"))) < up:
                    if time.perf_counter() - started > args.join_timeout:
                        counts = await ask_all(workers, "events")
                        print(
                            f"STOPPED: {synced} of {up} simulated nodes synced after "
                            f"{args.join_timeout:.0f} s (load average {os.getloadavg()[0]:.1f}); "
                            "see nats-server's log for what it was doing; failed starts, started "
                            f"again: {restarts_of(counts) or 'none'}; watches started again: "
                            f"{restarts_of(counts, 3) or 'none'}",
                            flush=True,
                        )
                        return results
                    if time.perf_counter() > said + 60:  # progress: a stall shows with its time
                        said = time.perf_counter()
                        print(
                            f"  {synced} of {up} synced after {said - started:.0f} s (load "
                            f"average {os.getloadavg()[0]:.1f}, {time.strftime('%H:%M:%S')})",
                            flush=True,
                        )
                    await asyncio.sleep(0.5)
            joined = time.perf_counter() - started
            cpu1 = cpu_split(pid, workers)
            events = sum(c[0] for c in await ask_all(workers, "events")) - events0
            join_cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
            print(
                f"{up} simulated nodes up and synced ({joined:.1f} s, load average "
                f"{load0:.1f} -> {os.getloadavg()[0]:.1f}, {time.strftime('%H:%M:%S')} UTC)",
                flush=True,
            )
            print(f"  {join_split(join_cpu, events, joined)}", flush=True)
            res = await measure_step(bus, workers, up, step, pod, pid, args.idle)
            res["joined_s"] = joined
            res["join_cpu"], res["join_events"] = join_cpu, events
            res["load"] = os.getloadavg()[0]
            results.append(res)
            print(
                f"  {up} nodes: {line('pod ipcache', res['ipcache'])}; "
                f"{line('policy', res['policy'])}; {line('service', res['service'])}; "
                f"resync {res['resync']:.2f} s; nats {res['nats_rss_mb']:.0f} MB",
                flush=True,
            )
    finally:
        for w in workers:
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in workers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.proc.wait(), 10)
            if w.proc.returncode is None:
                w.proc.kill()
        await bus.close()
    return results


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        f"== fleet: one real agent + simulated agents, {args.endpoints} endpoints each, "
        f"{args.per_process} per process =="
    )
    for r in results:
        endpoints = r["nodes"] * args.endpoints
        print(
            f"{r['nodes']:>5} nodes ({endpoints} endpoints, load average {r['load']:.1f}; joined "
            f"and synced in {r['joined_s']:.1f} s):"
        )
        print(f"    {join_split(r['join_cpu'], r['join_events'], r['joined_s'])}")
        for name in ("ipcache", "policy", "service"):
            print(f"    {line(name, r[name])}")
        print(
            f"    restarted agent resync (5 buckets) {r['resync']:.2f} s; nats-server "
            f"{r['nats_rss_before_mb']:.0f} -> {r['nats_rss_mb']:.0f} MB resident, "
            f"{r['nats_cpu_s']:.1f} CPU s over the three changes and the resync; "
            f"{r['events']} watch events delivered in all; {r['timeouts']} KV writes of the "
            "simulated agents timed out (2 s) and were retried; simulated agents started again "
            f"after a failed start: {r['restarts'] or 'none'}; watches started again: "
            f"{r['watch_restarts'] or 'none'}"
        )
        if "idle_nats_cpu" in r:
            print(
                f"    left alone {args.idle:.0f} s: nats-server {r['idle_nats_cpu']:.0f} % of a "
                f"core, simulated agents {r['idle_sims_cpu']:.0f} %, "
                f"{r['idle_events_s']:.0f} watch events/s"
            )
    if len(results) > 1:
        first, last = results[0], results[-1]
        for name in ("ipcache", "policy"):
            a, b = (percentile(r[name][0], 0.99) for r in (first, last))
            print(
                f"{name} p99 at {last['nodes']} nodes / at {first['nodes']}: "
                f"{b / a if a else float('nan'):.1f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--nodes", default="100,300,1000")
    parser.add_argument("--endpoints", type=int, default=20, help="pods per simulated node")
    parser.add_argument("--per-process", type=int, default=50)
    parser.add_argument(
        "--join-timeout", type=float, default=300, help="seconds for a fleet size to sync"
    )
    parser.add_argument(
        "--idle", type=float, default=10, help="seconds the fleet is left alone at each size"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        first, count, endpoints = (int(x) for x in args.worker.split(","))
        uvloop.run(worker(first, count, os.environ["MEMBRANE_FLEET_NATS"], endpoints))
        return
    if os.geteuid() != 0:
        sys.exit("bench/fleet.py starts a cluster: run it as root")
    args.nodes = [int(n) for n in args.nodes.split(",")]
    if args.endpoints > 127:
        parser.error("--endpoints: at most 127 per node")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="membrane-fleet-bench-") as tmp:
        cluster = Cluster(Path(tmp) / "state")
        print(f"starting a one-node cluster {cluster.name} (the real agent) ...", flush=True)
        cluster.up()
        try:
            results = uvloop.run(drive(args, cluster))
        finally:
            cluster.down()
    if results:
        report(results, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
