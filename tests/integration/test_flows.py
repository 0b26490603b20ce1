"""Flow events from a real BPF ring buffer, through RingBuffer and the decoder, onto NATS.

A test program (bpf/flow_gen.c, compiled with bcc against services/datapath/bpf/events.h)
writes one ``struct flow_event`` per run; BPF_PROG_TEST_RUN with ``repeat`` = N makes the
kernel run it N times. Every field derives from the run number (carried in rule_id), so each
decoded flow is checked whole against :func:`expected_flow`.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from bench.flows import FlowGenerator
from membrane.servers import ServerProcess
from services.datapath.flow_publisher import FlowPublisher
from services.datapath.ringbuf import RingBuffer
from shared import flow_wire, subjects
from shared.bus import Bus
from shared.flow_decode import RECORD, Decoder, decode_events, to_flow
from shared.messages import Flow, FlowBatch
from tests.conftest import eventually

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs: needs root"),
]

NODE = "node-flows"
PAGE = os.sysconf("SC_PAGE_SIZE")
RECORD_BYTES = RECORD.size  # a flow_event and its ring buffer header

# what flow_gen.c derives from run number n, written out independently of the decoder
DROP_REASONS = [133, 181, 158, 183, 134, 250]
REASON_NAMES = {
    0: "",
    133: "Policy denied",
    181: "Policy denied by denylist",
    158: "Service backend not found",
    183: "Incorrect VNI from VTEP",
    134: "Invalid packet",
    250: "Unknown reason 250",
}
PROTOCOLS = [(6, "TCP"), (17, "UDP"), (1, "ICMP"), (132, "132")]
TCP_FLAGS = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]


def expected_flow(n: int, flow_time: float) -> Flow:
    kind = n % 3 + 1
    flags = (n // 3) % 4
    number, protocol = PROTOCOLS[n % 4]
    if kind == 1:
        reason = DROP_REASONS[(n // 3) % 6]
    elif kind == 3 and not flags & 2:
        reason = 133
    else:
        reason = 0
    tcp = (n >> 2) & 0xFF if number == 6 else 0
    return Flow(
        time=flow_time,
        node=NODE,
        type=["drop", "trace", "policy-verdict"][kind - 1],
        verdict="FORWARDED" if kind == 2 or (kind == 3 and flags & 2) else "DROPPED",
        reason=reason,
        reason_name=REASON_NAMES[reason],
        direction=["ingress", "egress"][n % 2],
        observation_point=["from-endpoint", "to-endpoint"][(n // 2) % 2],
        src_ip="10.1.2.3",  # from the test packet
        dst_ip=f"10.0.{(n >> 8) & 0xF}.{n & 0xFF}",
        src_port=n & 0xFFFF,
        dst_port=8080,  # from the test packet
        protocol=protocol,
        tcp_flags=[name for bit, name in enumerate(TCP_FLAGS) if tcp & (1 << bit)],
        src_identity=256 + n % 1000,
        dst_identity=((n >> 8) + 1) & 0xFFFFFFFF,
        ifindex=1,  # BPF_PROG_TEST_RUN's skb is on the loopback device
        rule_id=n & 0xFFFFFFFF,
        is_reply=bool(flags & 1),
        bytes=64,  # the test packet's length
    )


def check_flows(flows: list[Flow], runs: list[int], since: float, until: float) -> None:
    """``flows`` are exactly the events of ``runs``, in order, timed within [since, until]."""
    assert [f.rule_id for f in flows] == runs
    assert flows == [expected_flow(n, f.time) for n, f in zip(runs, flows, strict=True)]
    times = [f.time for f in flows]
    assert times == sorted(times)
    assert since - 0.005 <= times[0] and times[-1] <= until + 0.005, (since, times, until)


@pytest.fixture
def generators() -> Iterator[Callable[..., FlowGenerator]]:
    """Compile flow_gen.c with the given ring buffer size and knobs; cleaned up afterwards."""
    made: list[FlowGenerator] = []

    def make(ring_bytes: int, **defines: int) -> FlowGenerator:
        made.append(FlowGenerator(ring_bytes, **defines))
        return made[-1]

    yield make
    for gen in made:
        gen.close()


def drain_all(ring: RingBuffer) -> list[tuple[int, ...]]:
    records: list[tuple[int, ...]] = []
    while chunk := ring.drain_unpack(RECORD, 10_000):
        records.extend(chunk)
    return records


# --- RingBuffer and the decoder --------------------------------------------------------------


def test_100k_events_come_out_exactly_as_written(
    generators: Callable[..., FlowGenerator],
) -> None:
    gen = generators(8 << 20, DISCARD_EVERY=7)
    count = 100_000
    since = time.time()
    gen.run(count)
    until = time.time()
    assert gen.runs() == count
    with RingBuffer(gen.ring_fd, 8 << 20) as ring:
        assert ring.pending() == count * RECORD_BYTES  # discarded records take room too
        records = drain_all(ring)
        assert ring.pending() == 0
        assert ring.malformed == 0
    assert gen.lost() == 0
    flows = [to_flow(w) for w in Decoder(NODE).wire(records)]
    check_flows(flows, [n for n in range(count) if n % 7 != 6], since, until)


def test_drain_as_bytes_and_decode_events(generators: Callable[..., FlowGenerator]) -> None:
    gen = generators(1 << 20)
    since = time.time()
    gen.run(5000)
    until = time.time()
    with RingBuffer(gen.ring_fd) as ring:  # the size comes from the map itself
        assert ring.size == 1 << 20
        first = ring.drain(max_records=1000)
        rest = ring.drain()
        assert ring.drain() == []
    assert len(first) == 1000 and {len(r) for r in first + rest} == {48}
    check_flows(decode_events(first + rest, NODE), list(range(5000)), since, until)


def read_while_written(
    gen: FlowGenerator, count: int, unpack: bool
) -> tuple[RingBuffer, list[int], list[int]]:
    """Run the generator in a thread while draining: (ring, event run numbers, odd ones).

    Writer and reader are pinned to different CPUs, so that they do run at the same time.
    """
    cpus = sorted(os.sched_getaffinity(0))
    ring = RingBuffer(gen.ring_fd)

    def write() -> None:
        os.sched_setaffinity(0, {cpus[-1]})  # 0: this thread
        gen.run(count)

    writer = threading.Thread(target=write)
    events: list[int] = []
    odd: list[int] = []
    os.sched_setaffinity(0, {cpus[0]})
    writer.start()
    try:
        while writer.is_alive() or ring.pending():
            if unpack:
                events.extend(r[-2] for r in ring.drain_unpack(RECORD, 4096))
                continue
            for record in ring.drain(4096):
                if len(record) == 48:
                    events.append(struct.unpack_from("=I", record, 40)[0])
                else:
                    odd.append(struct.unpack("=QQ", record)[0])
    finally:
        writer.join()
        os.sched_setaffinity(0, set(cpus))
        ring.close()
    return ring, events, odd


@pytest.mark.parametrize("unpack", [True, False], ids=["drain_unpack", "drain"])
def test_a_concurrent_reader_waits_for_busy_records_and_skips_discarded_and_malformed(
    generators: Callable[..., FlowGenerator], unpack: bool
) -> None:
    """The kernel writes while we read: a record still being written stops a drain.

    The program spins between reserve and submit to widen that window; whether the reader
    looks meanwhile is up to the scheduler (and the machine's load), so the run is repeated
    until it has. Every run must read exactly what was written.
    """
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("reading while the kernel writes needs two CPUs")
    count, attempts = 3000, 20
    gen = generators(1 << 20, SPIN=1000, DISCARD_EVERY=7, MALFORMED_EVERY=5)
    for base in range(0, attempts * count, count):
        ring, events, odd = read_while_written(gen, count, unpack)
        kept = [n for n in range(base, base + count) if n % 7 != 6]
        assert events == [n for n in kept if n % 5 != 4]
        if unpack:
            assert ring.malformed == len([n for n in kept if n % 5 == 4])
        else:
            assert odd == [n for n in kept if n % 5 == 4]
        assert gen.lost() == 0
        if ring.busy:
            break
    assert ring.busy > 0, f"in {attempts} runs, the reader never met a record being written"


def test_a_full_ring_buffer_counts_lost_events(generators: Callable[..., FlowGenerator]) -> None:
    gen = generators(PAGE)
    fits = PAGE // RECORD_BYTES
    gen.run(200)
    assert gen.lost() == 200 - fits
    with RingBuffer(gen.ring_fd) as ring:
        assert [r[-2] for r in drain_all(ring)] == list(range(fits))
        gen.run(10)  # room again
        assert [r[-2] for r in drain_all(ring)] == list(range(200, 210))
    assert gen.lost() == 200 - fits


def test_a_map_that_is_not_a_ring_buffer_is_refused(
    generators: Callable[..., FlowGenerator],
) -> None:
    gen = generators(PAGE)
    with pytest.raises(ValueError, match="not a ringbuf"):
        RingBuffer(int(gen.bpf[b"runs"].map_fd))
    with pytest.raises(ValueError, match=f"has {PAGE} bytes"):
        RingBuffer(gen.ring_fd, 2 * PAGE)


# --- FlowPublisher on a real nats-server ------------------------------------------------------


@dataclass
class Received:
    """Batches as a subscriber on membrane.flows.<node> gets them, with arrival times."""

    batches: list[FlowBatch] = field(default_factory=list)
    at: list[float] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        self.batches.append(as_flow_batch(msg.data))
        self.at.append(time.monotonic())

    @property
    def flows(self) -> list[Flow]:
        return [f for b in self.batches for f in b.flows]

    async def until(self, flows: int = 0, lost: int = 0, timeout: float = 5.0) -> None:
        async def probe() -> None:
            assert len(self.flows) >= flows and sum(b.lost for b in self.batches) >= lost

        await eventually(probe, timeout=timeout, what=f"{flows} flows and {lost} lost")


def as_flow_batch(data: bytes) -> FlowBatch:
    """A batch as the monitor reads it, binary (its stages' counts summed) or JSON."""
    if not flow_wire.is_binary(data):
        return msgspec.json.decode(data, type=FlowBatch)
    batch = flow_wire.decode(data)
    wire = Decoder(batch.node).wire(batch.unpack(), batch.clock_offset_ns)
    lost = batch.lost + batch.dropped_queue + batch.dropped_publish
    return FlowBatch(node=batch.node, flows=[to_flow(f) for f in wire], lost=lost)


async def subscribe(bus: Bus) -> Received:
    received = Received()
    await bus.nc.subscribe(subjects.flows(NODE), cb=received.on_message)
    await bus.nc.flush()
    return received


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dropped() -> float:
    """The publisher's drops at every stage."""
    name = "membrane_datapath_flows_dropped_total"
    return counter(name, stage="queue") + counter(name, stage="publish")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("wire", ["binary", "json"])
async def test_batches_of_512_then_the_rest_max_delay_after_its_first_flow(
    bus: Bus, generators: Callable[..., FlowGenerator], wire: str
) -> None:
    gen = generators(8 << 20)
    received = await subscribe(bus)
    published = counter("membrane_datapath_flows_published_total")
    batches = counter("membrane_datapath_flow_batches_total")
    with RingBuffer(gen.ring_fd) as ring:
        # a max_delay of 0.5 s (50 ms by default) keeps "sent at once" and "sent when the delay
        # is up" apart on a loaded machine, where a full batch took 68 ms once
        publisher = FlowPublisher(
            bus, NODE, ring, gen.lost, wire=wire, max_flows=512, max_delay=0.5
        )
        task = asyncio.create_task(publisher.run())
        await asyncio.sleep(0.1)  # the publisher is reading
        since = time.time()
        gen.run(1300)
        written = time.monotonic()
        until = time.time()
        await received.until(flows=1300)
        await stop(task)
    assert [len(b.flows) for b in received.batches] == [512, 512, 276]
    assert all(b.node == NODE and b.lost == 0 for b in received.batches)
    full, rest = received.at[1] - written, received.at[2] - written
    assert full < 0.25 and 0.45 <= rest < 2.0, (full, rest)
    check_flows(received.flows, list(range(1300)), since, until)
    assert counter("membrane_datapath_flows_published_total") - published == 1300
    assert counter("membrane_datapath_flow_batches_total") - batches == 3


async def test_events_the_ring_buffer_could_not_take_are_reported_as_lost(
    bus: Bus, generators: Callable[..., FlowGenerator]
) -> None:
    gen = generators(PAGE)
    fits = PAGE // RECORD_BYTES
    received = await subscribe(bus)
    with RingBuffer(gen.ring_fd) as ring:
        publisher = FlowPublisher(bus, NODE, ring, gen.lost)
        gen.run(200)  # nobody reads yet: the ring buffer overflows
        task = asyncio.create_task(publisher.run())
        await received.until(flows=fits, lost=200 - fits)
        await stop(task)
    assert [(len(b.flows), b.lost) for b in received.batches] == [(fits, 200 - fits)]
    assert [f.rule_id for f in received.flows] == list(range(fits))


async def test_a_lost_count_without_flows_goes_out_alone(
    bus: Bus, generators: Callable[..., FlowGenerator]
) -> None:
    gen = generators(PAGE)
    lost = 10  # counted before the publisher started: not reported
    received = await subscribe(bus)
    with RingBuffer(gen.ring_fd) as ring:
        task = asyncio.create_task(FlowPublisher(bus, NODE, ring, lambda: lost).run())
        await asyncio.sleep(0.2)
        assert received.batches == []
        lost = 15
        await received.until(lost=5)
        lost = 22
        await received.until(lost=12)
        await stop(task)
    assert [(b.flows, b.lost) for b in received.batches] == [([], 5), ([], 7)]


async def test_flush_publishes_at_once(bus: Bus, generators: Callable[..., FlowGenerator]) -> None:
    gen = generators(PAGE)
    received = await subscribe(bus)
    with RingBuffer(gen.ring_fd) as ring:
        publisher = FlowPublisher(bus, NODE, ring, gen.lost)  # not running
        since = time.time()
        gen.run(3)
        await publisher.flush()
        await bus.nc.flush()
        await received.until(flows=3)
    check_flows(received.flows, [0, 1, 2], since, time.time())


async def test_without_the_bus_flows_are_dropped_and_counted_then_it_resumes(
    bus: Bus, nats_server: ServerProcess, generators: Callable[..., FlowGenerator]
) -> None:
    gen = generators(8 << 20)
    received = await subscribe(bus)
    dropped_before = dropped()
    with RingBuffer(gen.ring_fd) as ring:
        task = asyncio.create_task(FlowPublisher(bus, NODE, ring, gen.lost).run())
        nats_server.stop()

        async def drops() -> None:
            # more than the client buffers while it reconnects (2 MiB, ~5500 flows)
            await asyncio.to_thread(gen.run, 2000)
            assert dropped() > dropped_before

        await eventually(drops, timeout=20, what="dropped flows")
        assert not task.done()
        nats_server.start()
        await asyncio.sleep(0.5)
        last = gen.runs()

        async def resumed() -> None:
            await asyncio.to_thread(gen.run, 1)
            await asyncio.sleep(0.1)
            assert any(f.rule_id >= last for f in received.flows)

        await eventually(resumed, timeout=20, what="flows after the bus came back")
        await stop(task)
    assert gen.lost() == 0
