"""CPU time of one monitor replica's stages per flow, in-process: where a flow's cost goes.

The records are bench/flows.py's generator's (tests/integration/bpf/flow_gen.c), derived here
in Python so that no BPF program is needed; the enricher's tables are filled from the same
bucket contents as bench/monitor.py writes (:func:`bench.monitor.fill_buckets`'s values), and
the publish goes to a real nats-server this bench starts. Each 4,096-flow binary batch goes
through :meth:`Monitor.process` as a replica's intake hands it over; the stages are then
timed one by one on the same batches (process time, so other processes' load does not count),
and a query over the full ring.

    .venv/bin/python -m bench.monitor_stages [--events 300000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import tempfile
import time
from pathlib import Path

import msgspec
import uvloop

from membrane.servers import NatsServer, ServerProcess
from services.monitor.enrich import Enricher
from services.monitor.service import Monitor, MonitorSettings, count_records
from shared import flow_wire, gcpause
from shared.bus import Bus
from shared.flow_api import FlowFilterTerm
from shared.flow_filter import compile_filter
from shared.messages import Endpoint, Identity, ResolvedPolicy

NODE = "bench-node"
BATCH = 4096
_SOURCE = struct.unpack("=I", socket.inet_aton("10.1.2.3"))[0]
_PROTOCOLS = (6, 17, 1, 132)
_REASONS = (133, 181, 158, 183, 134, 250)


def _daddr(n: int) -> int:
    return int(struct.unpack("=I", (0x0A000000 | (n & 0xFFF)).to_bytes(4, "big"))[0])


def record(n: int, ts: int) -> tuple[int, ...]:
    """Run ``n`` of flow_gen.c, as the ring buffer record the agent forwards."""
    kind = n % 3 + 1
    flags = (n // 3) % 4
    proto = _PROTOCOLS[n % 4]
    reason = 0
    if kind == 1:
        reason = _REASONS[(n // 3) % 6]
    elif kind == 3 and not flags & 2:
        reason = 133
    return (
        48, 0, ts, kind, reason, n % 2 + 1, (n // 2) % 2 + 1, proto,
        (n >> 2) & 0xFF if proto == 6 else 0, flags, 0, 1, 256 + n % 1000,
        ((n >> 8) + 1) & 0xFFFFFFFF, _SOURCE, _daddr(n), n & 0xFFFF, 8080, n & 0xFFFFFFFF, 64,
    )  # fmt: skip


def batches(events: int) -> list[bytes]:
    """The binary batches an agent would publish for ``events`` runs of the generator."""
    pack = flow_wire.RECORDS[flow_wire.NATIVE].pack
    out = []
    base = time.monotonic_ns()
    for start in range(0, events, BATCH):
        count = min(BATCH, events - start)
        body = b"".join(pack(*record(n, base + n * 1000)) for n in range(start, start + count))
        out.append(flow_wire.header(NODE.encode(), count, time.time_ns() - base) + body)
    return out


def fill(enricher: Enricher) -> None:
    """The bucket contents bench/monitor.py writes, fed as the KV watches would."""
    enc = msgspec.json.encode
    for number in range(256, 1256):
        labels = [f"k8s:app=app{number}", "k8s:io.kubernetes.pod.namespace=bench"]
        enricher.on_identity(str(number), enc(Identity(id=number, labels=labels, kind="cluster")))
    for n in range(4096):
        ep = Endpoint(
            namespace=f"ns{n % 16}",
            name=f"pod-{n}",
            node=NODE,
            ip=f"10.0.{n >> 8}.{n & 0xFF}",
            identity=256 + n % 1000,
            labels={"app": f"app{n}"},
        )
        enricher.on_endpoint(f"{NODE}.{ep.namespace}.{ep.name}", enc(ep))
    for subject in range(200):
        rules = {
            rule: f"ns{subject % 16}/policy-{subject}[{rule}]"
            for rule in range(subject * 100, subject * 100 + 100)
        }
        policy = ResolvedPolicy(identity=10_000 + subject, revision=1, rules=rules)
        enricher.on_resolved(str(10_000 + subject), enc(policy))


async def measure(nats_url: str, data: list[bytes], repeat: int) -> None:
    bus = await Bus.connect(nats_url, "bench-stages", retry_for=10)
    monitor = Monitor(bus, MonitorSettings(nats_url=nats_url))
    fill(monitor.enricher)
    flows = sum(flow_wire.decode(d).count for d in data)
    # warm-up: the caches and the ring filled as in a running replica
    for d in data[:8]:
        await monitor.process(d)
    whole = []
    for _ in range(repeat):
        started = time.process_time()
        for d in data:
            await monitor.process(d)
        whole.append(time.process_time() - started)
    await bus.nc.flush()
    stages = await _stages(monitor, data, repeat)
    print(f"{flows} flows in {len(data)} batches, {repeat} rounds, process CPU time:")
    for name, seconds in stages.items():
        print(f"  {name:<34} {seconds / flows * 1e6:5.2f} us a flow (best round)")
    best = min(whole)
    print(
        f"  Monitor.process (all stages, publish to nats-server): {best / flows * 1e6:.2f} us a "
        f"flow (rounds: {', '.join(f'{w / flows * 1e6:.2f}' for w in whole)}), "
        f"{flows / best:,.0f} flows per CPU-second"
    )
    # what the ring costs a query now that it keeps lines: the whole ring, and the newest 20
    nothing = compile_filter([FlowFilterTerm(field="pod", values=["no-such-pod"])])
    started = time.process_time()
    monitor.ring.query(nothing)
    whole_ring = time.process_time() - started
    started = time.process_time()
    monitor.ring.query(compile_filter([]), last=20)
    print(
        f"  a query over the whole ring ({len(monitor.ring)} flows): {whole_ring * 1000:.0f} ms; "
        f"the newest 20: {(time.process_time() - started) * 1000:.2f} ms"
    )
    await bus.close()


async def _stages(monitor: Monitor, data: list[bytes], repeat: int) -> dict[str, float]:
    """The stages of :meth:`Monitor.process` timed one by one, batch after batch as it runs
    them (the cache state of the real thing), best round of ``repeat``."""
    clock = time.process_time
    best: dict[str, float] = {}
    for _ in range(repeat):
        spent = dict.fromkeys(
            (
                "decode + unpack",
                "enrich + encode + group",
                "ring",
                "count (Prometheus)",
                "join + publish",
            ),
            0.0,
        )
        for d in data:
            t0 = clock()
            binary = flow_wire.decode(d)
            records = binary.unpack()
            t1 = clock()
            groups: dict[tuple[str, str], list[bytes]] = {}
            lines = monitor.enricher.encode_records(
                records, binary.node, binary.clock_offset_ns, groups
            )
            t2 = clock()
            monitor.ring.extend(lines)
            t3 = clock()
            count_records(records)
            t4 = clock()
            await monitor._republish(groups)
            t5 = clock()
            for name, seconds in zip(
                spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
            ):
                spent[name] += seconds
        for name, seconds in spent.items():
            best[name] = min(best.get(name, seconds), seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gcpause.tune_for_service()  # as `membrane run monitor` sets the collector up
    data = batches(args.events)
    with tempfile.TemporaryDirectory(prefix="membrane-bench-stages-") as tmp:
        nats = ServerProcess("nats-server", NatsServer(Path(tmp) / "nats"))
        nats.start()
        try:
            uvloop.run(measure(nats.url, data, args.repeat))
        finally:
            nats.stop()
    print(f"(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
