"""The policy service's face: documents in over NATS, resolved policy out to the KV.

The ``policies`` bucket is the source of truth: ``apply`` validates every document first and
stores them only if all are valid; every replica watches the bucket and the ``identities``
bucket, feeds the resolver, and writes the results of the subject identities whose policy
changed to ``resolved``, the peer sets whose members changed to ``selectors`` (and CIDR
identities to ``ipcache``). Nothing is published before both snapshots are in, so a restarted
service never withdraws policy it has not read yet.

Order of writes, so that an agent never sees a subject name a peer set it cannot find: new and
changed peer sets first, then the subjects, then the deletions of peer sets nobody names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import Any

import msgspec
import nats.errors
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from services.policy import diff as policy_diff
from services.policy.explain import explain
from services.policy.model import Policy
from services.policy.parser import parse_document
from services.policy.resolver import Resolver, is_subject_range
from shared import __version__, kv_watch, log, startup, subjects
from shared.bus import Bus, KVEvent, MicroService, redact
from shared.config import CommonSettings, require_at_least, setting
from shared.errors import InvalidArgument, MembraneError, NotFound
from shared.flow_api import PolicyDiffReply, PolicyDiffRequest
from shared.messages import (
    Empty,
    ExplainReply,
    ExplainRequest,
    FQDNCache,
    Identity,
    IPCacheEntry,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyDeleteReply,
    PolicyDocument,
    PolicyListReply,
    PolicyRef,
    PolicySummary,
)
from shared.runtime import TaskGroup, periodically

AUDIT_ANNOTATION = "policy.membrane.io/audit"

POLICIES = Gauge("membrane_policy_policies", "Policies stored")
RULES = Gauge("membrane_policy_rules", "Rules of the stored policies")
SELECTORS = Gauge("membrane_policy_selector_cache_selectors", "Selectors in the selector cache")
RESOLVE_SECONDS = Histogram(
    "membrane_policy_resolution_seconds",
    "From a change (identity or policy) to its resolved entries written",
    ["cause"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
)
REJECTED = Counter(
    "membrane_policy_rejected_documents_total", "Documents refused by apply, by reason", ["reason"]
)


@dataclasses.dataclass(frozen=True)
class PolicySettings(CommonSettings):
    concurrency: int = setting(32, "requests served at once per replica")
    cidr_matches_pods: bool = setting(
        False,
        "Cilium's fromCIDR/toCIDR/fromCIDRSet/toCIDRSet match pod addresses too, per address, "
        "as a NetworkPolicy ipBlock always does (default: Cilium's meaning, outside the "
        "cluster only); every replica must agree",
    )

    def __post_init__(self) -> None:
        require_at_least(self, 1, "concurrency")


class StoredPolicy(msgspec.Struct, kw_only=True):
    """A ``policies`` bucket value: the document as applied."""

    document: dict[str, Any]
    source: str = "-"


class PolicyService:
    def __init__(
        self,
        bus: Bus,
        policies: KeyValue,
        resolved: KeyValue,
        selectors: KeyValue,
        ipcache: KeyValue,
        *,
        cidr_matches_pods: bool = False,
    ) -> None:
        self.bus = bus
        self.cidr_matches_pods = cidr_matches_pods
        self.policies = policies
        self.resolved_kv = resolved
        self.selectors_kv = selectors
        self.ipcache = ipcache
        self.resolver = Resolver()
        self.by_store_key: dict[str, Policy] = {}
        self.synced = {name: asyncio.Event() for name in ("identities", "policies", "fqdn")}
        self.pending: set[int] = set()  # subjects to publish once both snapshots are in
        self.reconciled = False
        self.unpublished: set[int] = set()  # subjects whose write failed; retried periodically
        self.unpublished_sets: set[int] = set()  # ... and peer sets
        self.log = log.get("policy")

    # --- requests ----------------------------------------------------------------------------

    def _validate(self, req: PolicyApplyRequest) -> list[tuple[str, Policy, dict[str, Any]]]:
        parsed = []
        for index, document in enumerate(req.documents, start=1):
            if req.audit:
                document = _with_audit(document)
            try:
                policy = parse_document(
                    document, req.source, index, cidr_matches_pods=self.cidr_matches_pods
                )
            except InvalidArgument as exc:
                REJECTED.labels((exc.field or "document").split(".")[0].split("[")[0]).inc()
                raise
            parsed.append(
                (
                    subjects.policy_key(policy.kind.value, policy.namespace, policy.name),
                    policy,
                    document,
                )
            )
        return parsed

    async def apply(self, req: PolicyApplyRequest) -> PolicyApplyReply:
        parsed = self._validate(req)  # all documents, before anything is stored
        results: list[str] = []
        warnings: list[str] = []
        l7: list[str] = []
        for key, policy, document in parsed:
            warnings.extend(f"{key}: {w}" for w in policy.warnings)
            if policy.has_l7:
                l7.append(key)
            if req.dry_run:
                results.append(f"{key} valid")
                continue
            stored = msgspec.json.encode(StoredPolicy(document=document, source=req.source))
            previous = await _get(self.policies, key)
            if previous == stored:
                results.append(f"{key} unchanged")
                continue
            await self.policies.put(key, stored)
            results.append(f"{key} {'configured' if previous else 'created'}")
        return PolicyApplyReply(results=results, warnings=warnings, l7_at_l4=l7)

    def _find(self, ref: PolicyRef) -> list[str]:
        found = [
            key
            for key, policy in self.by_store_key.items()
            if policy.name == ref.name
            and (not ref.kind or policy.kind.value == ref.kind)
            and (policy.namespace == ref.namespace or (not policy.namespace and not ref.kind))
        ]
        if not found:
            where = f" in namespace {ref.namespace}" if ref.namespace else ""
            raise NotFound(f"no policy {ref.name!r}{where}", field="name")
        return found

    async def delete(self, ref: PolicyRef) -> PolicyDeleteReply:
        keys = self._find(ref)
        for key in keys:
            await self.policies.delete(key)
        return PolicyDeleteReply(deleted=keys)

    async def list(self, _: Empty) -> PolicyListReply:
        return PolicyListReply(
            policies=[
                PolicySummary(
                    kind=p.kind.value,
                    namespace=p.namespace,
                    name=p.name,
                    rules=len(p.rules),
                    audit=p.audit,
                    subjects=len(self.resolver.subjects_of(p.key)),
                )
                for _, p in sorted(self.by_store_key.items())
            ]
        )

    async def get(self, ref: PolicyRef) -> PolicyDocument:
        key = self._find(ref)[0]
        policy = self.by_store_key[key]
        return PolicyDocument(
            kind=policy.kind.value,
            namespace=policy.namespace,
            name=policy.name,
            document=policy.to_dict(),
        )

    async def explain(self, req: ExplainRequest) -> ExplainReply:
        """A destination given by its address alone (identity 0) is outside the cluster: its
        identity is the ipcache's, and the names it was learned for say why toFQDNs hold it."""
        dst_identity = req.dst_identity
        names: list[str] = []
        if not dst_identity and req.dst_ip:
            dst_identity = self.resolver.outside_identity(req.dst_ip)
            names = self.resolver.fqdn_reasons(req.dst_ip)
        result = explain(
            self.resolver,
            req.src_identity,
            dst_identity,
            req.protocol,
            req.port,
            src_ports=req.src_ports,
            dst_ports=req.dst_ports,
            src_ip=req.src_ip,
            dst_ip=req.dst_ip,
        )
        return ExplainReply(allowed=result.allowed, lines=result.lines() + names)

    async def diff(self, req: PolicyDiffRequest) -> PolicyDiffReply:
        """Recorded flows replayed against today's policies and with ``req.documents`` applied.
        Synchronous on purpose: the resolver does not move while both sides are decided."""
        documents = [
            parse_document(document, req.source, index)
            for index, document in enumerate(req.documents, start=1)
        ]
        changes, affected = policy_diff.diff(self.resolver, documents, req.groups, req.ports)
        return PolicyDiffReply(changes=changes, groups=len(req.groups), affected=len(affected))

    async def register(self, metadata: dict[str, str], concurrency: int) -> MicroService:
        micro = await self.bus.add_service(
            subjects.POLICY_SERVICE,
            __version__,
            "policy documents resolved into per-identity allow/deny entries",
            metadata,
            queue_group=subjects.POLICY_QUEUE,
            concurrency=concurrency,
        )
        serve = micro.endpoint
        await serve("apply", subjects.POLICY_APPLY, PolicyApplyRequest, self.apply)
        await serve("delete", subjects.POLICY_DELETE, PolicyRef, self.delete)
        await serve("list", subjects.POLICY_LIST, Empty, self.list)
        await serve("get", subjects.POLICY_GET, PolicyRef, self.get)
        await serve("explain", subjects.POLICY_EXPLAIN, ExplainRequest, self.explain)
        await serve("diff", subjects.POLICY_DIFF, PolicyDiffRequest, self.diff)
        return micro

    # --- bucket watches -> resolver -> resolved ---------------------------------------------

    def on_identity(self, event: KVEvent) -> set[int]:
        try:
            number = int(event.key)
        except ValueError:
            return set()
        # a pod identity's entry is written even when no policy selects it (nor selected it):
        # its endpoints deny until the entry is there
        own = {number} if is_subject_range(number) else set()
        if event.value is None:
            return self.resolver.remove_identity(number) | own
        try:
            identity = msgspec.json.decode(event.value, type=Identity)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.log.warning("unreadable identity entry", key=event.key)
            return set()
        return self.resolver.set_identity(number, identity.labels) | own

    def on_policy(self, event: KVEvent) -> set[int]:
        old = self.by_store_key.pop(event.key, None)
        changed: set[int] = set()
        if old is not None:
            changed |= self.resolver.remove_policy(old.key)
        if event.value is not None:
            try:
                stored = msgspec.json.decode(event.value, type=StoredPolicy)
                policy = parse_document(
                    stored.document, stored.source, cidr_matches_pods=self.cidr_matches_pods
                )
            except (msgspec.ValidationError, msgspec.DecodeError, MembraneError) as exc:
                # stored by a newer or buggy writer: leave it out rather than guess
                self.log.error(
                    "stored policy does not parse; ignored", key=event.key, error=str(exc)
                )
                return changed
            self.by_store_key[event.key] = policy
            changed |= self.resolver.set_policy(policy)
        POLICIES.set(len(self.by_store_key))
        RULES.set(sum(len(p.rules) for p in self.by_store_key.values()))
        return changed

    def on_fqdn(self, event: KVEvent) -> set[int]:
        """An endpoint's DNS cache: the addresses of toFQDNs peer sets (no subject changes)."""
        names: dict[str, list[IPv4Address]] | None = None
        if event.value is not None:
            try:
                cache = msgspec.json.decode(event.value, type=FQDNCache)
                names = {
                    entry.name: [IPv4Address(a.ip) for a in entry.addresses]
                    for entry in cache.names
                }
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                # a cache that does not read adds nothing (toFQDNs then selects less)
                self.log.warning("unreadable fqdn cache entry", key=event.key, error=str(exc))
        self.resolver.set_fqdn_cache(event.key, names)
        return set()

    async def follow(self, name: str, kv: KeyValue, handle: Callable[[KVEvent], set[int]]) -> None:
        async def synced() -> None:
            self.synced[name].set()
            if not all(e.is_set() for e in self.synced.values()):
                return  # half the picture: publishing now could narrow policy
            if not self.reconciled:
                self.reconciled = True
                await self.reconcile()
            elif self.pending:
                await self.publish(self.pending, name)
            self.pending = set()

        async def changed(event: KVEvent) -> None:
            started = time.perf_counter()
            changed = handle(event)
            if all(e.is_set() for e in self.synced.values()):
                await self.publish(changed, name)
                RESOLVE_SECONDS.labels(name).observe(time.perf_counter() - started)
            else:
                self.pending |= changed

        await kv_watch.follow(kv, changed, synced)

    async def reconcile(self) -> None:
        """Once both snapshots are in: make the ``resolved`` bucket exactly what the resolver
        says, removing entries for identities no policy selects any more (this service owns
        the bucket; entries may be left from before a restart)."""
        stored = await Bus.snapshot(self.resolved_kv)
        wanted = self.resolver.published_subjects()
        stale = {int(key) for key in stored if key.isdigit() and int(key) not in wanted}
        stored_sets = await Bus.snapshot(self.selectors_kv)
        self.resolver.take_peer_set_changes()  # all of them, written below
        sets = set(self.resolver.peer_sets())
        sets |= {int(key) for key in stored_sets if key.isdigit()}
        await self.publish(wanted | stale, "start", sets)
        self.log.info(
            "resolved bucket reconciled",
            subjects=len(wanted),
            removed=len(stale),
            peer_sets=len(self.resolver.peer_sets()),
        )

    async def publish(
        self, subjects_changed: set[int], cause: str, peer_sets: set[int] | None = None
    ) -> None:
        """Write the resolved policy of each changed subject, the peer sets that changed (and
        ``peer_sets``, to write again), and CIDR identity changes."""
        changed_sets, gone_sets = self.resolver.take_peer_set_changes()
        touched_sets = {s.id for s in changed_sets} | set(gone_sets) | (peer_sets or set())
        # the sets to write now, by id (looked up, not the whole table copied, per event)
        current = {i: s for i in touched_sets if (s := self.resolver.peer_set(i)) is not None}
        added, removed = self.resolver.take_cidr_changes()
        first: list[Awaitable[object]] = []  # CIDR identities and peer sets, before subjects
        for net, number in added.items():
            entry = IPCacheEntry(cidr=str(net), identity=number)
            first.append(self.ipcache.put(subjects.ipcache_key(net), msgspec.json.encode(entry)))
        first.extend(
            self.selectors_kv.put(subjects.selector_key(i), msgspec.json.encode(current[i]))
            for i in sorted(touched_sets)
            if i in current
        )
        then: list[Awaitable[object]] = []
        for subject in sorted(subjects_changed):
            resolved = self.resolver.published(subject)
            if resolved is None:
                then.append(self.resolved_kv.delete(subjects.identity_key(subject)))
            else:
                then.append(
                    self.resolved_kv.put(
                        subjects.identity_key(subject), msgspec.json.encode(resolved)
                    )
                )
        last: list[Awaitable[object]] = [
            self.ipcache.delete(subjects.ipcache_key(net)) for net in removed
        ]
        last.extend(
            self.selectors_kv.delete(subjects.selector_key(i))
            for i in touched_sets
            if i not in current
        )
        try:
            for writes in (first, then, last):
                for start in range(0, len(writes), 256):  # bounded: a cold start is thousands
                    await asyncio.gather(*writes[start : start + 256])
        except (nats.errors.Error, TimeoutError) as exc:
            # NATS slow or away: keep resolving, write these again later (never crash the
            # watch, whose restart would replay every bucket)
            self.unpublished |= subjects_changed
            self.unpublished_sets |= touched_sets
            self.log.warning("resolved policy not written; will retry", error=str(exc))
        SELECTORS.set(self.resolver.stats().get("selectors", 0))
        if subjects_changed or touched_sets:
            self.log.debug(
                "resolved", cause=cause, subjects=len(subjects_changed), peer_sets=len(touched_sets)
            )

    async def retry_unpublished(self) -> None:
        if self.unpublished or self.unpublished_sets:
            subjects_failed, self.unpublished = self.unpublished, set()
            sets_failed, self.unpublished_sets = self.unpublished_sets, set()
            await self.publish(subjects_failed, "retry", sets_failed)


