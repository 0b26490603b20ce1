"""The identity service's face: NATS handlers over the allocator and the pod-CIDR pool.

Replicas are stateless and share the work through a queue group; Redis holds the state. Every
identity that appears or disappears is written to the ``identities`` KV bucket, which the other
services watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import TypeVar

import msgspec
import nats.errors
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from services.identity import reserved
from services.identity.allocator import Allocation, IdentityAllocator
from services.identity.ipam import PodCIDRAllocator, UnderlayTaken
from services.identity.nodes import NodeReaper
from shared import __version__, kv_watch, log, startup, subjects
from shared.bus import Bus, MicroService, encode, redact
from shared.config import CommonSettings, env_name, require_at_least, setting
from shared.errors import InvalidArgument, MembraneError, Unavailable
from shared.labels import DEFAULT_LABEL_FILTER, LabelFilter, LabelSet
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    Empty,
    GetRequest,
    HeartbeatReply,
    HeartbeatRequest,
    Identity,
    ListReply,
    Message,
    PodCIDR,
    PodCIDRList,
    PodCIDRRequest,
    ReleaseReply,
    ReleaseRequest,
)
from shared.redis_store import make_redis
from shared.runtime import TaskGroup, periodically

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)

ALLOCATE_SECONDS = Histogram(
    "membrane_identity_allocate_duration_seconds",
    "Time to allocate or look up an identity, by whether it was new",
    ["new"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)
ERRORS = Counter(
    "membrane_identity_errors_total", "Failed identity operations, by error code", ["code"]
)
IDENTITIES = Gauge("membrane_identities", "Identities known to the cluster, by kind", ["kind"])
GC_DELETED = Counter("membrane_identity_gc_deleted_total", "Identities deleted by GC")
LEASES_EXPIRED = Counter(
    "membrane_identity_leases_expired_total", "Owners whose lease lapsed and lost references"
)


@dataclasses.dataclass(frozen=True)
class IdentitySettings(CommonSettings):
    identity_min: int = setting(reserved.CLUSTER_MIN, "lowest cluster-local identity")
    identity_max: int = setting(reserved.CLUSTER_MAX, "highest cluster-local identity")
    grace_period: float = setting(
        300.0, "seconds an unreferenced identity is kept (and a freed id quarantined)"
    )
    gc_interval: float = setting(10.0, "seconds between garbage-collection passes")
    reconcile_interval: float = setting(
        300.0, "seconds between checks that the identities and pod-cidrs KV buckets match Redis"
    )
    label_filter: tuple[str, ...] = setting(
        DEFAULT_LABEL_FILTER,
        "identity-relevant label patterns, comma-separated; '!re' excludes matching keys",
    )
    cluster_cidr: str = setting("10.244.0.0/16", "cluster pod CIDR that node CIDRs come from")
    node_mask_size: int = setting(24, "prefix length of each node's pod CIDR")
    concurrency: int = setting(128, "requests served at once per replica")
    node_expiry: float = setting(
        15.0, "seconds without a heartbeat after which a node counts as dead"
    )
    node_grace: float = setting(
        60.0, "seconds a dead node's pods are kept (ipcache, endpoints) before release"
    )

    def __post_init__(self) -> None:
        require_at_least(self, 1, "concurrency", "kv_replicas")
        require_at_least(self, 0, "grace_period")
        for name in ("gc_interval", "reconcile_interval", "node_expiry"):
            if getattr(self, name) <= 0:
                raise InvalidArgument("must be positive", field=env_name(name))


def to_wire(number: int, labels: LabelSet) -> Identity:
    return Identity(id=number, labels=labels.strings(), kind=reserved.kind_of(number))


class IdentityService:
    def __init__(
        self,
        bus: Bus,
        kv: KeyValue,
        allocator: IdentityAllocator,
        pool: PodCIDRAllocator,
        settings: IdentitySettings,
        pod_cidrs: KeyValue,
    ) -> None:
        self.bus = bus
        self.kv = kv
        self.allocator = allocator
        self.pool = pool
        self.pod_cidrs = pod_cidrs  # the pool's allocations, as every ipcache reader sees them
        # whether a node counts as alive (holds its underlay address): the failure detector's
        # word once wired (serve()); until then every node does
        self.node_alive: Callable[[str], bool] = lambda _node: True
        self.node_seen: Callable[[str], bool] = lambda _node: True  # a record seen, now or before
        self.settings = settings
        self.log = log.get("identity")
        self._backlog: dict[int, bytes | None] = {}
        self.reconcile_soon = asyncio.Event()

    async def register(self, metadata: dict[str, str]) -> MicroService:
        micro = await self.bus.add_service(
            subjects.IDENTITY_SERVICE,
            __version__,
            "security identities from labels, and cluster-pool IPAM",
            metadata,
            queue_group=subjects.IDENTITY_QUEUE,
            concurrency=self.settings.concurrency,
        )

        async def serve(
            name: str,
            subject: str,
            request_type: type[Req],
            handler: Callable[[Req], Awaitable[Res]],
        ) -> None:
            await micro.endpoint(name, subject, request_type, _counting(handler))

        await serve("allocate", subjects.IDENTITY_ALLOCATE, AllocateRequest, self.allocate)
        await serve("release", subjects.IDENTITY_RELEASE, ReleaseRequest, self.release)
        # an agent's: the owner (its node) in the subject, which only that node may use, so
        # no agent releases (or holds) references in another node's name
        await micro.endpoint(
            "allocate-node",
            subjects.for_node(subjects.IDENTITY_ALLOCATE, "*"),
            AllocateRequest,
            _counting(self.allocate),
            subject_names=lambda req: subjects.node_token(req.owner),
        )
        await micro.endpoint(
            "release-node",
            subjects.for_node(subjects.IDENTITY_RELEASE, "*"),
            ReleaseRequest,
            _counting(self.release),
            subject_names=lambda req: subjects.node_token(req.owner),
        )
        await micro.endpoint(
            "heartbeat-node",
            subjects.for_node(subjects.IDENTITY_HEARTBEAT, "*"),
            HeartbeatRequest,
            _counting(self.heartbeat),
            subject_names=lambda req: subjects.node_token(req.owner),
        )
        await serve("get", subjects.IDENTITY_GET, GetRequest, self.get)
        await serve("list", subjects.IDENTITY_LIST, Empty, self.list)
        await serve("heartbeat", subjects.IDENTITY_HEARTBEAT, HeartbeatRequest, self.heartbeat)
        # per node: the node in the subject, which the bus lets only that node's agent use
        await micro.endpoint(
            "ipam-allocate",
            subjects.ipam_allocate("*"),
            PodCIDRRequest,
            _counting(self.ipam_allocate),
            subject_names=lambda req: subjects.node_token(req.node),
        )
        await serve("ipam-release", subjects.IPAM_RELEASE, PodCIDRRequest, self.ipam_release)
        await serve("ipam-list", subjects.IPAM_LIST, Empty, self.ipam_list)
        return micro

    # --- handlers (each takes a decoded request and returns a reply struct) -----------------

    async def allocate(self, req: AllocateRequest) -> AllocateReply:
        started = time.perf_counter()
        try:
            result: Allocation = await self.allocator.allocate(
                req.labels, req.owner, req.lease_seconds, req.request_id
            )
        except Unavailable:
            # the script may have run with its reply lost: an identity may now be in Redis
            # without its KV entry, so check soon instead of at the next periodic reconcile
            self.reconcile_soon.set()
            raise
        ALLOCATE_SECONDS.labels(str(result.new).lower()).observe(time.perf_counter() - started)
        identity = to_wire(result.id, result.labels)
        if result.new:
            # Written before replying, so a caller that sees the id finds it in the KV too.
            await self.publish(result.id, encode(identity))
            self.log.debug("identity allocated", identity=result.id, labels=result.labels.canonical)
        return AllocateReply(identity=identity, new=result.new)

    async def release(self, req: ReleaseRequest) -> ReleaseReply:
        left = await self.allocator.release(req.id, req.owner, req.request_id)
        return ReleaseReply(id=req.id, references=left)

    async def get(self, req: GetRequest) -> Identity:
        return to_wire(req.id, await self.allocator.get(req.id))

    async def list(self, _: Empty) -> ListReply:
        found = await self.allocator.list()
        return ListReply(identities=[to_wire(n, labels) for n, labels in found.items()])

    async def heartbeat(self, req: HeartbeatRequest) -> HeartbeatReply:
        expires = await self.allocator.renew_lease(req.owner, req.ttl_seconds)
        return HeartbeatReply(owner=req.owner, expires_at=expires)

    async def ipam_allocate(self, req: PodCIDRRequest) -> PodCIDR:
        underlay = _underlay(req.underlay_ip)
        try:
            network = await self.pool.allocate(req.node, underlay)
        except UnderlayTaken as exc:
            # a node holds its address while the failure detector counts it alive; a dead
            # one's (or one that left) may go to another node
            if await self._holds(exc.holder):
                raise
            self.log.warning(
                "underlay address taken over from a dead node",
                node=req.node,
                underlay=underlay,
                holder=exc.holder,
            )
            network = await self.pool.allocate(req.node, underlay, takeover=exc.holder)
            # the holder's record loses the address (peers then give that node nothing)
            held = await self.pool.get(exc.holder)
            if held is not None:
                record = PodCIDR(node=exc.holder, cidr=str(held))
                await self._write_pod_cidr(exc.holder, encode(record))
        if not underlay:
            underlay = (await self.pool.underlays()).get(req.node, "")
        allocation = PodCIDR(node=req.node, cidr=str(network), underlay_ip=underlay)
        # in the bucket before the node has it: readers believe the node's ipcache entries
        # only inside it (shared/ipcache_guard.py); a failed write fails the request, which
        # the agent retries (allocation is idempotent)
        await self._write_pod_cidr(req.node, encode(allocation))
        return allocation

    async def _holds(self, node: str) -> bool:
        """Whether ``node`` still holds its underlay address: the failure detector counts it
        alive, or it has written no record yet since it asked (an agent asks before its
        first heartbeat) less than its record's lifetime ago."""
        if self.node_alive(node):
            return True
        if self.node_seen(node):
            return False  # its record went stale or was deleted (it left)
        claimed = await self.pool.claimed(node)
        lifetime = self.settings.node_expiry + self.settings.node_grace
        return claimed is not None and time.time() - claimed <= lifetime

    async def ipam_release(self, req: PodCIDRRequest) -> PodCIDR:
        network = await self.pool.release(req.node)
        await self._write_pod_cidr(req.node, None)
        return PodCIDR(node=req.node, cidr=str(network))

    async def _write_pod_cidr(self, node: str, value: bytes | None) -> None:
        key = subjects.pod_cidr_key(node)
        try:
            if value is None:
                await self.pod_cidrs.delete(key)
            else:
                await self.pod_cidrs.put(key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"the {subjects.KV_POD_CIDRS} bucket: {exc}") from None

    async def ipam_list(self, _: Empty) -> PodCIDRList:
        found = await self.pool.list()
        underlays = await self.pool.underlays()
        return PodCIDRList(
            allocations=[
                PodCIDR(node=n, cidr=str(c), underlay_ip=underlays.get(n, ""))
                for n, c in found.items()
            ]
        )

    # --- background work --------------------------------------------------------------------

    async def collect_garbage(self) -> None:
        result = await self.allocator.collect_garbage()
        # every replica reports the cluster-wide count (one O(1) read), not its own share
        IDENTITIES.labels("cluster").set(await self.allocator.count())
        if result.expired_owners:
            LEASES_EXPIRED.inc(len(result.expired_owners))
            self.log.info("leases expired", owners=result.expired_owners)
        for number in result.deleted_ids:
            await self.publish(number, None)
            GC_DELETED.inc()
            self.log.info("identity garbage-collected", identity=number)

    async def publish(self, number: int, value: bytes | None) -> None:
        """Put (or, for None, delete) an identity in the KV bucket.

        Redis is the source of truth and already changed, so a NATS hiccup must not fail the
        request: the change waits in a backlog that ``flush_backlog`` retries.
        """
        try:
            if value is None:
                await self.kv.delete(subjects.identity_key(number))
            else:
                await self.kv.put(subjects.identity_key(number), value)
            self._backlog.pop(number, None)
        except (nats.errors.Error, TimeoutError) as exc:
            self.log.warning(
                "identities bucket write failed, will retry",
                identity=number,
                error=str(exc) or type(exc).__name__,
            )
            self._backlog[number] = value

    async def flush_backlog(self) -> None:
        for number, value in list(self._backlog.items()):
            await self.publish(number, value)

    async def reconcile(self) -> None:
        """Make the KV bucket match Redis: put what is missing or wrong, delete what is gone.

        Covers a replica that died between the Redis write and the KV write, and an allocation
        whose Redis reply was lost. Other replicas allocate and collect while this runs, so
        the KV snapshot is taken first (an identity allocated after it is already in KV) and
        every write re-checks Redis just before it is made.
        """
        # one replica at a time: they would all compute and write the same diff
        if not await self.allocator.try_lock("reconcile", seconds=60):
            return
        try:
            await self._reconcile()
            await self._reconcile_pod_cidrs()
        finally:
            await self.allocator.unlock("reconcile")

    async def _reconcile(self) -> None:
        in_kv = {int(key): value for key, value in (await Bus.snapshot(self.kv)).items()}
        found = await self.allocator.list()
        cluster = {n: labels for n, labels in found.items() if n not in reserved.BY_ID}
        puts = deletes = 0
        for number, labels in cluster.items():
            wanted = encode(to_wire(number, labels))
            if in_kv.get(number) != wanted and await self.allocator.exists(number, labels):
                await self.publish(number, wanted)
                puts += 1
        for number in in_kv.keys() - cluster.keys():
            if not await self.allocator.exists(number):
                await self.publish(number, None)
                deletes += 1
        if puts or deletes:
            self.log.info("identities bucket reconciled", puts=puts, deletes=deletes)

    async def _reconcile_pod_cidrs(self) -> None:
        """Make ``pod-cidrs`` match the pool in Redis (a bucket lost or older than this code,
        a write that failed after the allocation). Snapshot first, then the pool, and each
        write re-checks the node's allocation: an allocation made meanwhile is kept."""
        in_kv = await Bus.snapshot(self.pod_cidrs)
        allocated = await self.pool.list()
        underlays = await self.pool.underlays()
        puts = deletes = 0
        for node, network in allocated.items():
            wanted = encode(
                PodCIDR(node=node, cidr=str(network), underlay_ip=underlays.get(node, ""))
            )
            current = in_kv.get(subjects.pod_cidr_key(node))
            if current != wanted and await self.pool.get(node) == network:
                await self._write_pod_cidr(node, wanted)
                puts += 1
        tokens = {subjects.pod_cidr_key(node): node for node in allocated}
        for key, value in in_kv.items():
            if key in tokens:
                continue
            try:
                node = msgspec.json.decode(value, type=PodCIDR).node
            except (msgspec.ValidationError, msgspec.DecodeError):
                node = ""
            if not node or await self.pool.get(node) is None:
                await self.pod_cidrs.delete(key)
                deletes += 1
        if puts or deletes:
            self.log.info("pod-cidrs bucket reconciled", puts=puts, deletes=deletes)


