"""``membrane run monitor``: flows from every node in, enriched flows out.

Replicas share ``membrane.flows.*`` through a queue group. Each batch is decoded (an agent's binary
batch of ring buffer records, :mod:`shared.flow_wire`, unpacked in one call; the L7 proxy's
batch of compact records, :mod:`shared.l7_wire`; or a JSON FlowBatch), enriched from caches of
the KV buckets (:mod:`services.monitor.enrich`; the binary and L7 records straight into each
flow's JSON line, no EnrichedFlow object in between), kept in the replica's ring as those lines,
counted in the metrics (binary and L7 batches from their records' numbers), and republished
in batches of JSON lines on ``membrane.events.flowbatches.<verdict>.<namespace>`` (one message
per verdict and namespace of a batch, :func:`shared.flow_api.split_batch`), where the JetStream
stream ``MEMBRANE_FLOW_HISTORY`` keeps the DROPPED and AUDIT ones for history; one message per
flow on ``membrane.events.flows.<verdict>.<namespace>`` only with ``MEMBRANE_EVENTS_PER_FLOW``.

Batches wait in a bounded queue between the subscription and the enricher, so a flood costs
flows (counted as lost at stage ``monitor``) and never the replica's responsiveness: queries and
status keep being answered. A batch that does not decode is counted and logged, never fatal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import operator
import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Gauge

from services.monitor import history
from services.monitor.enrich import Enricher, event_namespace
from services.monitor.ring import FlowRing
from services.monitor.watches import follow_optional
from shared import (
    __version__,
    flow_groups,
    flow_wire,
    ipcache_guard,
    l7_wire,
    log,
    services_bucket,
    startup,
    subjects,
)
from shared.bus import Bus, MicroService, redact
from shared.config import CommonSettings, env_name, require_at_least, setting
from shared.errors import InvalidArgument, Unavailable
from shared.flow_api import (
    FLOW_BATCH_MAX_BYTES,
    EnrichedFlow,
    FlowGroupsReply,
    FlowQuery,
    FlowQueryReply,
    MonitorStatus,
    split_batch,
)
from shared.flow_decode import (
    DIRECTIONS,
    EVENT_POLICY_VERDICT,
    REASON_NAMES,
    TYPES,
    VERDICT_BITS,
    VERDICTS,
)
from shared.flow_decode import TCP_FLAGS as FLAG_LISTS
from shared.flow_filter import compile_filter
from shared.kv_watch import BucketWatches
from shared.l7_wire import L7Record
from shared.messages import Empty, FlowBatch
from shared.runtime import TaskGroup, periodically, wait_for_shutdown

# After each batch the loop is given back (to the intake, queries, status, KV watches) for as
# long as messages keep coming in, up to INTAKE_TURNS turns: nats.py's reader takes only
# 64-256 KiB of the socket a turn (its StreamReader pauses the socket past 64 KiB), and a batch
# is ~200-230 KiB. With one turn a batch the intake fell behind a flood, nats-server's buffer
# for the replica passed 64 MiB and it cut the replica off as a slow consumer: batches lost
# without any stage counting them. Now the intake outruns enrichment and a full intake queue
# counts the excess (stage monitor); INTAKE_IDLE_TURNS turns without a message end the wait.
INTAKE_TURNS: Final = 256
INTAKE_IDLE_TURNS: Final = 4
LOG_EVERY_S: Final = 10.0

FLOWS = Counter(
    "membrane_monitor_flows_processed_total",
    "Flows enriched, by type and verdict",
    ["type", "verdict"],
)
DROPS = Counter(
    "membrane_monitor_drops_total", "Dropped flows by reason and direction", ["reason", "direction"]
)
POLICY_VERDICTS = Counter(
    "membrane_monitor_policy_verdicts_total",
    "Policy verdict events by direction, match (rule: a rule decided; default: no rule matched)"
    " and action",
    ["direction", "match", "action"],
)
LOST = Counter(
    "membrane_monitor_lost_events_total",
    "Flows lost before enrichment, by stage (datapath: the ring buffer was full; agent: the"
    " agent's queue for the bus was full; bus: the agent's publish failed or reached no replica;"
    " monitor: the intake queue was full)",
    ["stage"],
)
TCP_FLAGS = Counter("membrane_monitor_tcp_flags_total", "TCP flags seen in flows", ["flag"])
MALFORMED = Counter(
    "membrane_monitor_malformed_batches_total", "Flow batches that did not decode (skipped)"
)
PUBLISH_FAILED = Counter(
    "membrane_monitor_publish_failures_total",
    "Enriched flows that could not be republished, by subject (batch: membrane.events."
    "flowbatches; flow: membrane.events.flows, with MEMBRANE_EVENTS_PER_FLOW)",
    ["subject"],
)
for _subject in ("batch", "flow"):  # both series from the start, at 0
    PUBLISH_FAILED.labels(_subject)
RING = Gauge("membrane_monitor_ring_flows", "Flows held in this replica's ring")
QUEUED = Gauge("membrane_monitor_queued_batches", "Batches waiting to be enriched")
CACHE = Gauge("membrane_monitor_cache_entries", "Entries of the enrichment caches", ["cache"])

_ACTIONS: Final = {"FORWARDED": "allowed", "DROPPED": "denied", "AUDIT": "audit"}
_TYPE_VERDICT: Final = operator.attrgetter("type", "verdict")
_REASON_DIRECTION: Final = operator.attrgetter("drop_reason", "drop_reason_desc", "direction")
_TCP_FLAGS: Final = operator.attrgetter("tcp_flags")
_VERDICT: Final = operator.attrgetter("verdict")
_TYPE: Final = operator.attrgetter("type")
_RULE_ID: Final = operator.attrgetter("rule_id")
_DIRECTION_VERDICT: Final = operator.attrgetter("direction", "verdict")
# fields of a record tuple (shared.flow_wire.RECORD_FIELDS)
_KIND_FLAGS_REASON_DIRECTION: Final = operator.itemgetter(3, 9, 4, 5)
_KIND_FLAGS_DIRECTION: Final = operator.itemgetter(3, 9, 5)
_TCP_FIELD: Final = operator.itemgetter(8)
_RULE_ID_FIELD: Final = operator.itemgetter(18)
_encode: Final = msgspec.json.encode


@dataclasses.dataclass(frozen=True)
class MonitorSettings(CommonSettings):
    ring_size: int = setting(100_000, "recent flows each monitor replica keeps in memory")
    queue_batches: int = setting(
        256, "flow batches waiting for enrichment; beyond it batches are counted as lost"
    )
    history_flows: int = setting(
        1_000_000,
        "messages (batches) of DROPPED/AUDIT flows the history stream keeps (oldest go first)",
    )
    history_age: float = setting(86400.0, "seconds the history stream keeps a flow")
    history_scan: int = setting(
        20_000, "flows at most that one history query reads from the stream"
    )
    events_per_flow: bool = setting(
        False,
        "also publish every enriched flow in a message of its own on membrane.events.flows.>"
        " (the batches on membrane.events.flowbatches.> are always published)",
    )

    def __post_init__(self) -> None:
        require_at_least(self, 1, "ring_size", "queue_batches", "history_flows", "history_scan")
        if self.history_age <= 0:
            raise InvalidArgument("must be positive", field=env_name("history_age"))


_batch_decoder = msgspec.json.Decoder(FlowBatch)


class _BatchSize(msgspec.Struct):
    """Just enough of a FlowBatch to count what a full queue costs."""

    flows: list[msgspec.Raw] = []
    lost: int = 0


_size_decoder = msgspec.json.Decoder(_BatchSize)


class Monitor:
    def __init__(self, bus: Bus, settings: MonitorSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.enricher = Enricher()
        self.ring = FlowRing(settings.ring_size)
        self.queue: collections.deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.replica = ""
        self.flows_seen = 0
        self.flows_lost = 0
        self.malformed = 0
        self.nodes: set[str] = set()
        # (verdict, namespace) -> (batch subject, per-flow subject)
        self._subjects: dict[tuple[str, str], tuple[str, str]] = {}
        self.log = log.get("monitor")
        self._unlogged_lost = 0
        self._unlogged_malformed = ""
        self._last_log = -LOG_EVERY_S

    # --- intake -----------------------------------------------------------------------------

    async def on_batch(self, msg: Msg) -> None:
        if len(self.queue) < self.settings.queue_batches:
            self.queue.append(msg.data)
            self.wake.set()
            return
        if flow_wire.is_binary(msg.data):
            try:
                flows, lost, dropped_queue, dropped_publish = flow_wire.counts(msg.data)
            except flow_wire.MalformedBatch:
                self._malformed("queue full and batch malformed")
                return
            self._lost("monitor", flows)
            self._lost_upstream(lost, dropped_queue, dropped_publish)
            return
        if l7_wire.is_l7(msg.data):
            try:
                flows, dropped_publish = l7_wire.counts(msg.data)
            except l7_wire.MalformedBatch:
                self._malformed("queue full and batch malformed")
                return
            self._lost("monitor", flows)
            self._lost("bus", dropped_publish)
            return
        try:
            size = _size_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._malformed("queue full and batch malformed")
            return
        self._lost("monitor", len(size.flows))
        self._lost("datapath", size.lost)

    async def process_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                await self.process(self.queue.popleft())
                QUEUED.set(len(self.queue))
                await self._let_intake_in()
            QUEUED.set(0)
            self._log_trouble()

    async def _let_intake_in(self) -> None:
        stats = self.bus.nc.stats
        arrived, idle = stats["in_msgs"], 0
        for _ in range(INTAKE_TURNS):
            await asyncio.sleep(0)
            if stats["in_msgs"] != arrived:
                arrived, idle = stats["in_msgs"], 0
            else:
                idle += 1
                if idle >= INTAKE_IDLE_TURNS:
                    return

    async def process(self, data: bytes) -> int:
        """Enrich, keep, count and republish one batch; how many flows it held."""
        groups: dict[tuple[str, str], list[bytes]] = {}
        lines = self._enrich(data, groups)
        if not lines:
            return 0
        self.ring.extend(lines)
        self.flows_seen += len(lines)
        await self._republish(groups)
        RING.set(len(self.ring))
        return len(lines)

    def _enrich(self, data: bytes, groups: dict[tuple[str, str], list[bytes]]) -> list[bytes]:
        """The batch's flows enriched as JSON lines, counted in the metrics, its loss counted,
        ``groups`` filled with the lines by (verdict, namespace); none if it does not decode."""
        if flow_wire.is_binary(data):
            try:
                binary = flow_wire.decode(data)
                records = binary.unpack()
            except (flow_wire.MalformedBatch, struct.error) as exc:
                self._malformed(str(exc))
                return []
            self._lost_upstream(binary.lost, binary.dropped_queue, binary.dropped_publish)
            self.nodes.add(binary.node)
            lines = self.enricher.encode_records(
                records, binary.node, binary.clock_offset_ns, groups
            )
            count_records(records)
            return lines
        if l7_wire.is_l7(data):
            try:
                l7_batch = l7_wire.decode(data)
            except l7_wire.MalformedBatch as exc:
                self._malformed(str(exc))
                return []
            self._lost("bus", l7_batch.dropped_publish)
            self.nodes.add(l7_batch.node)
            lines = self.enricher.encode_l7(l7_batch.records, l7_batch.node, groups)
            count_l7(l7_batch.records)
            return lines
        try:
            batch = _batch_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(str(exc))
            return []
        self._lost("datapath", batch.lost)
        self.nodes.add(batch.node)
        # agents on the JSON wire (and L7 proxies before the L7 wire): the plain way
        enrich = self.enricher.enrich
        flows = [enrich(flow) for flow in batch.flows]
        count_flows(flows)
        lines = [_encode(flow) + b"\n" for flow in flows]
        for flow, line in zip(flows, lines, strict=True):
            groups.setdefault((flow.verdict, event_namespace(flow)), []).append(line)
        return lines

    def _lost_upstream(self, lost: int, dropped_queue: int, dropped_publish: int) -> None:
        """What a batch's header says was lost before it: in the kernel and at the agent."""
        self._lost("datapath", lost)
        self._lost("agent", dropped_queue)
        self._lost("bus", dropped_publish)

    async def _republish(self, groups: dict[tuple[str, str], list[bytes]]) -> None:
        """A batch's flows (JSON lines), grouped by (verdict, namespace), on the batch subjects:
        a few messages of JSON lines instead of one message per flow; with ``events_per_flow``
        also one message per flow on the per-flow subjects."""
        subjects_of = self._subjects
        if len(subjects_of) > 4096:
            subjects_of.clear()
        batches: list[tuple[str, bytes]] = []
        batched = 0
        singles: list[tuple[str, bytes]] = []
        per_flow = self.settings.events_per_flow
        for key, lines in groups.items():
            names = subjects_of.get(key)
            if names is None:
                names = subjects_of[key] = (
                    subjects.event_flow_batches(*key),
                    subjects.event_flows(*key),
                )
            data = b"".join(lines)
            if len(data) <= FLOW_BATCH_MAX_BYTES:  # most groups: no need to count the lines
                batches.append((names[0], data))
                batched += len(lines)
            else:
                for payload, count in split_batch(data):
                    batches.append((names[0], payload))
                    batched += count
            if per_flow:
                flow_subject = names[1]
                singles.extend((flow_subject, line[:-1]) for line in lines)
        await self._publish(batches, batched, "batch")
        if per_flow:
            await self._publish(singles, len(singles), "flow")

    async def _publish(self, messages: list[tuple[str, bytes]], flows: int, kind: str) -> None:
        try:
            # written to the client in one go
            await self.bus.publish_many(messages)
        except (nats.errors.Error, OSError, Unavailable):
            PUBLISH_FAILED.labels(kind).inc(flows)

    def _lost(self, stage: str, count: int) -> None:
        if count:
            LOST.labels(stage).inc(count)
            self.flows_lost += count
            self._unlogged_lost += count

    def _malformed(self, error: str) -> None:
        MALFORMED.inc()
        self.malformed += 1
        self._unlogged_malformed = error[:200]
        self._log_trouble()

    def _log_trouble(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            return
        if self._unlogged_lost:
            self.log.warning("flows lost", flows=self._unlogged_lost)
            self._unlogged_lost = 0
            self._last_log = now
        if self._unlogged_malformed:
            self.log.warning("malformed flow batch skipped", error=self._unlogged_malformed)
            self._unlogged_malformed = ""
            self._last_log = now

    # --- requests ---------------------------------------------------------------------------

    async def query(self, req: FlowQuery) -> FlowQueryReply:
        test = compile_filter(req.filters, req.until)
        if req.last < 0:
            raise InvalidArgument("must not be negative", field="last")
        flows = self.ring.query(test, last=req.last, since=req.since)
        return FlowQueryReply(flows=flows, oldest=self.ring.oldest, replica=self.replica)

    async def history(self, req: FlowQuery) -> FlowQueryReply:
        """DROPPED and AUDIT flows from the history stream (any replica answers)."""
        test = compile_filter(req.filters, req.until)
        if req.last < 0:
            raise InvalidArgument("must not be negative", field="last")
        flows = await history.read(
            self.bus, test, since=req.since, last=req.last, scan=self.settings.history_scan
        )
        return FlowQueryReply(flows=flows, replica=self.replica)

    async def groups(self, req: FlowQuery) -> FlowGroupsReply:
        """The ring's matching flows counted by connection kind (:mod:`shared.flow_groups`)."""
        flows = (await self.query(req)).flows
        if req.until:
            flows = [f for f in flows if f.time < req.until]
        return FlowGroupsReply(
            groups=flow_groups.group(flows),
            flows=len(flows),
            oldest=self.ring.oldest,
            replica=self.replica,
        )

    async def history_groups(self, req: FlowQuery) -> FlowGroupsReply:
        """The history stream's matching flows before ``until`` (where the rings begin)."""
        flows = (await self.history(req)).flows
        if req.until:
            flows = [f for f in flows if f.time < req.until]
        return FlowGroupsReply(
            groups=flow_groups.group(flows), flows=len(flows), replica=self.replica
        )

    async def status(self, _: Empty) -> MonitorStatus:
        counts = self.enricher.counts()
        return MonitorStatus(
            replica=self.replica,
            ring_size=len(self.ring),
            ring_capacity=self.ring.capacity,
            flows_seen=self.flows_seen,
            flows_lost=self.flows_lost,
            malformed_batches=self.malformed,
            identities=counts["identities"],
            endpoints=counts["endpoints"],
            policies=counts["policies"],
            rules=counts["rules"],
            services=counts["services"],
            nodes=len(self.nodes),
        )

    def update_cache_gauges(self) -> None:
        for name, count in self.enricher.counts().items():
            CACHE.labels(name).set(count)


def count_records(records: list[tuple[int, ...]]) -> None:
    """The metrics of a binary batch's flows, from their record tuples (as
    :func:`count_flows` counts the enriched flows): aggregated per batch in C (Counter over
    itemgetter, the rule-less ones selected by compress), then each distinct combination of
    the numbers named from the tables the flows' names come from."""
    combos = collections.Counter(map(_KIND_FLAGS_REASON_DIRECTION, records))
    rule_less = collections.Counter(
        map(
            _KIND_FLAGS_DIRECTION,
            itertools.compress(records, map(operator.not_, map(_RULE_ID_FIELD, records))),
        )
    )
    kinds: collections.Counter[tuple[str, str]] = collections.Counter()
    drops: collections.Counter[tuple[str, str]] = collections.Counter()
    decided: collections.Counter[tuple[str, str]] = collections.Counter()
    for (kind, fl, reason, direction), n in combos.items():
        verdict = VERDICTS[kind << 3 | (fl & VERDICT_BITS)]
        kinds[TYPES[kind], verdict] += n
        if verdict == "DROPPED":
            drops[REASON_NAMES[reason] or str(reason), DIRECTIONS[direction]] += n
        if kind == EVENT_POLICY_VERDICT:
            decided[DIRECTIONS[direction], verdict] += n
    defaults: collections.Counter[tuple[str, str]] = collections.Counter()
    for (kind, fl, direction), n in rule_less.items():
        if kind == EVENT_POLICY_VERDICT:
            defaults[DIRECTIONS[direction], VERDICTS[kind << 3 | (fl & VERDICT_BITS)]] += n
    flags: collections.Counter[str] = collections.Counter()
    for tcp, n in collections.Counter(map(_TCP_FIELD, records)).items():
        for flag in FLAG_LISTS[tcp]:
            flags[flag] += n
    _update_metrics(kinds, drops, decided, defaults, flags)


def count_l7(records: list[L7Record]) -> None:
    """The metrics of the L7 proxy's records (as count_flows counts their flows): by (type,
    verdict); a denied request is a drop with no reason code (reason "0"), by direction; no
    policy verdicts (those are the datapath's), no TCP flags."""
    verdicts = collections.Counter(map(_VERDICT, records))
    kinds = collections.Counter({(l7_wire.TYPE, v): n for v, n in verdicts.items()})
    denied = (r.direction for r in records if r.verdict == "DROPPED")
    drops = collections.Counter(("0", direction) for direction in denied)
    none: collections.Counter[tuple[str, str]] = collections.Counter()
    _update_metrics(kinds, drops, none, none, collections.Counter())


def count_flows(flows: list[EnrichedFlow]) -> None:
    """The metrics of enriched flows: aggregated per batch in C (Counter over attrgetter,
    selections with compress): one metric update per label set and no Python step per flow."""
    kinds = collections.Counter(map(_TYPE_VERDICT, flows))
    dropped = itertools.compress(
        flows, map(operator.eq, map(_VERDICT, flows), itertools.repeat("DROPPED"))
    )
    drops = collections.Counter(
        (desc or str(reason), direction)
        for reason, desc, direction in map(_REASON_DIRECTION, dropped)
    )
    chosen = itertools.repeat("policy-verdict")
    decided = list(itertools.compress(flows, map(operator.eq, map(_TYPE, flows), chosen)))
    by_default = map(operator.not_, map(_RULE_ID, decided))
    defaults = collections.Counter(map(_DIRECTION_VERDICT, itertools.compress(decided, by_default)))
    flags = collections.Counter(itertools.chain.from_iterable(map(_TCP_FLAGS, flows)))
    _update_metrics(
        kinds, drops, collections.Counter(map(_DIRECTION_VERDICT, decided)), defaults, flags
    )


def _update_metrics(
    kinds: collections.Counter[tuple[str, str]],
    drops: collections.Counter[tuple[str, str]],
    decided: collections.Counter[tuple[str, str]],
    defaults: collections.Counter[tuple[str, str]],
    flags: collections.Counter[str],
) -> None:
    """One increment per label set: flows by (type, verdict), drops by (reason, direction),
    policy verdicts by (direction, verdict) of which ``defaults`` no rule decided, flags."""
    for key, n in kinds.items():
        FLOWS.labels(*key).inc(n)
    for dkey, n in drops.items():
        DROPS.labels(*dkey).inc(n)
    verdicts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (direction, verdict), n in decided.items():
        action = _ACTIONS.get(verdict, "other")
        default = defaults.get((direction, verdict), 0)
        if n > default:
            verdicts[direction, "rule", action] += n - default
        if default:
            verdicts[direction, "default", action] += default
    for vkey, n in verdicts.items():
        POLICY_VERDICTS.labels(*vkey).inc(n)
    for flag, n in flags.items():
        TCP_FLAGS.labels(flag).inc(n)


@dataclasses.dataclass
class Running:
    """A started monitor replica, for :func:`run` and for tests that drive one in-process."""

    monitor: Monitor
    bus: Bus
    micro: MicroService
    tasks: TaskGroup
    subscription: Subscription
    metrics_port: int

    async def stop(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.subscription.unsubscribe()
        await self.micro.stop()
        await self.tasks.close()
        await self.bus.close()


async def start(settings: MonitorSettings) -> Running:
    bus, metrics_port = await startup.attach(settings, f"membrane-monitor-{settings.replica}")
    monitor = Monitor(bus, settings)
    enricher = monitor.enricher
    tasks = TaskGroup()
    watches = BucketWatches(bus, tasks, settings.kv_replicas)
    await watches.add(subjects.KV_IDENTITIES, enricher.on_identity)
    await watches.add(subjects.KV_ENDPOINTS, enricher.on_endpoint)
    # a node's entries name only addresses of its own pod CIDR (shared/ipcache_guard.py)
    await ipcache_guard.watch(watches, "monitor", enricher.on_ipcache)
    await watches.add(subjects.KV_RESOLVED, enricher.on_resolved)
    await watches.add(subjects.KV_FQDN, enricher.on_fqdn)
    services_synced = watches.snapshot_event()
    known_services: set[str] = set()
    services_view = services_bucket.ServicesView()  # shards of records: per service

    def on_services_entry(key: str, value: bytes | None) -> None:
        for service, record in services_view.update(key, value):
            enricher.on_service(service, record)

    tasks.spawn(
        "watch-services",
        lambda: follow_optional(
            bus, subjects.KV_SERVICES, on_services_entry, services_synced, known_services
        ),
    )
    await watches.synced()  # enrich from the start: flows before the snapshots would be bare
    await history.ensure_stream(
        bus,
        max_flows=settings.history_flows,
        max_age=settings.history_age,
        replicas=settings.kv_replicas,
    )

    micro = await bus.add_service(
        subjects.MONITOR_SERVICE,
        __version__,
        "enriched flows, flow queries, metrics and event subscriptions",
        {"replica": settings.replica, "metrics": f"{settings.metrics_host}:{metrics_port}"},
        queue_group=subjects.MONITOR_QUEUE,
    )
    await _endpoints(micro, monitor)
    tasks.spawn("enrich", monitor.process_forever)
    tasks.spawn("cache-gauges", lambda: periodically(5.0, _on_loop(monitor.update_cache_gauges)))
    sub = await bus.subscribe(
        subjects.FLOWS_ALL,
        queue=subjects.MONITOR_QUEUE,
        cb=monitor.on_batch,
        pending_msgs_limit=max(1024, settings.queue_batches * 4),
    )
    await bus.flush()  # subscriptions in place at the server before anyone is told "ready"
    return Running(monitor, bus, micro, tasks, sub, metrics_port)


async def _endpoints(micro: MicroService, monitor: Monitor) -> None:
    """The replica's request endpoints on its micro service."""
    monitor.replica = micro.id
    # per-replica subjects: each replica holds only its share of the flows, so a query asks all
    await micro.endpoint(
        "query",
        subjects.monitor_query(micro.id),
        FlowQuery,
        monitor.query,
        concurrency=4,
    )
    await micro.endpoint(
        "groups",
        subjects.monitor_groups(micro.id),
        FlowQuery,
        monitor.groups,
        concurrency=2,
    )
    await micro.endpoint(
        "history-groups",
        subjects.MONITOR_HISTORY_GROUPS,
        FlowQuery,
        monitor.history_groups,
        concurrency=2,
    )
    await micro.endpoint(
        "status",
        subjects.monitor_status(micro.id),
        Empty,
        monitor.status,
    )
    await micro.endpoint(
        "history",
        subjects.MONITOR_HISTORY,
        FlowQuery,
        monitor.history,
        concurrency=4,
    )


async def run(settings: MonitorSettings) -> None:
    logger = startup.configure_logging(
        settings, "monitor", settings.replica or f"monitor-{os.getpid()}"
    )
    running = await start(settings)
    logger.info(
        "monitor ready",
        nats=redact(settings.nats_url),
        replica=running.micro.id,
        metrics=running.metrics_port,
        ring=settings.ring_size,
    )
    signal_name = await wait_for_shutdown()
    logger.info("shutting down", signal=signal_name)
    await running.stop()


def _on_loop(action: Callable[[], None]) -> Callable[[], Any]:
    async def call() -> None:
        action()

    return call
