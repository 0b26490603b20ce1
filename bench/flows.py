"""Flow events per second, ring buffer to NATS, binary batches against JSON and bcc's reader.

A test BPF program (tests/integration/bpf/flow_gen.c) writes ``struct flow_event`` records
into an 8 MiB ring buffer, run in chunks by BPF_PROG_TEST_RUN (a real kernel path: the kernel
runs the program ``repeat`` times), paced so that the ring buffer never overflows. Side by
side in one run:

- the FlowPublisher reading with RingBuffer and publishing binary batches (the ring buffer's
  records copied as they are, :mod:`shared.flow_wire`) to a nats-server this bench starts,
  counted as a subscriber process receives the flows (it reads the batch headers, as a monitor
  replica's intake does), against the former path: the same publisher decoding every record
  into a WireFlow and JSON-encoding batches of 512 (``wire="json"``), and that JSON path fed by
  bcc's ring buffer with a ctypes callback per event;
- reading and decoding alone, no bus: RingBuffer against bcc's ``ring_buffer_poll`` with the
  same ctypes callback, then the same decode.

    sudo .venv/bin/python bench/flows.py [--events 1000000] [--ring-mib 8] [--chunk 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/flows.py`

from bench.testrun import test_run
from membrane.servers import NatsServer, ServerProcess
from services.datapath.flow_publisher import FlowPublisher, RecordSource
from services.datapath.ringbuf import RingBuffer
from shared import flow_wire, subjects
from shared.bus import Bus
from shared.flow_decode import RECORD, Decoder

REPO = Path(__file__).resolve().parent.parent
GENERATOR_C = REPO / "tests" / "integration" / "bpf" / "flow_gen.c"
EVENTS_H_DIR = REPO / "services" / "datapath" / "bpf"
GOAL = 1_000_000.0  # issue #19: ring buffer -> monitor replicas
NODE = "bench-node"

PAGE = os.sysconf("SC_PAGE_SIZE")


def prog_test_run(prog_fd: int, packet: bytes, repeat: int) -> int:
    """Run a tc program ``repeat`` times on ``packet`` in the kernel; its last return value."""
    return test_run(prog_fd, packet, repeat)[0]


def sample_packet(payload: int = 10) -> bytes:
    """Ethernet + IPv4 (10.1.2.3 -> 10.9.9.9, TCP) + TCP (40000 -> 8080) + payload."""
    eth = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00"
    total = 20 + 20 + payload
    ip = (
        bytes([0x45, 0])
        + total.to_bytes(2, "big")
        + bytes(4)
        + bytes([64, 6])
        + bytes(2)
        + bytes([10, 1, 2, 3, 10, 9, 9, 9])
    )
    tcp = (40000).to_bytes(2, "big") + (8080).to_bytes(2, "big") + bytes(8)
    tcp += bytes([0x50, 0x02]) + (65535).to_bytes(2, "big") + bytes(4)
    return eth + ip + tcp + bytes(payload)


class FlowGenerator:
    """The test program, compiled with bcc: a ring buffer it fills on demand."""

    def __init__(self, ring_bytes: int, **defines: int) -> None:
        """``defines``: the knobs of flow_gen.c (DISCARD_EVERY, MALFORMED_EVERY, SPIN)."""
        from bcc import BPF

        if ring_bytes % PAGE or ring_bytes & (ring_bytes - 1):
            raise ValueError(f"ring buffer size {ring_bytes} is not a power-of-2 page multiple")
        self.ring_bytes = ring_bytes
        self.bpf: Any = BPF(
            src_file=str(GENERATOR_C).encode(),
            cflags=[
                f"-I{EVENTS_H_DIR}",
                f"-DRINGBUF_PAGES={ring_bytes // PAGE}",
                *(f"-D{name}={value}" for name, value in defines.items()),
            ],
        )
        self.prog_fd = int(self.bpf.load_func(b"generate", BPF.SCHED_CLS).fd)
        self.ring_fd = int(self.bpf[b"events"].map_fd)
        self.packet = sample_packet()

    def run(self, count: int) -> int:
        return prog_test_run(self.prog_fd, self.packet, count)

    def runs(self) -> int:
        table = self.bpf[b"runs"]
        return int(table[table.Key(0)].value)

    def lost(self) -> int:
        table = self.bpf[b"lost_events"]
        return sum(int(v) for v in table[table.Key(0)])

    def close(self) -> None:
        self.bpf.cleanup()


def produce(gen: FlowGenerator, total: int, chunk: int, positions: RingBuffer) -> None:
    """Run the generator ``total`` times, a chunk whenever the ring buffer has room for it."""
    done = 0
    while done < total:
        count = min(chunk, total - done)
        while positions.size - positions.pending() < count * RECORD.size:
            time.sleep(0.0002)
        gen.run(count)
        done += count


class _FlowEventC(ctypes.Structure):
    """struct flow_event for bcc's callback, the usual ctypes way."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("obs_point", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("ifindex", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("rule_id", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


