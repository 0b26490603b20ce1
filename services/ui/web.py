"""The UI's HTTP side (aiohttp): static page, JSON views, and the live stream (server-sent
events).

- ``/``, ``/static/*``: the page, plain HTML, JS and SVG shipped in this package (no CDN);
- ``/api/namespaces``: namespaces with pods (``endpoints`` bucket);
- ``/api/map?namespace=&since=``: the service map of the recorded flows
  (:func:`views.service_map`);
- ``/api/flows?<observe's filters>&last=&since=``: flows, newest first;
- ``/api/nodes``: the health matrix of ``membrane status``;
- ``/api/events?namespace=``: every 250 ms a batch (:class:`live.LiveView`): edge counts, a
  sample of the flows, the rate, and whether a monitor replica answers. The flow batches are
  taken from the bus only while such a stream is open.

Every batch doubles as a heartbeat: the page marks what it shows as not live when batches stop
(the UI service is away) or say ``monitor: false`` (no monitor replica answers, checked every
second), and reloads the map when they resume or when ``monitors`` (the replicas' ids) changes,
since a restarted replica's ring starts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.ui import views
from services.ui.live import LiveView
from services.ui.service import UISettings
from shared import __version__, startup, subjects
from shared.bus import Bus, redact
from shared.errors import InvalidArgument, MembraneError
from shared.flow_api import FlowFilterTerm, FlowQuery, decode_flow_batch
from shared.messages import Endpoint, Node, NodeHealth
from shared.recorded_flows import query, recorded_groups
from shared.runtime import TaskGroup, periodically, wait_for_shutdown

STATIC = Path(__file__).with_name("static")
TICK_S = 0.25
MONITOR_CHECK_S = 1.0
DEFAULT_SINCE_S = 3600.0
FLOWS_SHOWN = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def _errors(handler: Handler) -> Handler:
    """A user's mistake is a 400 naming the field; the cluster away is a 503; both JSON."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidArgument as exc:
            return _json({"error": str(exc), "field": exc.field}, 400)
        except (MembraneError, nats.errors.Error, TimeoutError) as exc:
            return _json({"error": str(exc) or type(exc).__name__}, 503)

    return wrapped


def _seconds(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{raw!r} is not a number of seconds", field=name) from None
    if value <= 0:
        raise InvalidArgument("must be positive", field=name)
    return value


def _namespace_terms(request: web.Request) -> list[FlowFilterTerm]:
    namespace = request.query.get("namespace", "")
    return [FlowFilterTerm(field="namespace", values=[namespace])] if namespace else []


class UIServer:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.views: set[LiveView] = set()
        self.monitor_up = False
        self.monitors = ""  # the replicas' ids: a new one is a restarted replica, its ring empty
        self.closing = asyncio.Event()  # ends the streams (which never end by themselves)
        # the flow batches, taken only while a page watches the live stream: every node's
        # flows, each costing this process and nats-server their bytes, for no one otherwise
        self.subscription: Subscription | None = None
        self._following = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/namespaces", _errors(self.namespaces))
        app.router.add_get("/api/map", _errors(self.service_map))
        app.router.add_get("/api/flows", _errors(self.flows))
        app.router.add_get("/api/nodes", _errors(self.nodes))
        app.router.add_get("/api/events", self.events)
        return app

    async def index(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _bucket(self, name: str) -> dict[str, bytes]:
        try:
            kv = await self.bus.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return {}
        return await Bus.snapshot(kv)

    async def namespaces(self, _: web.Request) -> web.Response:
        found = set()
        for raw in (await self._bucket(subjects.KV_ENDPOINTS)).values():
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                found.add(msgspec.json.decode(raw, type=Endpoint).namespace)
        return _json(sorted(found))

    async def service_map(self, request: web.Request) -> web.Response:
        since = time.time() - _seconds(request, "since", DEFAULT_SINCE_S)
        recorded = await recorded_groups(self.bus, since=since, filters=_namespace_terms(request))
        return _json({**views.service_map(recorded.groups), "flows": recorded.flows})

    async def flows(self, request: web.Request) -> web.Response:
        terms = views.filters(request.query)
        last = int(_seconds(request, "last", FLOWS_SHOWN))
        since = time.time() - _seconds(request, "since", 0) if "since" in request.query else 0.0
        found = await query(self.bus, FlowQuery(filters=terms, last=last, since=since))
        return _json(views.flow_rows(found))

    async def nodes(self, _: web.Request) -> web.Response:
        nodes = [
            msgspec.json.decode(raw, type=Node)
            for raw in (await self._bucket(subjects.KV_NODES)).values()
        ]
        health = [
            msgspec.json.decode(raw, type=NodeHealth)
            for raw in (await self._bucket(subjects.KV_HEALTH)).values()
        ]
        return _json(views.health_matrix(nodes, health))

    async def events(self, request: web.Request) -> web.StreamResponse:
        view = LiveView(request.query.get("namespace", ""))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        self.views.add(view)
        try:
            await self.follow_flows()
            await response.write(b"retry: 1000\n\n")  # the browser reconnects after 1 s
            while not self.closing.is_set():
                batch = view.take(time.time(), self.monitor_up)
                batch["monitors"] = self.monitors
                await response.write(b"data: " + json.dumps(batch).encode() + b"\n\n")
                await asyncio.sleep(TICK_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.views.discard(view)
            with contextlib.suppress(asyncio.CancelledError):
                await self.follow_flows()
        return response

    async def follow_flows(self) -> None:
        """Subscribed to the flow batches while there is a live view, not otherwise."""
        async with self._following:
            if self.views and self.subscription is None and not self.closing.is_set():
                self.subscription = await self.bus.subscribe(
                    subjects.EVENTS_FLOW_BATCHES_ALL, self.on_flow
                )
            elif not self.views and self.subscription is not None:
                subscription, self.subscription = self.subscription, None
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def on_flow(self, msg: Msg) -> None:
        if not self.views:
            return
        try:
            flows = decode_flow_batch(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for view in self.views:
            for flow in flows:
                view.offer(flow)

    async def check_monitor(self) -> None:
        try:
            replicas = await self.bus.discover(subjects.MONITOR_SERVICE)
        except (nats.errors.Error, TimeoutError):
            replicas = []
        self.monitor_up = bool(replicas)
        self.monitors = ",".join(sorted(info.id for info in replicas))


async def run(settings: UISettings) -> None:
    started = await startup.start(settings, "ui")
    bus, logger = started.bus, started.log
    server = UIServer(bus)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    # bound here so that port 0 is known (the URL goes into the micro metadata)
    listener = socket.create_server((settings.ui_host, settings.ui_port))
    await web.SockSite(runner, listener).start()
    url = f"http://{settings.ui_host}:{listener.getsockname()[1]}/"
    await server.check_monitor()
    tasks = TaskGroup()
    tasks.spawn("monitor-check", lambda: periodically(MONITOR_CHECK_S, server.check_monitor))
    await bus.add_service(
        subjects.UI_SERVICE,
        __version__,
        "the web UI: service map, flows, nodes",
        {"url": url, **started.metadata},
        queue_group=subjects.UI_SERVICE,
    )
    logger.info("ui ready", url=url, nats=redact(settings.nats_url))
    signal_name = await wait_for_shutdown()
    logger.info("shutting down", signal=signal_name)
    server.closing.set()  # else the shutdown waits for the streams, still saying "live"
    server.views.clear()
    await server.follow_flows()
    await tasks.close()
    await runner.cleanup()
    await bus.close()
