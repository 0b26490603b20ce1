"""``membrane run proxy --node NAME``: the node's L7 proxy, in the node's network namespace.

It watches the ``ipcache``, ``resolved`` and ``selectors`` buckets (each change applied to the
:class:`View` by itself, nothing recomputed), and only once all three are caught up does it
listen on ``PROXY_PORT``: until then the datapath finds no listener and drops L7 connections
(178 "Socket lookup failed"). The listener is transparent (``IP_TRANSPARENT``: it answers for
the original destination address) and has no ``SO_REUSEPORT`` (``bpf_sk_assign`` refuses
reuseport sockets). Each connection is served by the protocol its port's rules or its first
bytes name (``connection.py``); each request becomes a flow (type ``l7``) on
``membrane.flows.<node>``. The DNS proxy (:mod:`services.proxy.dns`) listens on
``DNS_PROXY_PORT`` from the same moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from services.proxy import prefork
from services.proxy.connection import accepting
from services.proxy.dns import DnsProxy
from services.proxy.exchange import Conn
from services.proxy.fqdn_cache import FQDNCaches
from services.proxy.fqdn_publish import FQDNPublisher
from services.proxy.kafka import TOPIC_IDS
from services.proxy.pool import UpstreamPool
from services.proxy.sockets import BACKLOG, BIND_WAIT_S, listener
from services.proxy.tally import Recorder, Tally
from services.proxy.view import Verdict, View
from shared import (
    __version__,
    agent_api,
    ipcache_guard,
    l7_wire,
    log,
    metrics,
    proxy,
    startup,
    subjects,
)
from shared.bus import Bus
from shared.config import CommonSettings, require_at_least, setting
from shared.kv_watch import BucketWatches
from shared.l7_wire import L7Batch, L7Record
from shared.messages import FQDNCleanRequest, L7Info
from shared.runtime import TaskGroup, enter_netns, periodically, wait_for_shutdown
from shared.unheard import UnheardBatches

FLUSH_S = 0.05
MAX_BATCH = 512

Handler = Callable[[str, bytes | None], None]  # a bucket's change: key, value or None


@dataclasses.dataclass(frozen=True)
class ProxySettings(CommonSettings):
    node: str = setting("", "name of the node this proxy serves (required)")
    netns: str = setting(
        "", "network namespace to enter at start (name under /run/netns, or a path)"
    )
    proxy_port: int = setting(proxy.PROXY_PORT, "port of the transparent listener in the node")
    dns_proxy_port: int = setting(proxy.DNS_PROXY_PORT, "port of the DNS proxy (UDP and TCP)")
    proxy_processes: int = setting(
        0,
        "processes that serve L7 connections, all from the one listener (0: one per CPU the "
        "proxy may run on, at most 4)",
    )
    fqdn_min_ttl: int = setting(
        0, "seconds a learned address stays allowed at least, whatever its TTL (tofqdns-min-ttl)"
    )
    fqdn_grace: float = setting(
        5.0, "seconds an address stays allowed after its TTL ended, for clients that just asked"
    )
    fqdn_max_ips_per_name: int = setting(
        50,
        "addresses kept per endpoint and name, the oldest out first "
        "(tofqdns-endpoint-max-ip-per-hostname)",
    )
    fqdn_policy_wait: float = setting(
        2.0,
        "seconds a DNS answer waits at most for its addresses to reach the policy (then the pod "
        "gets SERVFAIL)",
    )
    agent_socket: str = setting(
        "", "the node agent's socket (its fqdn socket is beside it; default per node)"
    )
    fqdn_fast: bool = setting(
        True,
        "ask the node's agent to install learned addresses before answering (off: wait for the "
        "cluster-wide path only)",
    )

    def __post_init__(self) -> None:
        require_at_least(self, 0, "proxy_processes")


class FlowSink:
    """L7 flows to the monitor, batched like the datapath's in the compact L7 wire
    (:mod:`shared.l7_wire`); the metrics of their requests counted here and handed on with each
    batch (every ``FLUSH_S`` at most): to Prometheus in the leader, to the leader in a worker
    (``forward``). A batch the bus did not take, or that reached no monitor replica
    (:mod:`shared.unheard`), is counted in the next one."""

    def __init__(
        self,
        bus: Bus,
        node: str,
        forward: Callable[[Tally], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.node = node
        self.flows: list[L7Record] = []
        self.wake = asyncio.Event()
        self._tally = Tally()  # since the last batch
        self.forward = forward
        self.recorder = Recorder()
        self.accepted = 0  # connections, likewise
        self.pool: UpstreamPool | None = None  # its reuses counted, likewise
        self._reused = 0
        self.dropped_publish = 0  # flows the bus did not take, for the next batch to say
        # batches nats-server delivered to no one (no monitor replica subscribed): their flows,
        # and the count they carried, go in the next batch's dropped_publish as well
        self.unheard: UnheardBatches[int] = UnheardBatches(self._not_taken)

    def add(self, conn: Conn, verdict: Verdict, l7: L7Info) -> None:
        outcome = "FORWARDED" if verdict.allowed else "DROPPED"
        key = (l7.protocol, outcome, verdict.direction or "none")
        tally = self._tally
        counts = tally.requests
        counts[key] = counts.get(key, 0) + 1
        latencies = tally.latencies.get(l7.protocol)
        if latencies is None:
            latencies = tally.latencies[l7.protocol] = []
        latencies.append(l7.latency_ms / 1000)
        self.emit(
            L7Record(
                time.time(),
                outcome,
                verdict.direction,
                "TCP",
                conn.src_ip,
                conn.sport,
                verdict.src_identity,
                conn.dst_ip,
                conn.dport,
                verdict.dst_identity,
                verdict.rule_id,
                l7,
            )
        )

    def emit(self, record: L7Record) -> None:
        """A flow made here or elsewhere (the DNS proxy's)."""
        self.flows.append(record)
        if len(self.flows) >= MAX_BATCH:
            self.wake.set()

    def take(self) -> Tally:
        """What was counted since the last call."""
        tally, self._tally = self._tally, Tally()
        tally.accepted, self.accepted = self.accepted, 0
        if self.pool is not None and self.pool.reused != self._reused:
            tally.reused = self.pool.reused - self._reused
            self._reused = self.pool.reused
        return tally

    def account(self) -> None:
        """The requests since the last call into this process's Prometheus metrics."""
        tally = self.take()
        if tally:
            self.recorder.record(tally, 0)

    async def run(self) -> None:
        try:
            await self.unheard.start(self.bus.nc)
        except Exception:  # then a batch no monitor takes goes uncounted, as before
            log.get("proxy").warning("cannot subscribe to flow batch replies", exc_info=True)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FLUSH_S)
            self.wake.clear()
            if self.forward is None:
                self.account()
            elif tally := self.take():
                await self.forward(tally)
            if self.flows or self.dropped_publish:
                await self.publish()

    async def publish(self) -> None:
        """The flows so far in one batch. Flows are best effort, requests are not: a batch
        the bus does not take is counted in the next one's ``dropped_publish``, so the
        monitor counts it lost (stage bus)."""
        batch, self.flows = self.flows, []
        dropped, self.dropped_publish = self.dropped_publish, 0
        reply = self.unheard.reply()
        try:
            await self.bus.nc.publish(
                subjects.flows(self.node),
                l7_wire.encode(L7Batch(self.node, batch, dropped)),
                reply=reply,
            )
        except Exception:
            self._not_taken(dropped + len(batch))
            return
        self.unheard.sent(reply, dropped + len(batch))

    def _not_taken(self, flows: int) -> None:
        self.dropped_publish += flows


