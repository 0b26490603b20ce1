"""Policy resolution: a whole cluster cold, and one new identity, side by side in one run.

Generates a cluster of identities (pods of ~10 apps in namespaces of 50 identities, with
namespace labels team/env/kubernetes.io/metadata.name) and policies as YAML text, parsed with
``parse_documents``: CiliumNetworkPolicy with fromEndpoints/toEndpoints (matchLabels,
matchExpressions In/NotIn) and toPorts, some ingressDeny; NetworkPolicy with podSelector,
namespaceSelector (alone and ANDed with podSelector), ports, endPort ranges and ipBlock with
except; CNP with toCIDRSet/toCIDR; CNP with entities (host, remote-node, health,
kube-apiserver, world). Then measures:

1. Cold resolution of everything: the resolver alone in this process (identities then
   policies, and policies then identities), and end to end: a real nats-server, the two
   buckets written first, then a PolicyService started in this process (as
   ``services.policy.service.run`` starts it, without signals or the micro service), timed
   from its start until this process, watching ``resolved``, has seen every subject.
2. New identity -> every changed ``resolved`` and ``selectors`` entry seen: identities put one
   at a time into the ``identities`` bucket as the identity service does; the expected subjects
   and peer sets come from a mirror resolver in this process (whose own time is the "resolver
   alone" row).
3. The same with 100 and 1,000 unrelated policies (selectors the new identities, in a
   namespace of their own, never match), fresh server and service for each, side by side:
   the ratio should stay near 1, and so should the selector evaluations per new identity.

    python bench/policy.py [--identities 10000] [--policies 1000] [--new 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import uvloop
import yaml
from nats.js.kv import KeyValue

from membrane.servers import NatsServer, ServerProcess
from services.policy.model import CLUSTER_MIN, Policy
from services.policy.parser import parse_documents
from services.policy.resolver import Resolver
from services.policy.service import PolicyService, StoredPolicy
from shared import log, subjects
from shared.bus import Bus, KVEvent
from shared.labels import pod_identity_labels
from shared.messages import Identity, PeerSet, ResolvedPolicy
from shared.runtime import TaskGroup

GOAL_COLD_SECONDS = 10.0
GOAL_NEW_P99_MS = 20.0
GOAL_RATIO = 1.5  # "near 1": 1,000 unrelated policies may cost at most this much more
PER_NAMESPACE = 50  # identities per namespace (10 apps x 5 versions)
APPS = ("web", "api", "db", "cache", "worker", "auth", "search", "queue", "billing", "frontend")
TIERS = {"web": "frontend", "frontend": "frontend", "db": "data", "cache": "data"}
ARRIVALS_NS = "arrivals"
WAIT_SECONDS = 30.0
BATCH = 256


# --- the cluster -------------------------------------------------------------------------------


def namespace_name(n: int) -> str:
    return f"ns-{n:03d}"


def namespace_labels(n: int) -> dict[str, str]:
    labels = {
        "kubernetes.io/metadata.name": namespace_name(n),
        "team": f"team-{n % 25}",
        "env": ("prod", "staging", "dev")[n % 3],
    }
    if n % 40 == 0:
        labels["purpose"] = "monitoring"
    return labels


def make_identities(count: int) -> dict[int, list[str]]:
    """Identity number -> labels, numbered from CLUSTER_MIN, 50 per namespace."""
    found: dict[int, list[str]] = {}
    for i in range(count):
        n, app, version = i // PER_NAMESPACE, APPS[(i % PER_NAMESPACE) // 5], i % 5 + 1
        pod = {"app": app, "tier": TIERS.get(app, "backend"), "version": f"v{version}"}
        found[CLUSTER_MIN + i] = pod_identity_labels(
            namespace_name(n), pod, namespace_labels(n), app
        )
    return found


def _ports(*ports: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"ports": [{"port": str(port), "protocol": proto} for port, proto in ports]}]


def _cnp(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def make_policy(j: int, namespaces: int) -> dict[str, Any]:
    """Policy j of the mix: 40% CNP L3/L4, 35% NetworkPolicy, 15% CIDR, 10% entities."""
    n = j % namespaces
    k = j // namespaces
    ns = namespace_name(n)
    a, b, c, d = (APPS[(2 * k + n + step) % len(APPS)] for step in (0, 1, 3, 5))
    kind = j % 20
    if kind < 8:
        spec: dict[str, Any] = {
            "endpointSelector": {"matchLabels": {"app": a}},
            "ingress": [
                {
                    "fromEndpoints": [
                        {"matchLabels": {"app": b}},
                        {
                            "matchLabels": {"app": c},
                            "matchExpressions": [
                                {"key": "version", "operator": "NotIn", "values": ["v1"]}
                            ],
                        },
                    ],
                    "toPorts": _ports((8080, "TCP")),
                }
            ],
        }
        if j % 2:
            spec["egress"] = [
                {
                    "toEndpoints": [
                        {"matchExpressions": [{"key": "app", "operator": "In", "values": [c, d]}]}
                    ],
                    "toPorts": _ports((5432, "TCP"), (6379, "TCP")),
                },
                {
                    "toEndpoints": [
                        {
                            "matchLabels": {
                                "k8s:io.kubernetes.pod.namespace": "kube-system",
                                "k8s-app": "kube-dns",
                            }
                        }
                    ],
                    "toPorts": _ports((53, "UDP"), (53, "TCP")),
                },
            ]
        if j % 40 == 0:
            spec["ingressDeny"] = [
                {"fromEndpoints": [{"matchLabels": {"app": d}}], "toPorts": _ports((22, "TCP"))}
            ]
        return _cnp(f"{a}-l4-{j}", ns, spec)
    if kind < 15:
        other = namespace_name((n + 7) % namespaces)
        ingress: list[dict[str, Any]] = [
            {
                "from": [
                    {"podSelector": {"matchLabels": {"app": b}}},
                    {
                        "namespaceSelector": {"matchLabels": {"team": f"team-{(n + 1) % 25}"}},
                        "podSelector": {"matchLabels": {"app": c}},
                    },
                ],
                "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 443}],
            },
            {
                "from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}],
                "ports": [{"protocol": "TCP", "port": 9090}],
            },
        ]
        if j % 5 == 0:
            ingress.append(
                {
                    "from": [
                        {"ipBlock": {"cidr": "172.16.0.0/12", "except": [f"172.16.{n}.0/24"]}}
                    ],
                    "ports": [{"protocol": "TCP", "port": 443}],
                }
            )
        knp: dict[str, Any] = {"podSelector": {"matchLabels": {"app": a}}, "ingress": ingress}
        if j % 3 == 0:
            knp["policyTypes"] = ["Ingress", "Egress"]
            knp["egress"] = [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": other}
                            },
                            "podSelector": {
                                "matchExpressions": [
                                    {"key": "tier", "operator": "In", "values": ["data"]}
                                ]
                            },
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": 5432, "endPort": 5440}],
                }
            ]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"{a}-knp-{j}", "namespace": ns},
            "spec": knp,
        }
    if kind < 18:
        octet = j % 250
        return _cnp(
            f"{a}-cidr-{j}",
            ns,
            {
                "endpointSelector": {"matchLabels": {"app": a}},
                "egress": [
                    {
                        "toCIDRSet": [
                            {"cidr": f"10.{octet}.0.0/16", "except": [f"10.{octet}.{n % 250}.0/24"]}
                        ],
                        "toPorts": _ports((443, "TCP")),
                    },
                    {"toCIDR": [f"192.0.2.{octet}/32"]},
                ],
            },
        )
    return _cnp(
        f"{a}-entities-{j}",
        ns,
        {
            "endpointSelector": {"matchLabels": {"app": a}},
            "ingress": [{"fromEntities": ["host", "remote-node", "health"]}],
            "egress": [
                {"toEntities": ["kube-apiserver"], "toPorts": _ports((443, "TCP"))},
                {"toEntities": ["world"], "toPorts": _ports((443, "TCP"), (80, "TCP"))},
            ],
        },
    )


def arrival_policies() -> list[dict[str, Any]]:
    """The policies of the arrivals' namespace: what the new identities of section 3 touch."""
    ns = ARRIVALS_NS
    return [
        _cnp(
            "web",
            ns,
            {
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "fromEndpoints": [{"matchLabels": {"app": "api"}}],
                        "toPorts": _ports((8080, "TCP")),
                    },
                    {"fromEntities": ["world"], "toPorts": _ports((443, "TCP"))},
                ],
            },
        ),
        _cnp(
            "api",
            ns,
            {
                "endpointSelector": {"matchLabels": {"app": "api"}},
                "ingress": [
                    {
                        "fromEndpoints": [{"matchLabels": {"app": "web"}}],
                        "toPorts": _ports((8080, "TCP")),
                    }
                ],
                "egress": [
                    {
                        "toEndpoints": [{"matchLabels": {"app": "db"}}],
                        "toPorts": _ports((5432, "TCP")),
                    }
                ],
            },
        ),
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "db", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                        "ports": [{"protocol": "TCP", "port": 5432}],
                    }
                ],
            },
        },
    ]


