"""The UI's live stream against a real nats-server: the flow batches reach the UI service only
while a page has the stream open (counted by the UI's own NATS client), and a batch published
then is on the page's next tick."""

from __future__ import annotations

import asyncio
import json
import socket

import msgspec
from aiohttp import ClientResponse, ClientSession, web

from membrane.servers import ServerProcess
from services.ui.web import UIServer
from shared import subjects
from shared.bus import Bus
from shared.flow_api import EnrichedFlow, FlowPeer
from tests.conftest import eventually

FLOW = EnrichedFlow(
    time=1.0, node="n1", type="trace", verdict="FORWARDED", protocol="TCP",
    source=FlowPeer(ip="10.0.0.1", pod="a", namespace="ns", identity=300, port=40000),
    destination=FlowPeer(ip="10.0.0.2", pod="b", namespace="ns", identity=400, port=80),
)  # fmt: skip
BATCH = msgspec.json.encode(FLOW) + b"\n"  # one line, as the monitor republishes them
SUBJECT = subjects.event_flow_batches("FORWARDED", "ns")


async def _arrivals(bus: Bus, ui_bus: Bus, batches: int = 3) -> int:
    """Messages the UI's client took while ``batches`` flow batches were published (both
    connections flushed: whatever nats-server delivers has arrived)."""
    before = ui_bus.nc.stats["in_msgs"]
    for _ in range(batches):
        await bus.nc.publish(SUBJECT, BATCH)
    await bus.flush()
    await ui_bus.flush()
    return int(ui_bus.nc.stats["in_msgs"] - before)


async def _edge_on_page(stream: ClientResponse, bus: Bus) -> int:
    await bus.nc.publish(SUBJECT, BATCH)
    async with asyncio.timeout(1):
        while True:
            raw = await stream.content.readline()
            if raw.startswith(b"data: "):
                edges = json.loads(raw[6:])["edges"]
                if edges:
                    return int(edges[0]["count"])


async def test_flow_batches_reach_the_ui_only_while_a_page_watches(
    nats_server: ServerProcess, bus: Bus
) -> None:
    ui_bus = await Bus.connect(nats_server.url, "ui-test")
    server = UIServer(ui_bus)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/events"
    try:
        assert await _arrivals(bus, ui_bus) == 0  # no page: nothing sent to the UI
        async with ClientSession() as session, session.get(url) as stream:

            async def subscribed() -> None:
                assert await _arrivals(bus, ui_bus) == 3

            await eventually(subscribed, timeout=5, what="the batches reaching the UI")
            count = await eventually(
                lambda: _edge_on_page(stream, bus), timeout=10, what="a flow on the page"
            )
            assert count >= 1

        async def unsubscribed() -> None:
            assert await _arrivals(bus, ui_bus) == 0

        await eventually(unsubscribed, timeout=5, what="the batches no longer reaching the UI")
    finally:
        server.closing.set()
        await runner.cleanup()
        await ui_bus.close()
