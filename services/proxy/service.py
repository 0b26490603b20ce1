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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from services.proxy.connection import accepting
from services.proxy.dns import DnsProxy
from services.proxy.exchange import Conn
from services.proxy.fqdn_cache import FQDNCaches
from services.proxy.fqdn_publish import FQDNPublisher
from services.proxy.pool import UpstreamPool
from services.proxy.sockets import BACKLOG, listener
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
from shared.config import CommonSettings, setting
from shared.kv_watch import BucketWatches
from shared.l7_wire import L7Batch, L7Record
from shared.messages import FQDNCleanRequest, L7Info
from shared.runtime import TaskGroup, enter_netns, periodically, wait_for_shutdown
from shared.unheard import UnheardBatches

FLUSH_S = 0.05
MAX_BATCH = 512

REQUESTS = Counter(
    "membrane_proxy_requests_total",
    "Requests the L7 proxy decided, by protocol, verdict and the direction whose rules decided",
    ["protocol", "verdict", "direction"],
)
LATENCY = Histogram(
    "membrane_proxy_request_seconds",
    "Time from a request's headers to its answer's end, through the L7 proxy",
    ["protocol"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
CONNECTIONS = Counter("membrane_proxy_connections_total", "Connections the L7 proxy accepted")
REUSED = Counter(
    "membrane_proxy_upstreams_reused_total",
    "HTTP/1.1 upstream connections taken from the pool for another client connection",
)


@dataclasses.dataclass(frozen=True)
class ProxySettings(CommonSettings):
    node: str = setting("", "name of the node this proxy serves (required)")
    netns: str = setting(
        "", "network namespace to enter at start (name under /run/netns, or a path)"
    )
    proxy_port: int = setting(proxy.PROXY_PORT, "port of the transparent listener in the node")
    dns_proxy_port: int = setting(proxy.DNS_PROXY_PORT, "port of the DNS proxy (UDP and TCP)")
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


class FlowSink:
    """L7 flows to the monitor, batched like the datapath's in the compact L7 wire
    (:mod:`shared.l7_wire`); the metrics of their requests counted here and handed to
    Prometheus with each batch (every ``FLUSH_S`` at most). A batch the bus did not take, or
    that reached no monitor replica (:mod:`shared.unheard`), is counted in the next one."""

    def __init__(self, bus: Bus, node: str) -> None:
        self.bus = bus
        self.node = node
        self.flows: list[L7Record] = []
        self.wake = asyncio.Event()
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._counts: dict[tuple[str, str, str], int] = {}  # since the last batch
        self._latencies: dict[str, list[float]] = {}  # seconds, by protocol, likewise
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
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        latencies = self._latencies.get(l7.protocol)
        if latencies is None:
            latencies = self._latencies[l7.protocol] = []
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

    def account(self) -> None:
        """The requests since the last call into the Prometheus metrics: one increment per
        label set and bucket, not a lock and a bucket walk per request."""
        counts, self._counts = self._counts, {}
        for key, count in counts.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = REQUESTS.labels(*key)
            counter.inc(count)
        latencies, self._latencies = self._latencies, {}
        for protocol, values in latencies.items():
            metrics.observe_many(LATENCY.labels(protocol), values)
        if self.accepted:
            CONNECTIONS.inc(self.accepted)
            self.accepted = 0
        if self.pool is not None and self.pool.reused != self._reused:
            REUSED.inc(self.pool.reused - self._reused)
            self._reused = self.pool.reused

    async def run(self) -> None:
        try:
            await self.unheard.start(self.bus.nc)
        except Exception:  # then a batch no monitor takes goes uncounted, as before
            log.get("proxy").warning("cannot subscribe to flow batch replies", exc_info=True)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FLUSH_S)
            self.wake.clear()
            self.account()
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


async def run(settings: ProxySettings) -> None:
    if settings.netns:
        enter_netns(settings.netns)
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

    watches = BucketWatches(bus, tasks, settings.kv_replicas)
    # a node's entries name only addresses of its own pod CIDR (shared/ipcache_guard.py)
    await ipcache_guard.watch(watches, "proxy", then_wake(view.set_ipcache))
    await watches.add(subjects.KV_RESOLVED, then_wake(view.set_resolved))
    await watches.add(subjects.KV_SELECTORS, then_wake(set_members))
    # no listener before the view is whole: until then the datapath drops L7 connections
    await watches.synced()
    sink = FlowSink(bus, settings.node)
    tasks.spawn("flows", sink.run)
    restored = await fqdn.restore()
    tasks.spawn("fqdn-expiry", lambda: periodically(1.0, fqdn.expire))
    tasks.spawn("fqdn-writer", fqdn.write_caches)
    dns_proxy = DnsProxy(view, settings.node, sink.emit, fqdn.learn)
    await dns_proxy.start(settings.dns_proxy_port)

    def failed(exc: BaseException) -> None:
        logger.error("connection failed", exc_info=exc)

    pool = sink.pool = UpstreamPool()  # HTTP/1.1 upstreams kept between client connections
    new_connection = accepting(view, sink.add, failed, pool)

    def accepted() -> asyncio.Protocol:
        sink.accepted += 1
        return new_connection()

    server = await asyncio.get_running_loop().create_server(
        accepted, sock=listener(settings.proxy_port), backlog=BACKLOG
    )
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
    signal_name = await wait_for_shutdown()
    logger.info("shutting down", signal=signal_name)
    server.close()
    pool.close()
    dns_proxy.close()
    await micro.stop()
    await tasks.close()
    await bus.close()