def arrival_labels(k: int) -> list[str]:
    """Same app names as the rest of the cluster (they are everywhere), their own namespace."""
    app = ("web", "api", "db")[k % 3]
    return pod_identity_labels(
        ARRIVALS_NS,
        {"app": app, "version": f"r{k}"},
        {"kubernetes.io/metadata.name": ARRIVALS_NS, "team": "arrivals", "env": "sandbox"},
        app,
    )


@dataclass
class PolicySet:
    documents: list[dict[str, Any]]
    policies: list[Policy]
    parse_seconds: float

    @property
    def keys(self) -> list[str]:
        return [subjects.policy_key(p.kind.value, p.namespace, p.name) for p in self.policies]


def parse_set(documents: list[dict[str, Any]]) -> PolicySet:
    """Documents -> YAML text -> parse_documents, as ``membrane policy apply -f`` reads them."""
    text = yaml.safe_dump_all(documents, sort_keys=False)
    started = time.perf_counter()
    policies = parse_documents(text, "bench.yaml")
    return PolicySet(documents, policies, time.perf_counter() - started)


# --- measurements helpers ----------------------------------------------------------------------


def ms_percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def fill(resolver: Resolver, identities: dict[int, list[str]], policies: Iterable[Policy]) -> None:
    for number, labels in identities.items():
        resolver.set_identity(number, labels)
    for policy in policies:
        resolver.set_policy(policy)