def _underlay(value: str) -> str:
    """A requested underlay address, checked: one IPv4 unicast address, or "" for none."""
    if not value:
        return ""
    try:
        address = IPv4Address(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not an IPv4 address", field="underlay_ip") from None
    if address.is_unspecified or address.is_multicast or address == IPv4Address("255.255.255.255"):
        raise InvalidArgument(f"{value} is not a unicast address", field="underlay_ip")
    return str(address)


def _counting(handler: Callable[[Req], Awaitable[Res]]) -> Callable[[Req], Awaitable[Res]]:
    """Count user-visible errors by code for the identity service's own metric."""

    async def wrapped(req: Req) -> Res:
        try:
            return await handler(req)
        except MembraneError as exc:
            ERRORS.labels(exc.code).inc()
            raise

    return wrapped


async def run(settings: IdentitySettings) -> None:
    started = await startup.start(settings, "identity")
    label_filter = LabelFilter(settings.label_filter)
    client = make_redis(settings.redis_url)
    allocator = IdentityAllocator(
        client,
        label_filter=label_filter,
        min_id=settings.identity_min,
        max_id=settings.identity_max,
        grace_seconds=settings.grace_period,
    )
    pool = PodCIDRAllocator(client, settings.cluster_cidr, settings.node_mask_size)
    bus = started.bus
    kv = await started.kv(subjects.KV_IDENTITIES, "security identity -> labels")
    pod_cidrs = await started.kv(
        subjects.KV_POD_CIDRS, "node -> its pod CIDR (cluster-pool IPAM; identity writes)"
    )
    service = IdentityService(bus, kv, allocator, pool, settings, pod_cidrs)
    await service.register(started.metadata)
    IDENTITIES.labels("reserved").set(len(reserved.BY_ID) - 1)  # "unknown" is no identity
    tasks = TaskGroup()
    tasks.spawn("gc", lambda: periodically(settings.gc_interval, service.collect_garbage))
    tasks.spawn("kv-backlog", lambda: periodically(1.0, service.flush_backlog))
    tasks.spawn("reconcile", lambda: _reconcile_loop(service, settings.reconcile_interval))
    reaper = NodeReaper(
        await started.kv(subjects.KV_ENDPOINTS, "node.namespace.pod -> endpoint"),
        await started.kv(subjects.KV_IPCACHE, "owner.address -> identity, node"),
        await started.kv(subjects.KV_LIVENESS, "node -> alive or dead (identity's verdict)"),
        expiry=settings.node_expiry,
        grace=settings.node_grace,
        connected=lambda: bus.nc.is_connected,
    )
    await reaper.load()
    nodes = await started.kv(subjects.KV_NODES, "node -> underlay address, pod CIDR")
    service.node_alive, service.node_seen = reaper.alive, reaper.seen
    tasks.spawn("watch-nodes", lambda: kv_watch.follow(nodes, reaper.on_node, reaper.on_synced))
    await bus.subscribe(subjects.NODE_HEARTBEAT_ALL, reaper.on_heartbeat_message)
    tasks.spawn("judge-nodes", lambda: periodically(1.0, reaper.tick))
    started.log.info(
        "identity service ready",
        nats=redact(settings.nats_url),
        redis=redact(settings.redis_url),
        metrics=started.metrics_port,
    )
    await started.until_signalled()
    await tasks.close()
    await bus.close()
    await allocator.close()
    await client.aclose()


async def _reconcile_loop(service: IdentityService, interval: float) -> None:
    """Reconcile at start, then every ``interval``, or sooner when an allocation went wrong.

    A failed pass (Redis or NATS away) is retried after a short pause.
    """
    service.reconcile_soon.set()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.reconcile_soon.wait(), timeout=interval)
        await asyncio.sleep(1.0)  # let the outage that triggered it pass; coalesce triggers
        service.reconcile_soon.clear()
        try:
            await service.reconcile()
        except (MembraneError, nats.errors.Error, TimeoutError) as exc:
            service.log.warning("reconcile failed, retrying", error=str(exc))
            service.reconcile_soon.set()
