"""The L7 proxy's flow batches against a real nats-server: a batch no monitor replica took
(nats-server's "no responders" status on its reply subject) is counted in the next batch's
``dropped_publish``, so the monitor counts its flows lost instead of their vanishing."""

from __future__ import annotations

import asyncio
import contextlib
from ipaddress import IPv4Address

from nats.aio.msg import Msg

from services.proxy.exchange import Conn
from services.proxy.service import FlowSink
from services.proxy.view import Verdict
from shared import l7_wire, subjects
from shared.bus import Bus
from shared.l7_wire import L7Batch
from shared.messages import L7Info
from tests.conftest import eventually

CONN = Conn(IPv4Address("10.7.0.5"), 40512, IPv4Address("10.7.0.6"), 80)
ALLOWED = Verdict(True, 257, 256, 3, "default/rule1", "ingress")


async def test_batches_no_monitor_took_are_counted_in_the_next(bus: Bus) -> None:
    sink = FlowSink(bus, "n1")
    running = asyncio.create_task(sink.run())
    try:

        async def watching() -> None:
            assert sink.unheard.watching

        await eventually(watching, timeout=5, what="the sink watching its replies")
        for _ in range(3):  # no monitor yet: nats-server delivers the batch to no one
            sink.add(CONN, ALLOWED, L7Info(protocol="http", method="GET", status=200))

        async def counted() -> None:
            assert sink.dropped_publish == 3

        await eventually(counted, timeout=5, what="the unheard batch counted")

        received: list[L7Batch] = []

        async def on_batch(msg: Msg) -> None:
            received.append(l7_wire.decode(msg.data))

        sub = await bus.nc.subscribe(subjects.flows("n1"), cb=on_batch)
        await bus.flush()
        sink.add(CONN, ALLOWED, L7Info(protocol="http", method="GET", status=200))

        async def arrived() -> None:
            assert sum(len(b.records) for b in received) >= 1

        await eventually(arrived, timeout=5, what="the new flow at the subscriber")
        await asyncio.sleep(0.2)  # (a later batch would carry nothing more)
        await sub.unsubscribe()
        # every flow either arrived or is said lost, once
        assert sum(len(b.records) for b in received) == 1
        assert sum(b.dropped_publish for b in received) == 3
        assert sink.dropped_publish == 0
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await sink.unheard.stop()
