"""Every event the datapath produced is enriched by a monitor or counted lost at a named stage.

Real kernel events (bench/flows.py's generator, a BPF program run by BPF_PROG_TEST_RUN) in a
small ring buffer, a real FlowPublisher publishing binary batches to a real nats-server, and a
real monitor replica made deliberately slow (each batch takes 20 ms) with a short intake queue:
the kernel loses events (ring buffer full) and the monitor loses batches (intake full), and the
counts must add up to exactly what was produced, in the status and in the Prometheus counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from bench.flows import FlowGenerator
from membrane.servers import ServerProcess
from services.datapath.flow_publisher import FlowPublisher
from services.datapath.ringbuf import RingBuffer
from services.monitor.service import MonitorSettings, start
from shared.bus import Bus, flush_connection
from tests.conftest import eventually

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs: needs root"),
]

NODE = "node-counting"
PAGE = os.sysconf("SC_PAGE_SIZE")
STAGES = ("datapath", "agent", "bus", "monitor")


def lost_by_stage() -> dict[str, float]:
    return {
        stage: REGISTRY.get_sample_value("membrane_monitor_lost_events_total", {"stage": stage})
        or 0.0
        for stage in STAGES
    }


@pytest.fixture
def generator() -> Iterator[FlowGenerator]:
    gen = FlowGenerator(4 * PAGE)  # 292 records: bursts overflow it
    yield gen
    gen.close()


async def test_produced_is_enriched_plus_lost_by_stage_with_a_slow_monitor(
    nats_server: ServerProcess, bus: Bus, generator: FlowGenerator
) -> None:
    running = await start(
        MonitorSettings(nats_url=nats_server.url, replica="slow", ring_size=1000, queue_batches=2)
    )
    monitor = running.monitor
    process: Callable[[bytes], Awaitable[int]] = monitor.process

    async def slow_process(data: bytes) -> int:
        await asyncio.sleep(0.02)  # a replica far behind its intake
        return await process(data)

    monitor.process = slow_process  # type: ignore[method-assign]
    before = lost_by_stage()
    produced = 0
    try:
        with RingBuffer(generator.ring_fd) as ring:
            publisher = FlowPublisher(bus, NODE, ring, generator.lost, max_flows=64)
            task = asyncio.create_task(publisher.run())
            for _ in range(40):
                # bursts larger than the ring buffer, faster than the publisher reads it
                await asyncio.to_thread(generator.run, 500)
                produced += 500
                await asyncio.sleep(0.005)
            await publisher.flush()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        async def settled() -> None:
            assert monitor.flows_seen + monitor.flows_lost == produced

        await eventually(settled, timeout=30, what="every event enriched or counted lost")
    finally:
        await running.stop()

    lost = {stage: lost_by_stage()[stage] - before[stage] for stage in STAGES}
    assert generator.runs() == produced
    # both stages lost some: the test exercises what it claims to
    assert lost["datapath"] == generator.lost() > 0
    assert lost["monitor"] > 0
    assert monitor.flows_seen + sum(lost.values()) == produced
    assert sum(lost.values()) == monitor.flows_lost
    assert monitor.malformed == 0


def dropped_at_publish() -> float:
    name = "membrane_datapath_flows_dropped_total"
    return REGISTRY.get_sample_value(name, {"stage": "publish"}) or 0.0


async def test_batches_the_bus_did_not_take_are_counted_at_the_monitor_by_the_next_batch(
    nats_server: ServerProcess, bus: Bus
) -> None:
    """The agent's publish fails while the server is away; the count reaches the monitor in
    the header of the first batch that reaches it afterwards (stage ``bus``).

    Both clients reconnect on their own, in either order: a batch of only that count, sent
    the moment the agent is back, used to reach the server before the monitor had subscribed
    again in about 1 run of 20 under load (core NATS dropped it, and the count with it)."""
    gen = FlowGenerator(8 << 20)
    running = await start(
        MonitorSettings(nats_url=nats_server.url, replica="m1", ring_size=1000, queue_batches=64)
    )
    monitor = running.monitor
    agent = await Bus.connect(nats_server.url, "agent", retry_for=5)
    # no buffering while disconnected: publishes fail there, which is what this test is about
    # (a buffered batch would go out at the reconnect: see the test below for what reaches
    # no monitor)
    agent.nc._max_pending_size = 1
    before, dropped_before = lost_by_stage(), dropped_at_publish()
    try:
        with RingBuffer(gen.ring_fd) as ring:
            publisher = FlowPublisher(agent, NODE, ring, gen.lost, max_flows=64)
            task = asyncio.create_task(publisher.run())
            await asyncio.to_thread(gen.run, 1000)

            async def first() -> None:
                assert monitor.flows_seen == 1000

            await eventually(first, timeout=10, what="the first 1000 flows")
            nats_server.stop()

            async def away() -> None:
                # else the first batch could go into the dead socket, lost without a word
                assert not agent.nc.is_connected

            await eventually(away, timeout=10, what="the agent sees the server gone")
            await asyncio.to_thread(gen.run, 3000)

            async def failed() -> None:
                assert dropped_at_publish() - dropped_before == 3000

            await eventually(failed, timeout=10, what="3000 flows the bus did not take")
            nats_server.start()

            async def back() -> None:
                assert agent.nc.is_connected and running.bus.nc.is_connected
                # the monitor's subscription is back (its SUB before the PING: flush_connection)
                await asyncio.wait_for(flush_connection(running.bus.nc), 1)

            await eventually(back, timeout=20, what="both clients reconnected")
            await asyncio.to_thread(gen.run, 100)

            async def settled() -> None:
                assert monitor.flows_seen + monitor.flows_lost == 4100

            await eventually(settled, timeout=20, what="every event enriched or counted lost")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await agent.close()
        await running.stop()
        gen.close()
    lost = {stage: lost_by_stage()[stage] - before[stage] for stage in STAGES}
    assert lost == {"datapath": 0, "agent": 0, "bus": 3000, "monitor": 0}
    assert monitor.flows_seen == 1100


async def test_batches_no_monitor_received_are_counted_at_the_monitor_once_one_subscribes(
    nats_server: ServerProcess, bus: Bus
) -> None:
    """Core NATS drops a batch no replica is subscribed to without a word: nats-server's
    "no responders" status on the batch's reply subject tells the agent, which counts its flows
    at ``publish`` and carries the count until a batch reaches a monitor (stage ``bus``)."""
    gen = FlowGenerator(8 << 20)
    before, dropped_before = lost_by_stage(), dropped_at_publish()
    running = None
    try:
        with RingBuffer(gen.ring_fd) as ring, contextlib.ExitStack() as stack:
            publisher = FlowPublisher(bus, NODE, ring, gen.lost, max_flows=64)
            task = asyncio.create_task(publisher.run())
            stack.callback(task.cancel)
            await asyncio.to_thread(gen.run, 1000)

            async def unheard() -> None:
                assert dropped_at_publish() - dropped_before == 1000

            await eventually(unheard, timeout=10, what="1000 flows no monitor received")
            # subscribed at the server when start() returns; the count goes out by itself
            running = await start(
                MonitorSettings(nats_url=nats_server.url, replica="late", ring_size=1000)
            )
            monitor = running.monitor

            async def counted() -> None:
                assert monitor.flows_lost == 1000

            await eventually(counted, timeout=10, what="the 1000 flows counted lost")
            await asyncio.to_thread(gen.run, 100)

            async def settled() -> None:
                assert monitor.flows_seen + monitor.flows_lost == 1100

            await eventually(settled, timeout=10, what="every event enriched or counted lost")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        if running is not None:
            await running.stop()
        gen.close()
    lost = {stage: lost_by_stage()[stage] - before[stage] for stage in STAGES}
    assert lost == {"datapath": 0, "agent": 0, "bus": 1000, "monitor": 0}
    assert monitor.flows_seen == 100
    assert dropped_at_publish() - dropped_before == 1000