def main(settings: ProxySettings) -> Coroutine[Any, Any, None]:
    """Before the event loop: into the node's namespace, the listener bound, the workers
    forked (:mod:`services.proxy.prefork`); what this process runs then."""
    if settings.netns:
        enter_netns(settings.netns)
    listening = listener(settings.proxy_port, BIND_WAIT_S)
    role = prefork.fork(prefork.process_count(settings.proxy_processes))
    if isinstance(role, prefork.Worker):
        return serve_worker(settings, role, listening)
    return run(settings, listening, prefork.Workers(role.children, TOPIC_IDS))


async def watch_view(
    watches: BucketWatches,
    ipcache: Handler,
    resolved: Handler,
    selectors: Handler,
) -> None:
    """The buckets a view is made of, each change handed to its handler; returns once all
    three are caught up."""
    # a node's entries name only addresses of its own pod CIDR (shared/ipcache_guard.py)
    await ipcache_guard.watch(watches, "proxy", ipcache)
    await watches.add(subjects.KV_RESOLVED, resolved)
    await watches.add(subjects.KV_SELECTORS, selectors)
    await watches.synced()


async def serve(
    view: View, sink: FlowSink, listening: socket.socket, logger: Any
) -> tuple[asyncio.Server, UpstreamPool]:
    """Connections accepted from ``listening`` (listening from now, if no process was yet)."""

    def failed(exc: BaseException) -> None:
        logger.error("connection failed", exc_info=exc)

    pool = sink.pool = UpstreamPool()  # HTTP/1.1 upstreams kept between client connections
    new_connection = accepting(view, sink.add, failed, pool)

    def accepted() -> asyncio.Protocol:
        sink.accepted += 1
        return new_connection()

    server = await asyncio.get_running_loop().create_server(
        accepted, sock=listening, backlog=BACKLOG
    )
    return server, pool


