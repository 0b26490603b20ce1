"""The UI's live stream at 5,000 flows/s: does the page's feed keep up, and say it samples?

A real nats-server; the UI service's HTTP side (``services.ui.web.UIServer``) in this process
on a free port; a publisher sending enriched flows on
``membrane.events.flowbatches.<verdict>.<ns>`` (a batch of one each: the UI's worst case) at
``--rate`` for ``--seconds`` (each its own connection, a third of them drops); and a client
reading ``/api/events`` as the page does. Printed: flows published, the connection count the
page's edges add up to (must be all of them), the flows the page got for its list (a sample),
batches that said ``sampled``, and the longest gap between batches (the page's idea of live).
Publisher, UI and client share one event loop and one core: the UI alone has more room.

    python bench/ui.py [--rate 5000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.runtime import unblock_aiohttp

unblock_aiohttp()  # the membrane package hides it from nats.py for the CLI's start-up

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
from aiohttp import web  # noqa: E402

from membrane.servers import NatsServer, ServerProcess  # noqa: E402
from services.ui.web import UIServer  # noqa: E402
from shared import subjects  # noqa: E402
from shared.bus import Bus  # noqa: E402
from shared.flow_api import EnrichedFlow, FlowPeer  # noqa: E402

BATCH = 50  # flows published per tick of the publisher


def make_flow(i: int) -> tuple[str, bytes]:
    """Flow ``i``: its own connection (source address and port), a third of them drops."""
    dropped = i % 3 == 0
    flow = EnrichedFlow(
        time=time.time(),
        node="node-1",
        type="drop" if dropped else "trace",
        verdict="DROPPED" if dropped else "FORWARDED",
        drop_reason=133 if dropped else 0,
        protocol="TCP",
        source=FlowPeer(
            ip=f"10.1.{i // 60_000 % 250}.{i % 7 + 2}",
            port=1024 + i % 60_000,
            identity=300 + i % 7,
            namespace="bench",
            pod=f"client-{i % 7}",
        ),
        destination=FlowPeer(ip="10.0.9.9", port=80, identity=400, namespace="bench", pod="db"),
    )
    return subjects.event_flow_batches(flow.verdict, "bench"), msgspec.json.encode(flow) + b"\n"


async def publish(bus: Bus, rate: int, seconds: float) -> int:
    sent, started = 0, time.monotonic()
    total = int(rate * seconds)
    while sent < total:
        for _ in range(BATCH):
            subject, body = make_flow(sent)
            await bus.nc.publish(subject, body)
            sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    await bus.flush()
    return sent


async def read_stream(
    url: str, stop: asyncio.Event, opened: asyncio.Event, into: dict[str, float]
) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        last = time.monotonic()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            batch = json.loads(line[6:])
            opened.set()
            now = time.monotonic()
            if into["batches"]:
                into["max_gap"] = max(into["max_gap"], now - last)
            last = now
            into["batches"] += 1
            into["counted"] += sum(e["count"] for e in batch["edges"])
            into["shown"] += len(batch["flows"])
            into["sampled"] += 1 if batch["sampled"] else 0
            into["peak_rate"] = max(into["peak_rate"], batch["rate"])
            if stop.is_set() and not batch["edges"]:
                return


async def main_async(rate: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = ServerProcess("nats-server", NatsServer(Path(tmp) / "nats"))
        nats.start()
        try:
            ui_bus = await Bus.connect(nats.url, "bench-ui", retry_for=10)
            publisher = await Bus.connect(nats.url, "bench-publisher", retry_for=10)
            server = UIServer(ui_bus)
            server.monitor_up = True  # no monitor here: the stream is what is measured
            await ui_bus.nc.subscribe(subjects.EVENTS_FLOW_BATCHES_ALL, cb=server.on_flow)
            await ui_bus.flush()
            runner = web.AppRunner(server.app(), access_log=None)
            await runner.setup()
            listener = socket.create_server(("127.0.0.1", 0))
            await web.SockSite(runner, listener).start()
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/events?namespace=bench"
            seen = dict.fromkeys(("batches", "counted", "shown", "sampled", "max_gap"), 0.0)
            seen["peak_rate"] = 0.0
            stop, opened = asyncio.Event(), asyncio.Event()
            reader = asyncio.create_task(read_stream(url, stop, opened, seen))
            await asyncio.wait_for(opened.wait(), 10)  # the client's stream is open
            started = time.monotonic()
            sent = await publish(publisher, rate, seconds)
            took = time.monotonic() - started
            stop.set()
            await asyncio.wait_for(reader, 10)
            await runner.cleanup()
            await publisher.close()
            await ui_bus.close()
        finally:
            nats.stop()
    print(f"UI live stream: {sent:,} flows in {took:.1f} s ({sent / took:,.0f} flows/s)")
    print(f"  counted on the page's edges   {int(seen['counted']):,} (must equal the flows)")
    print(f"  flows sent for the list       {int(seen['shown']):,} (a sample)")
    batches, sampled = int(seen["batches"]), int(seen["sampled"])
    print(f"  batches                       {batches}, {sampled} said sampled")
    print(f"  longest gap between batches   {seen['max_gap'] * 1000:.0f} ms (stale after 3,000)")
    print(f"  peak rate the page was told   {seen['peak_rate']:,.0f} flows/s")
    print(f"  keeps up: {'yes' if int(seen['counted']) == sent and seen['max_gap'] < 1 else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.rate, args.seconds))


if __name__ == "__main__":
    main()