class BccSource:
    """The baseline reader: bcc's ring buffer with a ctypes callback per event.

    It offers the FlowPublisher's source interface, so both readers feed the same decoder,
    batching and publishing.
    """

    def __init__(self, gen: FlowGenerator) -> None:
        self._bpf = gen.bpf
        self._fd = gen.ring_fd
        self._records: list[tuple[Any, ...]] = []
        self._limit = 1 << 30
        self._pointer = ctypes.POINTER(_FlowEventC)
        gen.bpf[b"events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        ev = ctypes.cast(data, self._pointer).contents
        self._records.append(
            (
                *(size, 0, ev.ts_ns, ev.type, ev.reason, ev.direction, ev.obs_point),
                *(ev.protocol, ev.tcp_flags, ev.flags, ev.pad, ev.ifindex, ev.src_identity),
                *(ev.dst_identity, ev.saddr, ev.daddr, ev.sport, ev.dport, ev.rule_id, ev.len),
            )
        )
        # libbpf stops consuming (after this record) when the callback returns < 0
        return -1 if len(self._records) >= self._limit else 0

    def fileno(self) -> int:
        return self._fd

    def poll(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def drain_unpack(
        self, record: struct.Struct, max_records: int = 1 << 30
    ) -> list[tuple[Any, ...]]:
        self._limit = max_records
        self._bpf.ring_buffer_consume()
        records, self._records = self._records, []
        return records

    def drain_records(self, stride: int, max_records: int = 1 << 30) -> tuple[list[bytes], int]:
        records = self.drain_unpack(RECORD, max_records)
        return [RECORD.pack(*r) for r in records], len(records)


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    lost: int = 0  # as reported in the batches
    dropped: int = 0  # by the publisher (bus unavailable or too slow)
    kernel_lost: int = 0  # reservations that failed in the BPF program

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def subscribe() -> None:
    """The subscriber process: counts flows and lost events until told that all is sent.

    It runs apart from the publisher, as the monitor would, so that it does not share the
    publisher's interpreter; it counts rather than decodes to keep up with it. A line on
    stdin says that everything is published; it answers with its counts as JSON.
    """
    bus = await Bus.connect(os.environ["MEMBRANE_NATS_URL"], "bench-subscriber", retry_for=10)
    flows = lost = 0
    last = 0.0
    lost_re = re.compile(rb'"lost":(\d+),"v":\d+}$')

    async def on_batch(msg: Any) -> None:
        nonlocal flows, lost, last
        if flow_wire.is_binary(msg.data):
            count, kernel, queue, publish = flow_wire.counts(msg.data)
            flows += count
            lost += kernel + queue + publish
        else:
            flows += msg.data.count(b'{"time":')
            match = lost_re.search(msg.data, len(msg.data) - 64)
            lost += int(match.group(1)) if match else 0
        last = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes

    await bus.nc.subscribe(subjects.flows(NODE), cb=on_batch)
    await bus.nc.flush()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await bus.nc.flush()  # a round trip: what the server had for us has arrived
    await asyncio.sleep(0.2)
    print(json.dumps({"flows": flows, "lost": lost, "last": last}), flush=True)
    await bus.close()


def dropped_flows() -> int:
    """The publisher's drops, all stages."""
    return sum(
        int(REGISTRY.get_sample_value("membrane_datapath_flows_dropped_total", {"stage": s}) or 0)
        for s in ("queue", "publish")
    )


async def publish_run(
    name: str, nats_url: str, args: argparse.Namespace, bcc: bool, wire: str
) -> Result:
    """A FlowPublisher end to end, counted when the subscriber process has the flows."""
    gen = FlowGenerator(args.ring_mib << 20)
    positions = RingBuffer(gen.ring_fd, gen.ring_bytes)
    source: RecordSource = BccSource(gen) if bcc else positions
    subscriber = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--subscribe",
        env={**os.environ, "MEMBRANE_NATS_URL": nats_url},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert subscriber.stdin is not None and subscriber.stdout is not None
    bus = await Bus.connect(nats_url, "bench-publisher", retry_for=10)
    publisher = FlowPublisher(bus, NODE, source, gen.lost, wire=wire)
    task = asyncio.create_task(publisher.run())
    dropped = dropped_flows()
    try:
        await asyncio.wait_for(subscriber.stdout.readline(), 30)  # "ready"
        started = time.monotonic()
        await asyncio.to_thread(produce, gen, args.events, args.chunk, positions)
        await publisher.flush()
        await bus.nc.flush()
        subscriber.stdin.write(b"published\n")
        await subscriber.stdin.drain()
        counts = json.loads(await asyncio.wait_for(subscriber.stdout.readline(), 60))
        return Result(
            name,
            counts["flows"],
            counts["last"] - started,
            lost=counts["lost"],
            dropped=dropped_flows() - dropped,
            kernel_lost=gen.lost(),
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await bus.close()
        if subscriber.returncode is None:
            subscriber.kill()
        await subscriber.wait()
        positions.close()
        gen.close()


def decode_run(name: str, args: argparse.Namespace, bcc: bool) -> Result:
    """Reading and decoding alone, no bus: RingBuffer polled, or bcc's ring_buffer_poll."""
    gen = FlowGenerator(args.ring_mib << 20)
    positions = RingBuffer(gen.ring_fd, gen.ring_bytes)
    baseline = BccSource(gen) if bcc else None
    decoder = Decoder(NODE)
    producer = threading.Thread(target=produce, args=(gen, args.events, args.chunk, positions))
    got = 0
    started = time.perf_counter()
    producer.start()
    try:
        while got < args.events:
            if baseline is not None:
                baseline.poll(10)
                flows = decoder.wire(baseline.drain_unpack(RECORD))
            else:
                flows = decoder.wire(positions.drain_unpack(RECORD, 8192))
                if not flows:
                    time.sleep(0.0001)
            got += len(flows)
        return Result(name, got, time.perf_counter() - started, kernel_lost=gen.lost())
    finally:
        producer.join()
        positions.close()
        gen.close()


async def run(args: argparse.Namespace) -> tuple[list[Result], list[Result]]:
    """(publisher, bcc publisher), (decoder, bcc decoder)."""
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        nats = ServerProcess("nats-server", NatsServer(Path(tmp) / "nats"))
        nats.start()
        try:
            published = [
                await publish_run(
                    "RingBuffer -> binary batches -> NATS", nats.url, args, False, "binary"
                ),
                await publish_run(
                    "RingBuffer -> JSON (before) -> NATS", nats.url, args, False, "json"
                ),
                await publish_run("bcc callback -> JSON -> NATS", nats.url, args, True, "json"),
            ]
            decoded = [
                await asyncio.to_thread(decode_run, "RingBuffer -> decode", args, False),
                await asyncio.to_thread(decode_run, "bcc callback -> decode", args, True),
            ]
            return published, decoded
        finally:
            nats.stop()


def report(published: list[Result], decoded: list[Result], args: argparse.Namespace) -> None:
    print(
        f"{'path':40} {'events':>9} {'seconds':>8} {'events/s':>10} {'lost':>5} {'dropped':>7} "
        f"{'ratio':>7}"
    )
    before = published[1]  # the JSON path, as the agent published until binary batches
    for r in published:
        print(
            f"{r.name:40} {r.events:9d} {r.seconds:8.2f} {r.rate:10.0f} "
            f"{r.kernel_lost:5d} {r.dropped:7d} {r.rate / before.rate:6.2f}x vs JSON"
        )
    for r in decoded:
        print(
            f"{r.name:40} {r.events:9d} {r.seconds:8.2f} {r.rate:10.0f} "
            f"{r.kernel_lost:5d} {r.dropped:7d} {r.rate / decoded[-1].rate:6.2f}x vs bcc"
        )
    ours = published[0]
    unaccounted = args.events - ours.events - ours.lost - ours.dropped
    met = ours.rate >= GOAL and unaccounted == 0
    print()
    print(
        f"binary: {ours.events} flows delivered, lost in the kernel {ours.kernel_lost} (counted "
        f"in batch headers, all stages: {ours.lost}), dropped by the publisher {ours.dropped}, "
        f"unaccounted {unaccounted}"
    )
    print(
        f"goal >= {GOAL:.0f} events/s ring buffer -> subscriber process, none unaccounted: "
        f"{ours.rate:.0f}/s ({ours.rate / GOAL:.2f} of the goal, {ours.rate / before.rate:.2f}x "
        f"the JSON path's {before.rate:.0f}/s) {'MET' if met else 'MISSED'}"
    )
    load = os.getloadavg()
    print(
        f"(host: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        "shared by the kernel producer, the publisher, nats-server and the subscriber; ring "
        f"buffer {args.ring_mib} MiB, the producer paced to its free space)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--ring-mib", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16384, help="events per BPF_PROG_TEST_RUN")
    parser.add_argument("--subscribe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribe:
        uvloop.run(subscribe())
        return
    if os.geteuid() != 0:
        sys.exit("bench/flows.py loads BPF programs: run it as root")
    report(*uvloop.run(run(args)), args)


if __name__ == "__main__":
    main()