def fill_reversed(
    resolver: Resolver, identities: dict[int, list[str]], policies: Iterable[Policy]
) -> None:
    for policy in policies:
        resolver.set_policy(policy)
    for number, labels in identities.items():
        resolver.set_identity(number, labels)


def same_results(one: Resolver, other: Resolver) -> bool:
    """Both resolvers give every subject the same entries (revisions aside)."""
    if one.subjects() != other.subjects():
        return False
    for subject in one.subjects():
        a, b = one.resolved(subject), other.resolved(subject)
        assert a is not None and b is not None
        if msgspec.structs.replace(a, revision=0) != msgspec.structs.replace(b, revision=0):
            return False
    return True


def bucket_agrees(stored: dict[str, bytes], sets: dict[str, bytes], resolver: Resolver) -> bool:
    """The ``resolved`` and ``selectors`` buckets hold exactly what the resolver says (revisions
    aside)."""
    if set(stored) != {str(s) for s in resolver.subjects()}:
        return False
    published = resolver.peer_sets()
    if set(sets) != {str(i) for i in published}:
        return False
    for key, value in sets.items():
        if msgspec.json.decode(value, type=PeerSet).identities != published[int(key)].identities:
            return False
    for key, value in stored.items():
        want = resolver.resolved(int(key))
        got = msgspec.json.decode(value, type=ResolvedPolicy)
        if want is None or msgspec.structs.replace(got, revision=want.revision) != want:
            return False
    return True


