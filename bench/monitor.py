"""Flows per second from datapath events to enriched flows at the monitor; follow latency.

Real kernel events: the flow_gen.c test program (see bench/flows.py) writes ``struct
flow_event`` records into a BPF ring buffer through BPF_PROG_TEST_RUN; a FlowPublisher reads
and publishes them on ``membrane.flows.<node>`` exactly as an agent does. Monitor replicas run
as their own processes (``membrane run monitor``) against a nats-server this bench starts, with
KV buckets filled like a cluster's (1,000 identities, 4,096 pods, resolved policy naming every
rule id the generator uses), so every flow is enriched for real. Side by side in one run:

- throughput: N events pushed as fast as the ring buffer allows, counted when the monitors
  have enriched them all (flows_seen + flows_lost from ``membrane.monitor.status``): 1 replica
  fed the former way (the agent's JSON batches, ``wire="json"``), then 1 replica fed binary
  batches (:mod:`shared.flow_wire`) publishing one message per enriched flow as well
  (``MEMBRANE_EVENTS_PER_FLOW=true``: the per-flow baseline, as every monitor did before the
  batch subject), alternated with 1 replica publishing batches only (the default), ``--repeat``
  times each (the figures against the goal are the medians), then 2 replicas publishing
  batches: flows/s, flows lost at any stage (must be 0), each replica's CPU per flow and the
  share of a core it got (what the producer, the publisher and nats-server left it);
- with ``--baseline DIR`` (a checkout of another version, e.g. ``git worktree add DIR main``),
  1 replica of that version's code publishing batches is alternated with the two above: the
  CPU per flow of both versions side by side, under the same load;
- latency: events paced at ``--rate`` per second, read by ``membrane observe --follow -o
  json`` in its own process; the delay from the kernel timestamp of each event to its line
  arriving from ``observe``: p50/p99.

    sudo .venv/bin/python -m bench.monitor [--events 500000] [--rate 5000] [--seconds 10]
        [--repeat 3] [--baseline DIR] [--skip-json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import uvloop

from bench.flows import FlowGenerator, produce
from membrane.servers import NatsServer, ServerProcess
from services.datapath.flow_publisher import FlowPublisher
from services.datapath.ringbuf import RingBuffer
from shared import subjects
from shared.bus import Bus
from shared.flow_api import MonitorStatus
from shared.messages import Empty, Endpoint, Identity, ResolvedPolicy

GOAL_RATE = 150_000.0  # flows/s per replica (issue #19)
GOAL_P99 = 1.0  # seconds, kernel event -> observe --follow
NODE = "bench-node"
RING_MIB = 8


async def fill_buckets(bus: Bus) -> None:
    """What a cluster's services would have written, for the generator's identities and IPs."""
    enc = msgspec.json.encode
    ids = await bus.kv(subjects.KV_IDENTITIES)
    endpoints = await bus.kv(subjects.KV_ENDPOINTS)
    resolved = await bus.kv(subjects.KV_RESOLVED)
    writes = []
    for number in range(256, 1256):
        labels = [f"k8s:app=app{number}", "k8s:io.kubernetes.pod.namespace=bench"]
        writes.append(ids.put(str(number), enc(Identity(id=number, labels=labels, kind="cluster"))))
    for n in range(4096):
        ip = f"10.0.{n >> 8}.{n & 0xFF}"
        ep = Endpoint(
            namespace=f"ns{n % 16}",
            name=f"pod-{n}",
            node=NODE,
            ip=ip,
            identity=256 + n % 1000,
            labels={"app": f"app{n}"},
        )
        writes.append(endpoints.put(subjects.endpoint_key(NODE, ep.namespace, ep.name), enc(ep)))
    # rule ids are the run numbers: name the first 20,000 under 200 policies
    for subject in range(200):
        rules = {
            rule: f"ns{subject % 16}/policy-{subject}[{rule}]"
            for rule in range(subject * 100, subject * 100 + 100)
        }
        writes.append(
            resolved.put(
                str(10_000 + subject),
                enc(ResolvedPolicy(identity=10_000 + subject, revision=1, rules=rules)),
            )
        )
    for start in range(0, len(writes), 500):
        await asyncio.gather(*writes[start : start + 500])


class Monitors:
    """N ``membrane run monitor`` processes."""

    def __init__(
        self,
        nats_url: str,
        replicas: int,
        logs: Path,
        per_flow: bool = False,
        code: Path | None = None,
    ) -> None:
        """``code``: the checkout whose monitor runs (default: this one)."""
        env = {
            **os.environ,
            **({"PYTHONPATH": str(code)} if code else {}),
            "MEMBRANE_EVENTS_PER_FLOW": "true" if per_flow else "false",
            "MEMBRANE_NATS_URL": nats_url,
            "MEMBRANE_LOG_FORMAT": "json",
            # a deep intake queue: throughput is measured without loss, then loss is checked
            "MEMBRANE_QUEUE_BATCHES": "20000",
        }
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "membrane", "run", "monitor"],
                env={**env, "MEMBRANE_REPLICA": f"bench-monitor-{i}"},
                cwd=code,
                stdout=(logs / f"monitor-{replicas}-{i}-{per_flow}-{code is None}.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            for i in range(1, replicas + 1)
        ]
        self.replicas = replicas

    async def ready(self, bus: Bus) -> list[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = await bus.discover(subjects.MONITOR_SERVICE)
            if len(found) == self.replicas:
                return [i.id for i in found]
            await asyncio.sleep(0.2)
        raise RuntimeError("monitor replicas did not come up (see the logs)")

    def cpu_seconds(self) -> float:
        """User + system CPU time the replicas have used so far (/proc/<pid>/stat)."""
        return sum(process_cpu(proc.pid) for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def statuses(bus: Bus, ids: list[str]) -> list[MonitorStatus]:
    return list(
        await asyncio.gather(
            *(
                bus.request(subjects.monitor_status(i), Empty(), MonitorStatus, timeout=10)
                for i in ids
            )
        )
    )


@dataclass
class Throughput:
    wire: str
    per_flow: bool  # one message per enriched flow as well as the batches
    replicas: int
    events: int
    seen: int
    lost: int
    seconds: float
    kernel_lost: int
    published_dropped: int
    cpu_seconds: float  # of the monitor processes, over the run
    others_cpu: float  # of this process (the producer and the publisher) and nats-server
    producing: float  # seconds until the producer and the publisher were done
    code: str = "this"  # whose monitor: this checkout, or the --baseline one

    @property
    def capacity(self) -> float:
        """Enriched flows per CPU-second of a replica: its rate with a core to itself."""
        return self.seen / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def rate(self) -> float:
        return self.seen / self.seconds

    @property
    def share(self) -> float:
        """Cores the replicas got, on average over the run."""
        return self.cpu_seconds / self.seconds


async def throughput(
    nats: ServerProcess,
    replicas: int,
    events: int,
    chunk: int,
    logs: Path,
    wire: str,
    per_flow: bool,
    code: Path | None = None,
) -> Throughput:
    nats_url = nats.url
    assert nats.process is not None
    nats_pid = nats.process.pid
    monitors = Monitors(nats_url, replicas, logs, per_flow, code)
    bus = await Bus.connect(nats_url, "bench", retry_for=10)
    gen = FlowGenerator(RING_MIB << 20)
    ring = RingBuffer(gen.ring_fd, gen.ring_bytes)
    try:
        ids = await monitors.ready(bus)
        publisher = FlowPublisher(bus, NODE, ring, gen.lost, wire=wire)
        task = asyncio.create_task(publisher.run())
        started = time.monotonic()
        cpu = monitors.cpu_seconds()
        others = process_cpu(os.getpid()) + process_cpu(nats_pid)
        await asyncio.to_thread(produce, gen, events, chunk, ring)
        await publisher.flush()
        await bus.nc.flush()
        producing = time.monotonic() - started
        last_total, last_change = -1, time.monotonic()
        while True:
            found = await statuses(bus, ids)
            seen = sum(s.flows_seen for s in found)
            lost = sum(s.flows_lost for s in found)
            now = time.monotonic()
            if seen + lost >= events:
                break
            if seen + lost != last_total:
                last_total, last_change = seen + lost, now
            elif now - last_change > 15:
                break  # nothing moves any more: the rest never arrived
            await asyncio.sleep(0.05)
        elapsed = now - started
        cpu = monitors.cpu_seconds() - cpu
        others = process_cpu(os.getpid()) + process_cpu(nats_pid) - others
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        from bench.flows import dropped_flows

        return Throughput(
            wire,
            per_flow,
            replicas,
            events,
            seen,
            lost,
            elapsed,
            gen.lost(),
            dropped_flows(),
            cpu,
            others,
            producing,
            "this" if code is None else "baseline",
        )
    finally:
        await bus.close()
        monitors.stop()
        ring.close()
        gen.close()


def paced(gen: FlowGenerator, rate: int, seconds: float, stop: threading.Event) -> int:
    """``rate`` events a second in 10 ms steps, for ``seconds``; how many were made."""
    step = max(1, rate // 100)
    made = 0
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < seconds:
        gen.run(step)
        made += step
        target = started + made / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return made


async def latency(
    nats_url: str, rate: int, seconds: float, logs: Path
) -> tuple[list[float], int, int]:
    """(delays of the flows observe printed, flows made, flows printed)."""
    monitors = Monitors(nats_url, 1, logs)
    bus = await Bus.connect(nats_url, "bench", retry_for=10)
    gen = FlowGenerator(RING_MIB << 20)
    ring = RingBuffer(gen.ring_fd, gen.ring_bytes)
    observe = None
    delays: list[float] = []
    try:
        await monitors.ready(bus)
        publisher = FlowPublisher(bus, NODE, ring, gen.lost)
        task = asyncio.create_task(publisher.run())
        observe = subprocess.Popen(  # noqa: ASYNC220 - a pipe read by a thread, not awaited
            [
                sys.executable,
                "-m",
                "membrane",
                "--nats-url",
                nats_url,
                "observe",
                "--follow",
                "--ready",
                "-o",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert observe.stdout is not None and observe.stderr is not None
        assert observe.stderr.readline().strip() == "following"
        out = observe.stdout

        def read() -> None:
            for line in out:
                arrived = time.time()
                delays.append(arrived - json.loads(line)["time"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        stop = threading.Event()
        made = await asyncio.to_thread(paced, gen, rate, seconds, stop)
        await publisher.flush()
        deadline = time.monotonic() + 10
        while len(delays) < made and time.monotonic() < deadline:  # noqa: ASYNC110 - a thread fills it
            await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return sorted(delays), made, len(delays)
    finally:
        if observe is not None:
            observe.kill()
            observe.wait()
        await bus.close()
        monitors.stop()
        ring.close()
        gen.close()


def median_run(runs: list[Throughput]) -> Throughput:
    """The run of median rate (its CPU per flow with it)."""
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-monitor-") as tmp:
        nats = ServerProcess("nats-server", NatsServer(Path(tmp) / "nats"))
        nats.start()
        logs = Path(tmp)
        try:
            bus = await Bus.connect(nats.url, "bench-setup", retry_for=10)
            await fill_buckets(bus)
            await bus.close()
            # alternated, so that the shared machine's load weighs on all alike
            alternated: list[tuple[str, bool, int, Path | None]] = [
                ("binary", True, 1, None),
                ("binary", False, 1, None),
            ]
            if args.baseline:
                alternated.append(("binary", False, 1, args.baseline))
            results = [
                await throughput(
                    nats, replicas, args.events, args.chunk, logs, wire, per_flow, code
                )
                for wire, per_flow, replicas, code in (
                    *([] if args.skip_json else [("json", False, 1, None)]),
                    *alternated * args.repeat,
                    ("binary", False, 2, None),
                )
            ]
            delays, made, printed = await latency(nats.url, args.rate, args.seconds, logs)
        finally:
            nats.stop()
    print(
        f"{'code':>8} {'wire':>6} {'events out':>10} {'replicas':>8} {'events':>9} "
        f"{'enriched':>9} {'lost':>6} {'seconds':>8} {'flows/s':>9} {'per replica':>11} "
        f"{'vs per-flow':>11} {'us CPU/flow':>11} {'flows/CPU-s':>11} {'cores':>5} "
        f"{'others':>6} {'producing':>9}"
    )
    # binary wire, one replica: one message per flow (what every monitor did before) and batches
    base = median_run([r for r in results if r.per_flow])
    for r in results:
        print(
            f"{r.code:>8} {r.wire:>6} {'per flow' if r.per_flow else 'batches':>10} "
            f"{r.replicas:8d} {r.events:9d} {r.seen:9d} {r.lost:6d} {r.seconds:8.2f} "
            f"{r.rate:9.0f} {r.rate / r.replicas:11.0f} {r.rate / base.rate:10.2f}x "
            f"{1e6 / r.capacity if r.capacity else 0:11.2f} {r.capacity:11.0f} "
            f"{r.share:5.2f} {r.others_cpu / r.seconds:6.2f} {r.producing:9.2f}"
        )
    print(
        "(cores: CPU time of the replicas over the run's wall time; others: that of the "
        "producer and publisher process and of nats-server; producing: seconds until the last "
        "batch was published: the replicas kept up with the producer when that is close to "
        "the run's seconds)"
    )
    batches_1 = [r for r in results if r.wire == "binary" and not r.per_flow and r.replicas == 1]
    one = median_run([r for r in batches_1 if r.code == "this"])
    complete = all(r.seen == r.events and r.lost == 0 for r in results)
    print()
    print(f"(1 replica: the median of {args.repeat} alternated runs of each kind)")
    print(
        f"goal >= {GOAL_RATE:.0f} enriched flows/s per replica, nothing lost: 1 replica, "
        f"batches {one.rate:.0f}/s ({one.rate / GOAL_RATE:.2f} of the goal) vs per-flow "
        f"messages {base.rate:.0f}/s ({base.rate / GOAL_RATE:.2f}; batches "
        f"{one.rate / base.rate:.2f}x), {'all' if complete else 'NOT all'} flows enriched "
        f"-> {'MET' if one.rate >= GOAL_RATE and complete else 'MISSED'}"
    )
    print(
        f"one replica's own cost: batches {1e6 / one.capacity if one.capacity else 0:.2f} us of "
        f"CPU per flow, {one.capacity:.0f} flows per CPU-second ({one.capacity / GOAL_RATE:.2f} "
        f"of the goal with a core to itself); per-flow messages "
        f"{1e6 / base.capacity if base.capacity else 0:.2f} us, {base.capacity:.0f} "
        f"({base.capacity / GOAL_RATE:.2f})"
    )
    baseline = [r for r in batches_1 if r.code == "baseline"]
    if baseline:
        old = median_run(baseline)
        print(
            f"side by side, 1 replica publishing batches (medians of {args.repeat} alternated "
            f"runs): this {1e6 / one.capacity:.2f} us of CPU per flow ({one.capacity:.0f} flows "
            f"per CPU-second, {one.rate:.0f}/s on the wall clock with {one.share:.2f} of a "
            f"core) vs baseline {1e6 / old.capacity:.2f} us ({old.capacity:.0f}, {old.rate:.0f}/s "
            f"with {old.share:.2f}): {one.capacity / old.capacity:.2f}x flows per CPU-second"
        )
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    latency_met = p99 <= GOAL_P99 and printed == made
    print(
        f"observe --follow at {args.rate} flows/s for {args.seconds:g}s: {printed}/{made} flows "
        f"printed, delay kernel event -> observe line p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {max(delays, default=float('nan')) * 1000:.0f} ms "
        f"-> goal p99 <= {GOAL_P99:g} s {'MET' if latency_met else 'MISSED'}"
    )
    load = os.getloadavg()
    print(
        f"(host: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        "shared by the kernel producer, the publisher, nats-server (JetStream keeps the drops), "
        "the monitors and the observer)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--chunk", type=int, default=8192, help="events per BPF_PROG_TEST_RUN")
    parser.add_argument("--rate", type=int, default=5000, help="flows/s of the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternated per-flow / batch runs of 1 replica"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another version: its monitor alternated with this one's",
    )
    parser.add_argument(
        "--skip-json",
        action="store_true",
        help="no run fed the agents' JSON wire (on a loaded machine nats-server may cut that"
        " replica off as a slow consumer: the JSON is ~7x the bytes)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/monitor.py loads BPF programs: run it as root (python -m bench.monitor)")
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