def _with_audit(document: dict[str, Any]) -> dict[str, Any]:
    metadata = dict(document.get("metadata") or {})
    annotations = dict(metadata.get("annotations") or {})
    annotations[AUDIT_ANNOTATION] = "true"
    metadata["annotations"] = annotations
    return {**document, "metadata": metadata}


async def _get(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except Exception:  # nats.js: KeyNotFoundError / KeyDeletedError
        return None
    return entry.value or None


async def run(settings: PolicySettings) -> None:
    started = await startup.start(settings, "policy")
    kv = started.kv
    service = PolicyService(
        started.bus,
        await kv(subjects.KV_POLICIES, "kind/namespace/name -> policy document"),
        await kv(subjects.KV_RESOLVED, "identity -> resolved policy"),
        await kv(subjects.KV_SELECTORS, "peer set id -> identities it selects"),
        await kv(subjects.KV_IPCACHE, "owner.address -> identity, node"),
        cidr_matches_pods=settings.cidr_matches_pods,
    )
    identities = await kv(subjects.KV_IDENTITIES, "identity -> labels")
    tasks = TaskGroup()
    tasks.spawn(
        "watch-identities", lambda: service.follow("identities", identities, service.on_identity)
    )
    tasks.spawn(
        "watch-policies", lambda: service.follow("policies", service.policies, service.on_policy)
    )
    fqdn = await kv(subjects.KV_FQDN, "node.endpoint -> names the endpoint resolved")
    tasks.spawn("watch-fqdn", lambda: service.follow("fqdn", fqdn, service.on_fqdn))
    tasks.spawn("retry", lambda: periodically(1.0, service.retry_unpublished))
    await service.register(started.metadata, settings.concurrency)
    started.log.info(
        "policy service ready", nats=redact(settings.nats_url), metrics=started.metrics_port
    )
    await started.until_signalled()
    await tasks.close()
    await started.bus.close()
