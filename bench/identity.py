"""Identity allocation throughput and latency, 1 vs 3 replicas, side by side in one run.

Starts its own nats-server and redis-server on free loopback ports, then for 1 and 3 identity
service processes measures allocations of label sets that already exist and of new ones, with
many requests in flight from several client connections. The baseline, in the same run, is
the allocator called directly on Redis from this process (no bus): it shows what the bus and
the service add, and the replica ratio shows what scaling out buys on this machine.

    python bench/identity.py [--existing 20000] [--new 10000] [--inflight 256]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from membrane.servers import NatsServer, RedisServer, ServerProcess, terminate
from membrane.supervisor import die_with_parent
from services.identity.allocator import IdentityAllocator
from shared import subjects
from shared.bus import Bus
from shared.messages import AllocateReply, AllocateRequest
from shared.redis_store import make_redis

GOAL_EXISTING = 5000.0
GOAL_NEW = 1500.0


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


async def drive(name: str, calls: list[Callable[[], Awaitable[object]]], inflight: int) -> Result:
    """Run every call with at most ``inflight`` outstanding; time each one."""
    latencies: list[float] = []
    slots = asyncio.Semaphore(inflight)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with slots:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls))
    return Result(name, len(calls), time.perf_counter() - started, latencies)


def progress(result: Result) -> None:
    print(f"  {result.name}: {result.rate:.0f}/s", file=sys.stderr, flush=True)


def label_sets(tag: str, count: int) -> list[list[str]]:
    return [
        [f"app={tag}-{i}", f"team=t{i % 17}", "io.kubernetes.pod.namespace=bench"]
        for i in range(count)
    ]


async def over_bus(buses: list[Bus], name: str, sets: list[list[str]], inflight: int) -> Result:
    def call(i: int, labels: list[str]) -> Callable[[], Awaitable[object]]:
        bus = buses[i % len(buses)]
        request = AllocateRequest(labels=labels, owner="bench")
        return lambda: bus.request(subjects.IDENTITY_ALLOCATE, request, AllocateReply, timeout=30)

    return await drive(name, [call(i, s) for i, s in enumerate(sets)], inflight)


async def direct(redis_url: str, name: str, sets: list[list[str]], inflight: int) -> Result:
    client = make_redis(redis_url)
    # its own key prefix: the services must not find (and reconcile) these identities
    allocator = IdentityAllocator(client, prefix="membrane:bench-direct:")
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            functools.partial(allocator.allocate, s, "bench") for s in sets
        ]
        return await drive(name, calls, inflight)
    finally:
        await client.aclose()


def start_replicas(count: int, nats_url: str, redis_url: str) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "MEMBRANE_NATS_URL": nats_url,
        "MEMBRANE_REDIS_URL": redis_url,
        "MEMBRANE_LOG_LEVEL": "warning",
        "MEMBRANE_LOG_FORMAT": "json",
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "membrane", "run", "identity", "--replica", f"bench-{i}"],
            env=env,
            preexec_fn=die_with_parent,
        )
        for i in range(count)
    ]


async def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        nats = ServerProcess("nats-server", NatsServer(Path(tmp) / "nats"))
        redis = ServerProcess("redis-server", RedisServer(Path(tmp) / "redis"))
        nats.start()
        redis.start()
        try:
            warm = label_sets("existing", args.distinct)
            results.append(
                await direct(
                    redis.url,
                    "direct redis, new (baseline)",
                    label_sets("direct", args.new),
                    args.inflight,
                )
            )
            results.append(
                await direct(
                    redis.url,
                    "direct redis, existing (baseline)",
                    (warm * (args.existing // len(warm) + 1))[: args.existing],
                    args.inflight,
                )
            )
            for replicas in (1, 3):
                procs = start_replicas(replicas, nats.url, redis.url)
                buses = [
                    await Bus.connect(nats.url, f"bench-{i}", retry_for=10)
                    for i in range(args.clients)
                ]
                try:
                    while len(await buses[0].discover(subjects.IDENTITY_SERVICE)) < replicas:
                        pass
                    # untimed: make the "existing" label sets exist in the services' keyspace
                    await over_bus(buses, "warm-up", warm, args.inflight)
                    existing = (warm * (args.existing // len(warm) + 1))[: args.existing]
                    results.append(
                        await over_bus(
                            buses, f"{replicas} replica(s), existing", existing, args.inflight
                        )
                    )
                    progress(results[-1])
                    serial = existing[: args.serial]
                    name = f"{replicas} replica(s), existing, 1 in flight"
                    results.append(await over_bus(buses[:1], name, serial, 1))
                    progress(results[-1])
                    results.append(
                        await over_bus(
                            buses,
                            f"{replicas} replica(s), new",
                            label_sets(f"new{replicas}", args.new),
                            args.inflight,
                        )
                    )
                    progress(results[-1])
                finally:
                    for bus in buses:
                        await bus.close()
                    terminate(procs)
        finally:
            nats.stop()
            redis.stop()
    return results


def report(results: list[Result]) -> None:
    by_name = {r.name: r for r in results}
    print(
        f"{'scenario':36} {'count':>7} {'alloc/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs 1 replica':>13} {'vs direct':>10}"
    )
    for r in results:
        kind = "existing" if "existing" in r.name else "new"
        one = by_name.get(r.name.replace("3 replica(s)", "1 replica(s)"))
        base = by_name[f"direct redis, {kind} (baseline)"]
        vs_one = f"{r.rate / one.rate:.2f}x" if one and "replica" in r.name else "-"
        # the baseline runs with many requests in flight; a serial row is not comparable
        vs_base = "-" if "1 in flight" in r.name else f"{r.rate / base.rate:.2f}x"
        print(
            f"{r.name:36} {r.count:7d} {r.rate:9.0f} {r.percentile(0.5):8.2f} "
            f"{r.percentile(0.99):8.2f} {vs_one:>13} {vs_base:>10}"
        )
    three_existing = by_name["3 replica(s), existing"].rate
    three_new = by_name["3 replica(s), new"].rate
    print()
    print(
        f"goal existing >= {GOAL_EXISTING:.0f}/s with 3 replicas: {three_existing:.0f}/s "
        f"{'MET' if three_existing >= GOAL_EXISTING else 'MISSED'}"
    )
    print(
        f"goal new      >= {GOAL_NEW:.0f}/s with 3 replicas: {three_new:.0f}/s "
        f"{'MET' if three_new >= GOAL_NEW else 'MISSED'}"
    )
    print(
        f"(host: {os.cpu_count()} cores; with many requests in flight, latency is mostly "
        "queueing: the '1 in flight' rows give the unloaded figure)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--existing", type=int, default=20000, help="allocations of known sets")
    parser.add_argument("--new", type=int, default=10000, help="allocations of new sets")
    parser.add_argument("--distinct", type=int, default=500, help="known label sets")
    parser.add_argument("--inflight", type=int, default=256, help="requests outstanding")
    parser.add_argument("--clients", type=int, default=4, help="client NATS connections")
    parser.add_argument(
        "--serial", type=int, default=2000, help="requests sent one at a time, for unloaded latency"
    )
    report(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