class TimedService(PolicyService):
    """The product service, with clocks around what its watch loops call."""

    def __init__(
        self,
        bus: Bus,
        policies: KeyValue,
        resolved: KeyValue,
        selectors: KeyValue,
        ipcache: KeyValue,
    ):
        super().__init__(bus, policies, resolved, selectors, ipcache)
        self.handle_seconds = 0.0  # decode + parse + resolver, summed
        self.publish_seconds = 0.0
        self.received = 0.0  # last on_identity call
        self.handled = 0.0  # ... and its return
        self.publish_started = 0.0
        self.published = 0.0
        self.identity_published = asyncio.Event()
        self.reconcile_after = asyncio.Future[int]()  # resolved's last revision before it
        self.early_subjects = 0  # published before both snapshots were in (should be 0)
        self.follows = 0  # watch loops started: more than 2 means one crashed and restarted

    async def follow(self, name: str, kv: KeyValue, handle: Callable[[KVEvent], set[int]]) -> None:
        self.follows += 1
        await super().follow(name, kv, handle)

    def on_identity(self, event: KVEvent) -> set[int]:
        self.received = time.perf_counter()
        changed = super().on_identity(event)
        self.handled = time.perf_counter()
        self.handle_seconds += self.handled - self.received
        return changed

    def on_policy(self, event: KVEvent) -> set[int]:
        started = time.perf_counter()
        changed = super().on_policy(event)
        self.handle_seconds += time.perf_counter() - started
        return changed

    async def publish(
        self, subjects_changed: set[int], cause: str, peer_sets: set[int] | None = None
    ) -> None:
        if not all(e.is_set() for e in self.synced.values()):
            self.early_subjects += len(subjects_changed)
        if cause == "start" and not self.reconcile_after.done():
            status = await self.resolved_kv.status()
            self.reconcile_after.set_result(status.stream_info.state.last_seq or 0)
        self.publish_started = time.perf_counter()
        await super().publish(subjects_changed, cause, peer_sets)
        self.published = time.perf_counter()
        self.publish_seconds += self.published - self.publish_started
        if cause == "identities":
            self.identity_published.set()


