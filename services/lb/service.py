"""The lb service: Services, EndpointSlices and API frontends in, ``services`` records out.

A request is validated completely, then its cluster IPs, node ports, frontend ids and backend
ids are allocated in Redis (one round trip per pool for the whole request), then the records
are written to ``services`` (pipelined) and the specs to ``lb-specs`` (in shards, see
spec_store.py). Replicas share requests through a queue group; each follows the ``endpoints``
bucket so that services with a selector follow their pods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network
from typing import Any

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from services.lb import ids, records
from services.lb.model import (
    ApiService,
    EndpointSliceSpec,
    ServiceSpec,
    ipv4_int,
    ipv4_text,
    parse_api,
    parse_endpoint_slice,
    parse_service,
)
from services.lb.record_store import RecordStore
from services.lb.records import Spec
from services.lb.spec_store import SpecStore
from shared import __version__, gcpause, kv_watch, log, maglev, services_bucket, startup, subjects
from shared.bus import Bus, KVEvent, MicroService, redact
from shared.config import CommonSettings, env_name, setting
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.messages import (
    Empty,
    Endpoint,
    LBApplyReply,
    LBApplyRequest,
    LBCreateRequest,
    LBDeleteReply,
    LBListReply,
    LBService,
    LBServiceRef,
    part_digest,
)
from shared.redis_store import make_redis
from shared.runtime import TaskGroup

ALGORITHM_ANNOTATION = "lb.membrane.io/algorithm"
ALGORITHMS = ("maglev", "random")

SERVICES = Gauge("membrane_lb_services", "Services known to this replica")
WRITES = Counter("membrane_lb_records_written_total", "services bucket writes", ["op"])
# services per chunk of records: big enough that the two Redis calls of a chunk are cheap,
# small enough that the agents start on the first while the rest are built
RECORD_CHUNK = 2000
# checked parts kept for the request that applies them: at most this many bytes of them (a bulk
# of 20,000 Services with their slices is 10 MB; their parse takes several times that), each
# at most this long
CHECKED_BYTES = 32 << 20
CHECKED_SECONDS = 120.0
RECOMPUTE_SECONDS = Histogram(
    "membrane_lb_recompute_seconds",
    "From a pod or request to its services' records written",
    ["cause"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)


@dataclasses.dataclass(frozen=True)
class LBSettings(CommonSettings):
    service_cidr: str = setting("10.96.0.0/12", "range cluster IPs are allocated from")
    lb_algorithm: str = setting("maglev", "backend selection: maglev or random")
    maglev_table_size: int = setting(
        maglev.DEFAULT_SIZE, "largest Maglev table (a prime); each service's from its backends"
    )
    maglev_seed: int = setting(0, "Maglev seed for the cluster (0: chosen once, kept in Redis)")
    concurrency: int = setting(32, "requests served at once per replica")

    def __post_init__(self) -> None:
        try:
            IPv4Network(self.service_cidr)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=env_name("service_cidr")) from None
        if self.lb_algorithm not in ALGORITHMS:
            raise InvalidArgument("maglev or random", field=env_name("lb_algorithm"))
        if not maglev.is_prime(self.maglev_table_size) or self.maglev_table_size > 131071:
            raise InvalidArgument(
                "must be a prime up to 131071", field=env_name("maglev_table_size")
            )


Parsed = tuple[str, Spec | EndpointSliceSpec, Any]  # (kind, spec, the document as it came)
Ident = tuple[str, str, str]  # (kind, namespace, name): what a document may not share
# a checked part's parse, kept for its apply: (when, the part's size, the parse, its names)
Kept = tuple[float, int, list[Parsed], frozenset[Ident]]
_decode_part = msgspec.json.Decoder(list[dict[str, Any]]).decode


_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(LBService).decode


class StoredSpec(msgspec.Struct, kw_only=True):
    """An ``lb-specs`` value: what was applied (a Service, an EndpointSlice, an API service)."""

    kind: str  # Service | EndpointSlice | api
    document: dict[str, Any]


def spec_key(kind: str, namespace: str, name: str) -> str:
    return f"{'slice' if kind == 'EndpointSlice' else 'service'}.{namespace}.{name}"


def shown(key: str) -> str:
    """A record key as users read names everywhere: ``namespace/name``."""
    return key.replace(".", "/", 1)


class LBCore:
    def __init__(
        self,
        bus: Bus,
        specs_kv: KeyValue,
        services_kv: KeyValue,
        allocator: ids.Allocator,
        settings: LBSettings,
        seed: int,
    ) -> None:
        self.bus = bus
        self.specs_kv = specs_kv
        self.store = SpecStore(specs_kv)
        self.services_kv = services_kv
        self.record_store = RecordStore(services_kv)
        self.allocator = allocator
        self.settings = settings
        self.cidr = IPv4Network(settings.service_cidr)
        self.cluster_ips = ids.Pool(
            "clusterip", int(self.cidr.network_address) + 1, int(self.cidr.broadcast_address) - 1
        )
        self.seed = seed
        self.specs: dict[str, Spec] = {}  # by record key
        self.algorithms: dict[str, str] = {}
        self.slices: dict[str, EndpointSliceSpec] = {}  # by ns.slice-name
        self.slices_of: dict[str, set[str]] = {}  # record key -> its slices' keys
        self.frontend_owners: dict[tuple[str, int, str], str] = {}  # -> record key
        # ids never change once given (Redis keeps them): known ones need no round trip
        self.known_ids: dict[str, dict[str, int]] = {}  # pool -> owner -> id
        self.pods: dict[str, Endpoint] = {}  # by endpoints key
        self.records: dict[str, LBService] = {}
        self.lock = asyncio.Lock()
        # parts checked by a dry run, by the digest of their bytes: (when, their size, their
        # parse, their documents' names), oldest first
        self.checked: OrderedDict[str, Kept] = OrderedDict()
        self.checked_bytes = 0
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        self.synced = {n: asyncio.Event() for n in ("specs", "endpoints", "services")}
        self.log = log.get("lb")

    def _set_slice(self, key: str, item: EndpointSliceSpec | None) -> None:
        old = self.slices.pop(key, None)
        if old is not None:
            self.slices_of.get(subjects.service_key(old.namespace, old.service), set()).discard(key)
        if item is not None:
            self.slices[key] = item
            self.slices_of.setdefault(
                subjects.service_key(item.namespace, item.service), set()
            ).add(key)

    def _set_record(self, key: str, record: LBService | None) -> None:
        old = self.records.pop(key, None)
        if old is not None:
            for f in old.frontends:
                if self.frontend_owners.get((f.ip, f.port, f.protocol)) == key:
                    del self.frontend_owners[(f.ip, f.port, f.protocol)]
        if record is not None:
            self.records[key] = record
            for f in record.frontends:
                self.frontend_owners[(f.ip, f.port, f.protocol)] = key

    async def _ids(self, pool: ids.Pool, owners: list[str]) -> dict[str, int]:
        """Every owner's id (the pool's whole map: a bulk's 60,000 owners are not copied)."""
        known = self.known_ids.setdefault(pool.name, {})
        missing = [o for o in owners if o not in known]
        if missing:
            values = await self.allocator.allocate(pool, [(o, 0) for o in missing])
            known.update(zip(missing, values, strict=True))
        return known

    # --- parsing -----------------------------------------------------------------------------

    def _parse(self, req: LBApplyRequest) -> list[Parsed]:
        """Every document of ``req`` (``documents``, then each of ``parts``, then the parts
        ``part_digests`` names) checked; the first error in document order raises, naming the
        document by its number in the whole apply. A digest this replica does not keep raises
        NotFound before anything is taken."""
        self._forget(time.monotonic())  # what an apply that never came left
        missing = [d for d in req.part_digests if d not in self.checked]
        if missing:
            raise NotFound(
                f"{req.source}: {len(missing)} of the {len(req.part_digests)} parts named by "
                "their digests were not checked by this replica (or no longer kept): send "
                "their bytes",
                field="part_digests",
            )
        named: list[tuple[str, bytes | None]] = [(part_digest(p), p) for p in map(bytes, req.parts)]
        named += [(d, None) for d in req.part_digests]
        taken: dict[str, Kept] = {}  # the kept parses named, out of the store before any check
        for digest, _ in named:
            cached = self.checked.pop(digest, None)
            if cached is not None:
                self.checked_bytes -= cached[1]
                taken[digest] = cached
        seen: set[Ident] = set()
        parsed = self._parse_documents(req.documents, req.source, req.first, seen)
        first = req.first + len(req.documents)
        for digest, part in named:
            cached = taken.pop(digest, None)
            if cached is not None:  # checked already: only its names against the others'
                _, _, items, idents = cached
                if seen.isdisjoint(idents):  # distinct within the part: its dry run checked
                    seen |= idents
                else:  # a name given twice: the first such document is the error
                    for index, (kind, item, document) in enumerate(items, start=first):
                        _check_unique(seen, kind, item, document, req.source, index)
                size = cached[1]
            elif part is None:  # named twice in this request: its documents' names clash
                raise InvalidArgument(
                    f"{req.source}: the part from document {first} on is given twice",
                    field="part_digests",
                )
            else:
                try:
                    documents = _decode_part(part)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise InvalidArgument(
                        f"{req.source}: the part from document {first} on is not a JSON array "
                        f"of documents: {exc}",
                        field="parts",
                    ) from None
                items = self._parse_documents(documents, req.source, first, seen)
                idents = frozenset((kind, i.namespace, i.name) for kind, i, _ in items)
                size = len(part)
            if req.dry_run:
                self._remember(digest, size, items, idents)
            parsed.extend(items)
            first += len(items)
        return parsed

    def _remember(
        self, digest: str, size: int, items: list[Parsed], idents: frozenset[Ident]
    ) -> None:
        """Keep a checked part's parse for the request that applies it (by the digest of its
        bytes), for a while and up to a bound (of the parts' bytes): it is only a saving, a
        part sent again whose parse is not kept is parsed again; a part named by its digest
        alone and not kept fails the request, and the sender sends its bytes."""
        old = self.checked.pop(digest, None)
        if old is not None:
            self.checked_bytes -= old[1]
        self.checked[digest] = (time.monotonic(), size, items, idents)
        self.checked_bytes += size
        self._forget(time.monotonic())

    def _forget(self, now: float) -> None:
        """Drop the oldest kept parses while over the bound or too old."""
        while self.checked and (
            self.checked_bytes > CHECKED_BYTES
            or next(iter(self.checked.values()))[0] < now - CHECKED_SECONDS
        ):
            _, (_, size, _, _) = self.checked.popitem(last=False)
            self.checked_bytes -= size

    def _parse_documents(
        self, documents: list[Any], source: str, first: int, seen: set[tuple[str, str, str]]
    ) -> list[Parsed]:
        parsed: list[Parsed] = []
        for index, document in enumerate(documents, start=first):
            kind = document.get("kind") if isinstance(document, dict) else None
            meta = document.get("metadata") if isinstance(document, dict) else None
            try:
                item: Spec | EndpointSliceSpec
                if kind == "Service":
                    item = parse_service(document, self.cidr)
                    annotations = meta.get("annotations") if isinstance(meta, dict) else None
                    algorithm = (annotations or {}).get(ALGORITHM_ANNOTATION)
                    if algorithm is not None and algorithm not in ALGORITHMS:
                        raise InvalidArgument(
                            f"{algorithm!r} is not maglev or random",
                            field=f"metadata.annotations.{ALGORITHM_ANNOTATION}",
                        )
                elif kind == "EndpointSlice":
                    item = parse_endpoint_slice(document)
                else:
                    raise InvalidArgument(
                        f"the lb service takes Service and EndpointSlice, not {kind!r}",
                        field="kind",
                    )
                _check_unique(seen, kind, item, document, "", index)
            except InvalidArgument as exc:
                name = meta.get("name", "?") if isinstance(meta, dict) else "?"
                label = f"{source}: document {index} ({kind} {name})"
                where = f"{exc.field}: " if exc.field else ""
                raise InvalidArgument(f"{label}: {where}{exc.message}", field=exc.field) from None
            parsed.append((str(kind), item, document))
        return parsed

    def _check_frontends(self, specs: Iterable[tuple[str, Spec]]) -> None:
        """A frontend address belongs to one service."""
        owners = self.frontend_owners
        claimed: dict[tuple[str, int, str], str] = {}
        for key, spec in specs:
            if isinstance(spec, ApiService):
                wanted = [(f.ip, f.port, f.protocol) for f in spec.frontends]
            else:
                wanted = [("0.0.0.0", p.node_port, p.protocol) for p in spec.ports if p.node_port]
                if spec.cluster_ip:
                    wanted += [(spec.cluster_ip, p.port, p.protocol) for p in spec.ports]
            for address in wanted:
                holder = claimed.get(address) or owners.get(address)
                if holder is not None and holder != key:
                    raise AlreadyExists(
                        f"frontend {records.frontend_owner(*address)} of {shown(key)} belongs to "
                        f"{shown(holder)}",
                        field="frontends",
                    )
                claimed[address] = key

    # --- requests ----------------------------------------------------------------------------

    async def apply(self, req: LBApplyRequest) -> LBApplyReply:
        with gcpause.paused():  # a bulk apply builds records for tens of thousands of services
            return await self._apply(req)

    async def _apply(self, req: LBApplyRequest) -> LBApplyReply:
        parsed = self._parse(req)
        services = [
            (subjects.service_key(i.namespace, i.name), i)
            for _, i, _ in parsed
            if isinstance(i, ServiceSpec)
        ]
        self._check_frontends(services)
        if req.dry_run:
            return LBApplyReply(results=[f"{k.lower()}/{i.name} valid" for k, i, _ in parsed])
        async with self.lock:
            # kubectl's words: what was there before is configured, the rest created
            existed = [
                f"{i.namespace}.{i.name}" in self.slices
                if isinstance(i, EndpointSliceSpec)
                else subjects.service_key(i.namespace, i.name) in self.specs
                for _, i, _ in parsed
            ]
            started = time.perf_counter()
            # cluster IPs first: a conflict there must stop the request before anything else
            ips = await self._allocate_cluster_ips(services, parsed)
            for (key, spec), ip in zip(services, ips, strict=True):
                ip_text = ipv4_text(ip)
                if spec.cluster_ip != ip_text:  # allocated here, or kept from an earlier apply
                    spec = dataclasses.replace(spec, cluster_ip=ip_text)
                self.specs[key] = spec
            # node ports not given are allocated, stable per service port
            await self._allocate_node_ports([key for key, _ in services])
            for _, item, document in parsed:
                if isinstance(item, EndpointSliceSpec):
                    self._set_slice(f"{item.namespace}.{item.name}", item)
                else:
                    meta = document.get("metadata") or {}
                    algorithm = (meta.get("annotations") or {}).get(ALGORITHM_ANNOTATION)
                    self.algorithms[subjects.service_key(item.namespace, item.name)] = (
                        algorithm or self.settings.lb_algorithm
                    )
            touched = {
                subjects.service_key(i.namespace, i.name)
                for _, i, _ in parsed
                if not isinstance(i, EndpointSliceSpec)
            }
            touched |= {
                subjects.service_key(i.namespace, i.service)
                for _, i, _ in parsed
                if isinstance(i, EndpointSliceSpec)
            }
            # the records first, the datapath waits for them; the specs' shard writes go out
            # while the records' ack is on its way (an apply waits for the slower of the two
            # round trips, not for their sum)
            acked = await self._send_records(touched)
            try:
                await self.store.write(self._stored(parsed))
            finally:
                if acked is not None:
                    await acked
            RECOMPUTE_SECONDS.labels("apply").observe(time.perf_counter() - started)
        SERVICES.set(len(self.specs))
        return LBApplyReply(
            results=[
                f"{kind.lower()}/{i.name} {'configured' if known else 'created'}"
                for (kind, i, _), known in zip(parsed, existed, strict=True)
            ]
        )

    def _stored(self, parsed: list[Parsed]) -> dict[str, bytes]:
        """The ``lb-specs`` values of applied documents."""
        out: dict[str, bytes] = {}
        for kind, item, document in parsed:
            stored = document  # copied by _with_cluster_ip when it changes anything
            if isinstance(item, ServiceSpec):  # the allocated address sticks on re-apply
                stored = _with_cluster_ip(
                    stored, self.specs[subjects.service_key(item.namespace, item.name)]
                )
            out[spec_key(kind, item.namespace, item.name)] = msgspec.json.encode(
                StoredSpec(kind=kind, document=stored)
            )
        return out

    async def _allocate_cluster_ips(
        self, services: list[tuple[str, ServiceSpec]], parsed: list[Any]
    ) -> list[int]:
        requests = [
            (key, ipv4_int(s.cluster_ip) if s.cluster_ip else self._known_ip(key))
            for key, s in services
        ]
        try:
            return await self.allocator.allocate(self.cluster_ips, requests)
        except ids.Conflict as exc:
            key, spec = services[exc.index]
            raise AlreadyExists(
                f"{key}: spec.clusterIP: {spec.cluster_ip} is already allocated to {exc.holder}",
                field="spec.clusterIP",
            ) from None

    def _known_ip(self, key: str) -> int:
        spec = self.specs.get(key)
        if isinstance(spec, ServiceSpec) and spec.cluster_ip:
            return ipv4_int(spec.cluster_ip)
        return 0

    async def _allocate_node_ports(self, keys: list[str]) -> None:
        requests: list[tuple[str, int]] = []
        where: list[tuple[str, int]] = []
        for key in keys:
            spec = self.specs[key]
            if not isinstance(spec, ServiceSpec) or not spec.node_port:
                continue
            for i, port in enumerate(spec.ports):
                requests.append((f"{key}/{port.port}/{port.protocol}", port.node_port))
                where.append((key, i))
        try:
            values = await self.allocator.allocate(ids.NODE_PORTS, requests)
        except ids.Conflict as exc:
            key, i = where[exc.index]
            raise AlreadyExists(
                f"{key}: spec.ports[{i}].nodePort: {requests[exc.index][1]} is already "
                f"allocated to {exc.holder}",
                field=f"spec.ports[{i}].nodePort",
            ) from None
        for (key, i), value in zip(where, values, strict=True):
            spec = self.specs[key]
            assert isinstance(spec, ServiceSpec)
            ports = list(spec.ports)
            ports[i] = dataclasses.replace(ports[i], node_port=value)
            self.specs[key] = dataclasses.replace(spec, ports=tuple(ports))

    async def create(self, req: LBCreateRequest) -> LBService:
        spec = parse_api(req.namespace, req.name, req.frontends, req.backends, req.affinity_timeout)
        key = subjects.service_key(spec.namespace, spec.name)
        current = self.specs.get(key)
        if isinstance(current, ServiceSpec):
            raise AlreadyExists(
                f"{shown(key)} is a Kubernetes Service; delete it first", field="name"
            )
        self._check_frontends([(key, spec)])
        async with self.lock:
            self.specs[key] = spec
            self.algorithms[key] = self.settings.lb_algorithm
            document = {
                "frontends": list(req.frontends),
                "backends": list(req.backends),
                "affinity_timeout": req.affinity_timeout,
            }
            await self._recompute({key})
            await self.store.write(
                {
                    spec_key("api", spec.namespace, spec.name): msgspec.json.encode(
                        StoredSpec(kind="api", document=document)
                    )
                }
            )
        return self.records[key]

    def _find(self, ref: LBServiceRef) -> str:
        key = subjects.service_key(ref.namespace or "default", ref.name)
        if key not in self.specs and key not in self.records:
            raise NotFound(f"no service {ref.namespace or 'default'}/{ref.name}", field="name")
        return key

    async def get(self, ref: LBServiceRef) -> LBService:
        key = self._find(ref)
        record = self.records.get(key)
        if record is None:
            raise NotFound(f"service {key} has no record yet", field="name")
        return record

    async def list_services(self, _: Empty) -> LBListReply:
        return LBListReply(services=[self.records[k] for k in sorted(self.records)])

    async def delete(self, ref: LBServiceRef) -> LBDeleteReply:
        key = self._find(ref)
        namespace, name = key.split(".", 1)
        async with self.lock:
            spec = self.specs.pop(key, None)
            self.algorithms.pop(key, None)
            self._set_record(key, None)
            await self.store.write({spec_key("Service", namespace, name): None})
            await self._remove_records([key])
            if isinstance(spec, ServiceSpec):
                await self.allocator.release(self.cluster_ips, [key])
                await self.allocator.release(
                    ids.NODE_PORTS, [f"{key}/{p.port}/{p.protocol}" for p in spec.ports]
                )
        SERVICES.set(len(self.specs))
        return LBDeleteReply(deleted=[shown(key)])

    async def delete_slice(self, ref: LBServiceRef) -> LBDeleteReply:
        key = f"{ref.namespace or 'default'}.{ref.name}"
        found = self.slices.get(key)
        self._set_slice(key, None)
        if found is None:
            raise NotFound(f"no EndpointSlice {shown(key)}", field="name")
        async with self.lock:
            await self.store.write({f"slice.{key}": None})
            await self._recompute({subjects.service_key(found.namespace, found.service)})
        return LBDeleteReply(deleted=[shown(key)])

    # --- records -----------------------------------------------------------------------------

    def _desired(self, key: str) -> records.Desired | None:
        spec = self.specs.get(key)
        if spec is None:
            return None
        own = sorted(self.slices_of.get(subjects.service_key(spec.namespace, spec.name), ()))
        return records.desired(
            key,
            spec,
            self.algorithms.get(key, self.settings.lb_algorithm),
            self.pods.values(),
            [self.slices[k] for k in own],
        )

    async def _recompute(self, keys: set[str]) -> None:
        """Write the records of ``keys`` that changed."""
        acked = await self._send_records(keys)
        if acked is not None:
            await acked

    async def _send_records(self, keys: set[str]) -> asyncio.Future[Any] | None:
        """Write the records of ``keys`` that changed into their ``services`` shards
        (shared/services_bucket.py), about ``RECORD_CHUNK`` services at a time: the agents
        program the first shards while the next are built. The future of every write, or
        None when nothing changed.

        A chunk holds whole shards (keys are taken in shard order), so each shard is written
        once per call; the writes are not awaited here (record_store.py).
        """
        by_shard: dict[int, list[str]] = {}
        for key in keys:
            by_shard.setdefault(services_bucket.shard_of(key), []).append(key)
        writes: list[asyncio.Task[None]] = []
        chunk: list[str] = []
        shards = sorted(by_shard)
        for i, shard in enumerate(shards):
            chunk += sorted(by_shard[shard])
            if len(chunk) >= RECORD_CHUNK or i == len(shards) - 1:
                changes = await self._records(chunk)
                if changes:
                    writes += self.record_store.send(changes)
                    await asyncio.sleep(0)  # the writes start before the next chunk is built
                chunk = []
        if not writes:
            return None
        return asyncio.gather(*writes)

    async def _records(self, keys: list[str]) -> dict[str, bytes]:
        """The changed records of ``keys``, encoded; ids allocated for their frontends and
        backends. A record unchanged but not in its shard (a bucket an earlier version
        wrote, one key per service) is written too."""
        wanted = [d for d in (self._desired(k) for k in keys) if d is not None]
        fronts, backs = records.owners(wanted)
        front_ids = await self._ids(ids.FRONTENDS, fronts)
        back_ids = await self._ids(ids.BACKENDS, backs)
        out: dict[str, bytes] = {}
        has = self.record_store.has
        for d in wanted:
            built = records.record(
                d, front_ids, back_ids, seed=self.seed, maglev_max=self.settings.maglev_table_size
            )
            old = self.records.get(d.key)
            record = records.changed(old, built)
            if record is None:
                if old is not None and not has(d.key):
                    out[d.key] = _encode(old)
                continue
            self._set_record(d.key, record)
            out[d.key] = _encode(record)
        WRITES.labels("put").inc(len(out))
        return out

    async def _remove_records(self, keys: list[str]) -> None:
        """Take services' records out of their shards (and an earlier version's keys)."""
        writes = self.record_store.send(dict.fromkeys(keys))
        if writes:
            await asyncio.gather(*writes)
        for key in keys:
            if key in self.record_store.view.legacy:
                await self.services_kv.delete(key)
        WRITES.labels("delete").inc(len(keys))

    async def _drop_legacy(self) -> None:
        """Delete the keys an earlier version wrote (one per service) once the service's
        record is in its shard: readers take the shard's, so the datapath does not change."""
        for key in self.record_store.legacy_keys():
            if key in self.record_store.view.sharded:
                await self.services_kv.delete(key)

    # --- watches -----------------------------------------------------------------------------

    def on_spec(self, event: KVEvent) -> None:
        """A shard of applied specs written by another replica (or an earlier run)."""
        for key, value in self.store.on_event(event).items():
            self._spec_changed(key, value)

    def _spec_changed(self, key: str, value: bytes | None) -> None:
        kind_prefix, _, rest = key.partition(".")
        if value is None:
            if kind_prefix == "slice":
                found = self.slices.get(rest)
                self._set_slice(rest, None)
                if found is not None:
                    self._mark(subjects.service_key(found.namespace, found.service))
            else:
                self.specs.pop(rest, None)
            return
        try:
            stored = msgspec.json.decode(value, type=StoredSpec)
            if stored.kind == "EndpointSlice":
                item = parse_endpoint_slice(stored.document)
                if self.slices.get(rest) != item:
                    self._set_slice(rest, item)
                    self._mark(subjects.service_key(item.namespace, item.service))
            elif stored.kind == "Service":
                spec = parse_service(stored.document, None)
                if self.specs.get(rest) != spec:
                    self.specs[rest] = spec
                    annotations = (stored.document.get("metadata") or {}).get("annotations") or {}
                    self.algorithms[rest] = annotations.get(
                        ALGORITHM_ANNOTATION, self.settings.lb_algorithm
                    )
                    self._mark(rest)
            else:
                doc = stored.document
                namespace, name = rest.split(".", 1)
                api = parse_api(
                    namespace,
                    name,
                    doc.get("frontends", []),
                    doc.get("backends", []),
                    int(doc.get("affinity_timeout", 0)),
                )
                if self.specs.get(rest) != api:
                    self.specs[rest] = api
                    self._mark(rest)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidArgument) as exc:
            self.log.error("stored spec does not parse; ignored", key=key, error=str(exc))

    def on_endpoint(self, event: KVEvent) -> None:
        old = self.pods.get(event.key)
        new: Endpoint | None = None
        if event.value is not None:
            try:
                new = msgspec.json.decode(event.value, type=Endpoint)
            except (msgspec.ValidationError, msgspec.DecodeError):
                self.log.warning("unreadable endpoint", key=event.key)
                return
            self.pods[event.key] = new
        else:
            self.pods.pop(event.key, None)
        for pod in (old, new):
            if pod is None:
                continue
            for key, spec in self.specs.items():
                if (
                    isinstance(spec, ServiceSpec)
                    and spec.selector
                    and spec.namespace == pod.namespace
                    and all(pod.labels.get(k) == v for k, v in spec.selector.items())
                ):
                    self._mark(key)

    def on_record(self, event: KVEvent) -> None:
        """A ``services`` entry another replica (or an earlier run) wrote: the services in it
        that changed (this replica's own writes give none)."""
        for key, value in self.record_store.on_event(event):
            if value is None:
                self._set_record(key, None)
                continue
            try:
                record = _decode_record(value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                self.log.warning("unreadable service record", key=key)
                continue
            old = self.records.get(key)
            if old is None or old.revision <= record.revision:
                self._set_record(key, record)

    def _mark(self, key: str) -> None:
        self.dirty.add(key)
        self.wake.set()

    async def follow(self, name: str, kv: KeyValue, handle: Callable[[KVEvent], None]) -> None:
        await kv_watch.follow(kv, handle, self.synced[name].set)

    async def reconcile_forever(self) -> None:
        """Recompute services whose pods or slices changed, in batches."""
        for event in self.synced.values():
            await event.wait()
        self.dirty |= set(self.specs) | set(self.records)  # start: make the bucket right
        self.wake.set()
        while True:
            await self.wake.wait()
            self.wake.clear()
            await asyncio.sleep(0.01)  # let a burst of pod changes coalesce
            async with self.lock:
                keys, self.dirty = self.dirty, set()
                stale = [
                    k
                    for k in keys
                    if k not in self.specs and (k in self.records or self.record_store.has(k))
                ]
                started = time.perf_counter()
                try:
                    for key in stale:
                        self._set_record(key, None)
                    if stale:
                        await self._remove_records(stale)
                    await self._recompute(keys)
                    await self._drop_legacy()
                except Exception as exc:  # Redis or NATS away: try again shortly
                    self.log.warning("recompute failed; retrying", error=str(exc))
                    self.dirty |= keys
                    await asyncio.sleep(1.0)
                    self.wake.set()
                    continue
                RECOMPUTE_SECONDS.labels("watch").observe(time.perf_counter() - started)

    async def start(self, endpoints: KeyValue) -> TaskGroup:
        """Follow the three buckets until their snapshots are in, then reconcile in the
        background; the tasks, for the caller to close."""
        tasks = TaskGroup()
        tasks.spawn("watch-specs", lambda: self.follow("specs", self.specs_kv, self.on_spec))
        tasks.spawn(
            "watch-endpoints", lambda: self.follow("endpoints", endpoints, self.on_endpoint)
        )
        tasks.spawn(
            "watch-services", lambda: self.follow("services", self.services_kv, self.on_record)
        )
        for event in self.synced.values():
            await event.wait()
        self.dirty.clear()  # reconcile_forever starts with every service anyway
        tasks.spawn("reconcile", self.reconcile_forever)
        return tasks

    async def register(self, metadata: dict[str, str], concurrency: int) -> MicroService:
        micro = await self.bus.add_service(
            subjects.LB_SERVICE,
            __version__,
            "services: frontends, backends, Maglev",
            metadata,
            queue_group=subjects.LB_QUEUE,
            concurrency=concurrency,
        )
        serve = micro.endpoint
        await serve("apply", subjects.LB_APPLY, LBApplyRequest, self.apply)
        await serve("create", subjects.LB_CREATE, LBCreateRequest, self.create)
        await serve("delete", subjects.LB_DELETE, LBServiceRef, self.delete)
        await serve("delete-slice", subjects.LB_DELETE_SLICE, LBServiceRef, self.delete_slice)
        await serve("list", subjects.LB_LIST, Empty, self.list_services)
        await serve("get", subjects.LB_GET, LBServiceRef, self.get)
        return micro


def _check_unique(
    seen: set[tuple[str, str, str]],
    kind: str,
    item: Spec | EndpointSliceSpec,
    document: Any,
    source: str,
    index: int,
) -> None:
    """A document may not name what an earlier one of the same apply named. With ``source``
    the error names the document; without, the caller adds that."""
    ident = (kind, item.namespace, item.name)
    if ident not in seen:
        seen.add(ident)
        return
    message = f"{kind} {item.namespace}/{item.name} is given twice"
    if source:
        meta = document.get("metadata") or {}
        name = meta.get("name", "?")
        message = f"{source}: document {index} ({kind} {name}): metadata.name: {message}"
    raise InvalidArgument(message, field="metadata.name")


def _with_cluster_ip(document: dict[str, Any], spec: Spec) -> dict[str, Any]:
    assert isinstance(spec, ServiceSpec)
    given = document.get("spec") or {}
    if given.get("clusterIP") == spec.cluster_ip and not spec.node_port:
        return document  # nothing was allocated: store it as it came
    body = dict(document)
    body["spec"] = dict(body.get("spec") or {})
    body["spec"]["clusterIP"] = spec.cluster_ip
    ports = [dict(p) for p in body["spec"].get("ports") or []]
    for port, parsed in zip(ports, spec.ports, strict=False):
        if parsed.node_port:
            port["nodePort"] = parsed.node_port
    body["spec"]["ports"] = ports
    return body


async def run(settings: LBSettings) -> None:
    started = await startup.start(settings, "lb")
    kv = started.kv
    allocator = ids.Allocator(
        make_redis(settings.redis_url),
        bulk=make_redis(settings.redis_url, socket_timeout=ids.BULK_SECONDS),
    )
    seed = settings.maglev_seed or await allocator.maglev_seed()
    core = LBCore(
        started.bus,
        await kv(subjects.KV_LB_SPECS, "shard.<n> -> the applied documents whose key hashes to n"),
        await kv(subjects.KV_SERVICES, "namespace.name -> frontends, backends, revision"),
        allocator,
        settings,
        seed,
    )
    tasks = await core.start(await kv(subjects.KV_ENDPOINTS, "node.namespace.pod -> endpoint"))
    await core.register(started.metadata, settings.concurrency)
    started.log.info("lb service ready", nats=redact(settings.nats_url), services=len(core.specs))
    await started.until_signalled()
    await tasks.close()
    await started.bus.close()