async def serve_worker(
    settings: ProxySettings, worker: prefork.Worker, listening: socket.socket
) -> None:
    """A worker: its own view and flow batches, connections once its view is whole."""
    logger = startup.configure_logging(
        settings, "proxy", settings.node, node=settings.node, process=worker.index
    )
    bus = await Bus.connect(settings.nats_url, f"membrane-proxy-{settings.node}-{worker.index}")
    view = View(settings.node)
    tasks = TaskGroup()
    watches = BucketWatches(bus, tasks, settings.kv_replicas)
    await watch_view(watches, view.set_ipcache, view.set_resolved, view.set_members)
    sink = FlowSink(bus, settings.node, worker.forward)
    tasks.spawn("flows", sink.run)
    TOPIC_IDS.shared = worker.share
    tasks.spawn("leader", lambda: worker.listen(TOPIC_IDS))
    server, pool = await serve(view, sink, listening, logger)
    logger.info("proxy worker ready", resolved=len(view.resolved))
    signal_name = await wait_for_shutdown()
    logger.info("shutting down", signal=signal_name)
    server.close()
    pool.close()
    await tasks.close()
    await bus.close()


async def run(settings: ProxySettings, listening: socket.socket, workers: prefork.Workers) -> None:
    """The leader: what a worker does, and what there is once per node."""
    logger = startup.configure_logging(settings, "proxy", settings.node, node=settings.node)
    bus = await Bus.connect(settings.nats_url, f"membrane-proxy-{settings.node}")
    view = View(settings.node)
    tasks = TaskGroup()
    agent_socket = (
        agent_api.fqdn_socket(
            Path(settings.agent_socket)
            if settings.agent_socket
            else agent_api.default_socket(settings.node)
        )
        if settings.fqdn_fast
        else None
    )
    fqdn = FQDNPublisher(
        await bus.kv(subjects.KV_FQDN, replicas=settings.kv_replicas),
        view,
        FQDNCaches(
            settings.node,
            settings.fqdn_min_ttl,
            settings.fqdn_grace,
            settings.fqdn_max_ips_per_name,
        ),
        settings.fqdn_policy_wait,
        agent_socket,
    )

    def then_wake(
        handle: Callable[[str, bytes | None], None],
    ) -> Callable[[str, bytes | None], None]:
        def handled(key: str, data: bytes | None) -> None:
            handle(key, data)
            fqdn.changed()  # DNS answers waiting for their policy look again

        return handled

    def set_members(key: str, data: bytes | None) -> None:
        view.set_members(key, data)
        fqdn.on_peer_set(key, data)

    await watch_view(
        BucketWatches(bus, tasks, settings.kv_replicas),
        then_wake(view.set_ipcache),
        then_wake(view.set_resolved),
        then_wake(set_members),
    )
    sink = FlowSink(bus, settings.node)
    tasks.spawn("flows", sink.run)
    restored = await fqdn.restore()
    tasks.spawn("fqdn-expiry", lambda: periodically(1.0, fqdn.expire))
    tasks.spawn("fqdn-writer", fqdn.write_caches)
    dns_proxy = DnsProxy(view, settings.node, sink.emit, fqdn.learn)
    await dns_proxy.start(settings.dns_proxy_port)

    server, pool = await serve(view, sink, listening, logger)
    metrics_port = metrics.serve(settings.metrics_host, settings.metrics_port)
    micro = await bus.add_service(
        subjects.PROXY_SERVICE,
        __version__,
        "L7 proxy: HTTP, gRPC and Kafka rules per request, DNS rules per query",
        {
            "replica": settings.node,
            "node": settings.node,
            "metrics": f"{settings.metrics_host}:{metrics_port}",
        },
        queue_group=f"{subjects.PROXY_SERVICE}-{settings.node}",
    )
    await micro.endpoint(
        "fqdn-clean", subjects.fqdn_clean(settings.node), FQDNCleanRequest, fqdn.clean
    )
    logger.info(
        "proxy ready",
        port=settings.proxy_port,
        dns_port=settings.dns_proxy_port,
        resolved=len(view.resolved),
        fqdn_caches=restored,
    )
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def worker_ended(child: prefork.Child, how: str) -> None:
        logger.error(
            "a proxy worker ended: the node's proxy stops, for its supervisor to start it whole",
            process=child.index,
            pid=child.pid,
            how=how,
        )
        ended.set_result(how)

    tasks.spawn("workers", lambda: workers.watch(worker_ended))
    shutdown = asyncio.ensure_future(wait_for_shutdown())
    await asyncio.wait((shutdown, ended), return_when=asyncio.FIRST_COMPLETED)
    if shutdown.done():
        logger.info("shutting down", signal=shutdown.result())
    shutdown.cancel()
    server.close()
    await workers.stop()
    pool.close()
    dns_proxy.close()
    await micro.stop()
    await tasks.close()
    await bus.close()
    if ended.done():
        raise SystemExit(1)