class ResolvedWatch:
    """This process's view of the ``resolved`` bucket: when each key last changed."""

    def __init__(self) -> None:
        self.high = 0  # highest KV revision seen
        self.last: dict[int, tuple[int, float]] = {}  # subject -> (KV revision, seen at)
        self._waiters: list[tuple[set[int], int, asyncio.Future[float]]] = []

    async def run(self, kv: KeyValue) -> None:
        async with contextlib.aclosing(Bus.watch(kv)) as events:
            async for event in events:
                if event is None:
                    continue
                now = time.perf_counter()
                self.high = max(self.high, event.revision)
                try:
                    subject = int(event.key)
                except ValueError:
                    continue
                self.last[subject] = (event.revision, now)
                for pending, after, future in self._waiters:
                    if event.revision > after and subject in pending:
                        pending.discard(subject)
                        if not pending and not future.done():
                            future.set_result(now)
                self._waiters = [w for w in self._waiters if not w[2].done()]

    def expect(self, wanted: set[int], after: int) -> asyncio.Future[float]:
        """Resolves to the time the last of ``wanted`` changed after KV revision ``after``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        pending = set(wanted)
        already = 0.0
        for subject in wanted:
            revision, seen_at = self.last.get(subject, (0, 0.0))
            if revision > after:
                pending.discard(subject)
                already = max(already, seen_at)
        if not pending:
            future.set_result(already or time.perf_counter())
        else:
            self._waiters.append((pending, after, future))
        return future


async def put_all(kv: KeyValue, items: list[tuple[str, bytes]]) -> None:
    for start in range(0, len(items), BATCH):
        await asyncio.gather(*(kv.put(k, v) for k, v in items[start : start + BATCH]))


def identity_value(number: int, labels: list[str]) -> bytes:
    return msgspec.json.encode(Identity(id=number, labels=labels, kind="cluster"))


# --- end to end --------------------------------------------------------------------------------


@dataclass
class Cold:
    seconds: float = 0.0
    connect: float = 0.0  # service: connect and bind the buckets
    synced: float = 0.0  # ... both snapshots read (and resolved as they came)
    handle: float = 0.0  # CPU in decode + parse + resolver
    publish: float = 0.0  # the first publish: every subject's put, acked
    subjects: int = 0
    early: int = 0  # subjects published before both snapshots were in
    agrees: bool = False


@dataclass
class Steps:
    name: str
    latencies: list[float] = field(default_factory=list)  # put -> every changed entry seen
    resolver: list[float] = field(default_factory=list)  # mirror.set_identity alone
    put_ack: list[float] = field(default_factory=list)
    to_service: list[float] = field(default_factory=list)  # put -> on_identity called
    resolve: list[float] = field(default_factory=list)  # on_identity (decode + resolver)
    publish: list[float] = field(default_factory=list)  # publish (puts, acked)
    to_seen: list[float] = field(default_factory=list)  # resolve done -> all seen here
    changed: list[int] = field(default_factory=list)  # subjects whose own document changed
    sets: list[int] = field(default_factory=list)  # peer sets that changed
    evaluations: list[int] = field(default_factory=list)  # the service's resolver
    timeouts: int = 0
    restarts: int = 0  # the service's watch loops restarted (a crash, e.g. a NATS timeout)
    cold: Cold = field(default_factory=Cold)


async def session(
    tmp: Path,
    name: str,
    identities: dict[int, list[str]],
    policies: PolicySet,
    mirror: Resolver,
    arrivals: list[tuple[int, list[str]]],
    warmup: int,
) -> Steps:
    """A fresh nats-server; the buckets filled; the service cold; then the new identities."""
    steps = Steps(name)
    nats = ServerProcess("nats-server", NatsServer(tmp / name.replace(" ", "-")))
    nats.start()
    bench = await Bus.connect(nats.url, "bench-policy", retry_for=10)
    tasks = TaskGroup()
    service_bus: Bus | None = None
    watcher: asyncio.Task[None] | None = None
    set_watcher: asyncio.Task[None] | None = None
    try:
        identities_kv = await bench.kv(subjects.KV_IDENTITIES)
        policies_kv = await bench.kv(subjects.KV_POLICIES)
        resolved_kv = await bench.kv(subjects.KV_RESOLVED)
        selectors_kv = await bench.kv(subjects.KV_SELECTORS)
        await bench.kv(subjects.KV_IPCACHE)
        await put_all(
            identities_kv, [(str(n), identity_value(n, ls)) for n, ls in identities.items()]
        )
        await put_all(
            policies_kv,
            [
                (key, msgspec.json.encode(StoredPolicy(document=doc, source="bench.yaml")))
                for key, doc in zip(policies.keys, policies.documents, strict=True)
            ],
        )
        watch = ResolvedWatch()
        watcher = asyncio.create_task(watch.run(resolved_kv))
        set_watch = ResolvedWatch()
        set_watcher = asyncio.create_task(set_watch.run(selectors_kv))
        mirror.take_peer_set_changes()
        expected = mirror.subjects()
        expected_sets = set(mirror.peer_sets())

        # cold: as services.policy.service.run, without signals, metrics or micro endpoints
        started = time.perf_counter()
        service_bus = await Bus.connect(nats.url, "membrane-policy", retry_for=10)
        service = TimedService(
            service_bus,
            await service_bus.kv(subjects.KV_POLICIES),
            await service_bus.kv(subjects.KV_RESOLVED),
            await service_bus.kv(subjects.KV_SELECTORS),
            await service_bus.kv(subjects.KV_IPCACHE),
        )
        their_identities = await service_bus.kv(subjects.KV_IDENTITIES)
        connected = time.perf_counter()
        tasks.spawn(
            "watch-identities",
            lambda: service.follow("identities", their_identities, service.on_identity),
        )
        tasks.spawn(
            "watch-policies",
            lambda: service.follow("policies", service.policies, service.on_policy),
        )
        await asyncio.gather(*(e.wait() for e in service.synced.values()))
        synced = time.perf_counter()
        # done: every subject written by the start-up reconcile (the whole, final state) seen
        after = await asyncio.wait_for(service.reconcile_after, WAIT_SECONDS)
        done = await asyncio.wait_for(watch.expect(expected, after), WAIT_SECONDS)
        done = max(done, await asyncio.wait_for(set_watch.expect(expected_sets, 0), WAIT_SECONDS))
        stored = await Bus.snapshot(resolved_kv)
        stored_sets = await Bus.snapshot(selectors_kv)
        steps.cold = Cold(
            seconds=done - started,
            connect=connected - started,
            synced=synced - started,
            handle=service.handle_seconds,
            publish=service.publish_seconds,
            subjects=len(expected),
            early=service.early_subjects,
            agrees=service.resolver.subjects() == expected
            and same_results(service.resolver, mirror)
            and bucket_agrees(stored, stored_sets, mirror),
        )

        for index, (number, labels) in enumerate(arrivals):
            t = time.perf_counter()
            changed = mirror.set_identity(number, labels)
            sets_changed, sets_gone = mirror.take_peer_set_changes()
            resolver_seconds = time.perf_counter() - t
            evaluations = service.resolver.selector_evaluations
            service.identity_published.clear()
            seen = watch.expect(changed, watch.high)
            moved = {s.id for s in sets_changed} | set(sets_gone)
            sets_seen = set_watch.expect(moved, set_watch.high)
            t0 = time.perf_counter()
            await identities_kv.put(str(number), identity_value(number, labels))
            acked = time.perf_counter()
            try:
                done = await asyncio.wait_for(seen, WAIT_SECONDS)
                done = max(done, await asyncio.wait_for(sets_seen, WAIT_SECONDS))
            except TimeoutError:
                steps.timeouts += 1
                continue
            await asyncio.wait_for(service.identity_published.wait(), WAIT_SECONDS)
            if index < warmup:
                continue
            steps.latencies.append(done - t0)
            steps.resolver.append(resolver_seconds)
            steps.put_ack.append(acked - t0)
            steps.to_service.append(service.received - t0)
            steps.resolve.append(service.handled - service.received)
            steps.publish.append(service.published - service.publish_started)
            steps.to_seen.append(done - service.handled)
            steps.changed.append(len(changed))
            steps.sets.append(len(sets_changed) + len(sets_gone))
            steps.evaluations.append(service.resolver.selector_evaluations - evaluations)
        steps.restarts = service.follows - 2
    finally:
        await tasks.close()
        for task in (watcher, set_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if service_bus is not None:
            await service_bus.close()
        await bench.close()
        nats.stop()
    return steps


# --- the run -----------------------------------------------------------------------------------


@dataclass
class InProcess:
    parse_seconds: float
    identities_first: float
    policies_first: float
    evaluations_first: int
    evaluations_reversed: int
    stats: dict[str, int]
    agree: bool


@dataclass
class Results:
    identities: int
    policies: int
    in_process: InProcess
    main: Steps
    unrelated: list[tuple[int, Steps]]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_async(args: argparse.Namespace, tmp: Path) -> Results:
    identities = make_identities(args.identities)
    namespaces = max(1, math.ceil(args.identities / PER_NAMESPACE))
    full = parse_set([make_policy(j, namespaces) for j in range(args.policies)])

    progress("1. cold resolution, in process")
    mirror = Resolver()
    first = timed(lambda: fill(mirror, identities, full.policies))
    reverse = Resolver()
    second = timed(lambda: fill_reversed(reverse, identities, full.policies))
    in_process = InProcess(
        parse_seconds=full.parse_seconds,
        identities_first=first,
        policies_first=second,
        evaluations_first=mirror.selector_evaluations,
        evaluations_reversed=reverse.selector_evaluations,
        stats=mirror.stats(),
        agree=same_results(mirror, reverse),
    )

    # 2. new pods of apps that policies select, in the namespaces they already live in
    next_number = CLUSTER_MIN + args.identities
    subjects_now = sorted(mirror.subjects())
    arrivals: list[tuple[int, list[str]]] = []
    for k in range(args.warmup + args.new):
        base = subjects_now[(k * 7919) % len(subjects_now)]
        labels = [
            f"k8s:version=new-{k}" if label.startswith("k8s:version=") else label
            for label in identities[base]
        ]
        arrivals.append((next_number + k, labels))
    progress("1-2. end to end: cold start, then new identities")
    main = await session(tmp, "main", identities, full, mirror, arrivals, args.warmup)

    unrelated: list[tuple[int, Steps]] = []
    news = [(next_number + 100_000 + k, arrival_labels(k)) for k in range(args.warmup + args.new)]
    own = arrival_policies()
    for count in (max(1, args.policies // 10), args.policies):
        progress(f"3. {count} unrelated policies")
        policy_set = parse_set(own + full.documents[:count])
        resolver = Resolver()
        fill(resolver, identities, policy_set.policies)
        steps = await session(
            tmp, f"unrelated {count}", identities, policy_set, resolver, news, args.warmup
        )
        unrelated.append((count, steps))
    return Results(args.identities, args.policies, in_process, main, unrelated)


def mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else math.nan


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def report(r: Results) -> None:
    ip = r.in_process
    s = ip.stats
    print(
        f"1. cold resolution: {r.identities} identities, {r.policies} policies "
        f"({s['rules']} rules, {s['selectors']} selectors, {s['subjects']} subjects, "
        f"{s['cidr_identities']} CIDR identities)"
    )
    cold = r.main.cold
    print(f"{'scenario':50} {'seconds':>8} {'selector evals':>15}")
    print(f"{'parse_documents (YAML text, not resolution)':50} {ip.parse_seconds:8.2f} {'-':>15}")
    print(
        f"{'resolver alone: identities, then policies':50} {ip.identities_first:8.2f} "
        f"{ip.evaluations_first:15d}"
    )
    print(
        f"{'resolver alone: policies, then identities':50} {ip.policies_first:8.2f} "
        f"{ip.evaluations_reversed:15d}"
    )
    print(f"{'end to end: service start -> all resolved seen':50} {cold.seconds:8.2f} {'-':>15}")
    print(
        f"  of which: connect+bind {cold.connect:.2f} s; both snapshots read and resolved at "
        f"{cold.synced:.2f} s (decode+parse+resolver CPU {cold.handle:.2f} s); publish of "
        f"{cold.subjects} subjects {cold.publish:.2f} s; last seen at {cold.seconds:.2f} s"
    )
    print(
        f"  subjects published before both snapshots were in: {cold.early} "
        "(the service promises 0: partial policy must not be published)"
    )
    print(
        f"  both orders give the same results: {'yes' if ip.agree else 'NO'}; "
        f"service agrees with the in-process resolver: {'yes' if cold.agrees else 'NO'}"
    )

    print()
    m = r.main
    print(
        f"2. new identity -> every changed resolved entry seen ({len(m.latencies)} new pods of "
        "selected apps, one at a time)"
    )
    header = f"{'scenario':44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(header)
    rows = [
        ("end to end (put -> all seen by a watcher)", m.latencies),
        ("  put acked", m.put_ack),
        ("  put -> service receives the identity", m.to_service),
        ("  service: decode + resolver", m.resolve),
        ("  service: publish (puts, acked)", m.publish),
        ("  resolved -> all seen by the watcher", m.to_seen),
        ("resolver alone (in-process mirror)", m.resolver),
    ]
    for label, values in rows:
        print(
            f"{label:44} {ms_percentile(values, 0.5):8.2f} {ms_percentile(values, 0.99):8.2f} "
            f"{ms_percentile(values, 1.0):8.2f}"
        )
    documents = [a + b for a, b in zip(m.changed, m.sets, strict=True)]
    print(f"{'by changed documents per new identity':44} {'count':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for low, high in ((0, 1), (2, 10), (11, 100), (101, 1_000_000)):
        picked = [t for t, n in zip(m.latencies, documents, strict=True) if low <= n <= high]
        if picked:
            span = f"{low}-{high}" if high < 1_000_000 else f">{low - 1}"
            print(
                f"{'  ' + span + ' documents':44} {len(picked):8d} "
                f"{ms_percentile(picked, 0.5):8.2f} {ms_percentile(picked, 0.99):8.2f}"
            )
    print(
        f"  per new identity: subjects changed mean {mean(m.changed):.1f} (max "
        f"{max(m.changed, default=0)}), peer sets changed mean {mean(m.sets):.1f} (max "
        f"{max(m.sets, default=0)}); selector evaluations mean {mean(m.evaluations):.1f}; "
        f"timeouts: {m.timeouts}; service watch restarts: {m.restarts}"
    )

    print()
    print("3. the same with unrelated policies (new identities in a namespace of their own)")
    print(
        f"{'unrelated policies':>18} {'p50 ms':>8} {'p99 ms':>8} {'resolver p50':>13} "
        f"{'changed/id':>11} {'evals/id':>9} {'cold s':>7} {'restarts':>9}"
    )
    for count, steps in r.unrelated:
        print(
            f"{count:18d} {ms_percentile(steps.latencies, 0.5):8.2f} "
            f"{ms_percentile(steps.latencies, 0.99):8.2f} "
            f"{ms_percentile(steps.resolver, 0.5):13.3f} {mean(steps.changed):11.1f} "
            f"{mean(steps.evaluations):9.1f} {steps.cold.seconds:7.2f} {steps.restarts:9d}"
        )
    (small, few), (big, many) = r.unrelated
    ratio50 = ms_percentile(many.latencies, 0.5) / ms_percentile(few.latencies, 0.5)
    ratio99 = ms_percentile(many.latencies, 0.99) / ms_percentile(few.latencies, 0.99)
    ratio_resolver = ms_percentile(many.resolver, 0.5) / ms_percentile(few.resolver, 0.5)
    print(
        f"ratio {big} / {small}: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x, resolver alone p50 "
        f"{ratio_resolver:.2f}x, selector evaluations "
        f"{mean(many.evaluations):.1f} vs {mean(few.evaluations):.1f} per new identity"
    )

    print()
    worst_cold = max(ip.identities_first, ip.policies_first, cold.seconds)
    print(
        f"goal cold resolution <= {GOAL_COLD_SECONDS:g} s: end to end {cold.seconds:.2f} s, "
        f"resolver alone {max(ip.identities_first, ip.policies_first):.2f} s "
        f"{verdict(worst_cold <= GOAL_COLD_SECONDS)}"
    )
    p99 = ms_percentile(m.latencies, 0.99)
    print(
        f"goal new identity -> resolved p99 <= {GOAL_NEW_P99_MS:g} ms: {p99:.2f} ms "
        f"{verdict(p99 <= GOAL_NEW_P99_MS and not m.timeouts)}"
    )
    print(
        f"goal {big} vs {small} unrelated policies, p99 ratio <= {GOAL_RATIO:g}: {ratio99:.2f}x "
        f"{verdict(ratio99 <= GOAL_RATIO)}"
    )
    print(
        f"(host: {os.cpu_count()} cores shared by nats-server, the service and this process; "
        "the service runs in this process's event loop, as one replica would)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--identities", type=int, help="cluster identities (default 10000)")
    parser.add_argument("--policies", type=int, help="policies (default 1000)")
    parser.add_argument("--new", type=int, help="new identities timed (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="new identities not timed")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = parser.parse_args()
    defaults = (1000, 100, 50) if args.quick else (10_000, 1000, 200)
    for name, default in zip(("identities", "policies", "new"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.identities < PER_NAMESPACE or args.policies < 10 or args.new < 1:
        parser.error("need at least 50 identities, 10 policies and 1 new identity")
    log.configure("warning")  # the service's debug lines would drown the results
    with tempfile.TemporaryDirectory(prefix="membrane-bench-") as tmp:
        results = uvloop.run(run_async(args, Path(tmp)))
    report(results)


if __name__ == "__main__":
    main()
