"""What ``membrane get`` and ``describe`` (and every ``X list``/``X get``) show, kubectl-like.

A :class:`Kind` says how to fetch a kind's objects over the bus and how to print them: table
columns, the extra ``-o wide`` columns, the labels ``-l`` selects on and the fields
``describe`` shows. Output shapes, as kubectl's: ``-o json``/``yaml`` print one object as an
object and a list as ``{"items": [...]}``; names are ``namespace/name`` everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from membrane import output
from membrane.client import identity, lb, policy, workloads
from shared.bus import Bus
from shared.errors import NotFound
from shared.messages import Endpoint, Identity, LBService, Node, PolicySummary

Column = tuple[str, Callable[[Any], object]]


@dataclass(frozen=True)
class Kind:
    name: str  # plural, as kubectl names resources: pods
    aliases: tuple[str, ...]
    namespaced: bool
    list_all: Callable[[Bus], Awaitable[Sequence[Any]]]
    get_one: Callable[[Bus, str, str], Awaitable[Any]]  # (bus, namespace, name)
    columns: list[Column]
    wide: list[Column] = field(default_factory=list)
    labels: Callable[[Any], dict[str, str]] = lambda _obj: {}
    # the object as -o json/yaml print it (default: its fields)
    document: Callable[[Any], Any] = msgspec.to_builtins

    def key(self, obj: Any) -> tuple[str, str]:
        return (getattr(obj, "namespace", "") if self.namespaced else "", self.name_of(obj))

    def name_of(self, obj: Any) -> str:
        return str(getattr(obj, "name", "") or getattr(obj, "id", ""))


def _labels_text(mapping: dict[str, str]) -> str:
    return output.labels(mapping)


def _age(created: float) -> str:
    if not created:
        return "-"
    seconds = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --- pods ------------------------------------------------------------------------------------


async def _pods(bus: Bus) -> list[Endpoint]:
    return await workloads.endpoints(bus)


async def _pod(bus: Bus, namespace: str, name: str) -> Endpoint:
    return await workloads.find_pod(bus, namespace, name)


def _ports(e: Endpoint) -> str:
    return ",".join(f"{p.port}/{p.protocol}" for p in e.ports) or "<none>"


PODS = Kind(
    name="pods",
    aliases=("pod", "po"),
    namespaced=True,
    list_all=_pods,
    get_one=_pod,
    columns=[
        ("NAME", lambda e: e.name),
        ("NODE", lambda e: e.node),
        ("IP", lambda e: e.ip),
        ("IDENTITY", lambda e: e.identity),
        ("LABELS", lambda e: _labels_text(e.labels)),
    ],
    wide=[
        ("OWNER", lambda e: e.owner or "<none>"),
        ("SERVICE-ACCOUNT", lambda e: e.service_account),
        ("PORTS", _ports),
        ("AGE", lambda e: _age(e.created)),
    ],
    labels=lambda e: dict(e.labels),
)


# --- services --------------------------------------------------------------------------------


def _frontends(s: LBService) -> str:
    return (
        ",".join(f"{'*' if f.node_port else f.ip}:{f.port}/{f.protocol}" for f in s.frontends)
        or "<none>"
    )


def _backends(s: LBService) -> str:
    found = sorted({f"{b.ip}:{b.port}" for f in s.frontends for b in f.backends})
    return ",".join(found) or "<none>"


SERVICES = Kind(
    name="services",
    aliases=("service", "svc"),
    namespaced=True,
    list_all=lb.list_services,
    get_one=lb.get,
    columns=[
        ("NAME", lambda s: s.name),
        ("FRONTENDS", _frontends),
        ("BACKENDS", _backends),
    ],
    wide=[
        ("ALGORITHM", lambda s: s.algorithm),
        ("AFFINITY", lambda s: f"{s.affinity_timeout}s" if s.affinity_timeout else "-"),
        ("SOURCE", lambda s: s.source),
        ("REVISION", lambda s: s.revision),
    ],
)


# --- policies --------------------------------------------------------------------------------


async def _policy(bus: Bus, namespace: str, name: str) -> PolicySummary:
    found = [
        p
        for p in await policy.list_policies(bus)
        if p.name == name and p.namespace in (namespace, "")
    ]
    if not found:
        raise NotFound(f"policy {namespace}/{name} not found")
    return found[0]


POLICIES = Kind(
    name="policies",
    aliases=("policy", "cnp", "ccnp", "netpol", "networkpolicies", "networkpolicy"),
    namespaced=True,
    list_all=policy.list_policies,
    get_one=_policy,
    columns=[
        ("NAME", lambda p: p.name),
        ("KIND", lambda p: p.kind),
        ("RULES", lambda p: p.rules),
        ("SUBJECTS", lambda p: p.subjects),
        ("AUDIT", lambda p: "yes" if p.audit else "no"),
    ],
)


# --- identities ------------------------------------------------------------------------------


async def _identity(bus: Bus, _namespace: str, name: str) -> Identity:
    try:
        number = int(name)
    except ValueError:
        raise NotFound(f"identity {name!r} not found: identities are numbers") from None
    return await identity.get(bus, number)


def identity_labels(i: Identity) -> dict[str, str]:
    """``k8s:app=web`` -> ``{"app": "web"}`` (the source dropped, as selectors read them)."""
    out = {}
    for label in i.labels:
        key, _, value = label.partition("=")
        out[key.partition(":")[2] or key] = value
    return out


IDENTITIES = Kind(
    name="identities",
    aliases=("identity", "id"),
    namespaced=False,
    list_all=identity.list_identities,
    get_one=_identity,
    columns=[
        ("ID", lambda i: i.id),
        ("KIND", lambda i: i.kind),
        ("LABELS", lambda i: ",".join(i.labels)),
    ],
    labels=identity_labels,
)


# --- nodes -----------------------------------------------------------------------------------


class ListedNode(Node):
    """A node as listed: its record and the failure detector's verdict (``liveness``)."""

    ready: bool = True


async def _listed(bus: Bus) -> dict[str, ListedNode]:
    verdicts = await workloads.liveness(bus)
    return {
        name: ListedNode(
            **msgspec.structs.asdict(n),
            ready=name not in verdicts or verdicts[name].alive,
        )
        for name, n in (await workloads.nodes(bus)).items()
    }


async def _nodes(bus: Bus) -> list[ListedNode]:
    return sorted((await _listed(bus)).values(), key=lambda n: n.name)


async def _node(bus: Bus, _namespace: str, name: str) -> ListedNode:
    found = await _listed(bus)
    if name not in found:
        raise NotFound(f"node {name} not found; nodes: {', '.join(sorted(found))}")
    return found[name]


def node_status(n: ListedNode) -> str:
    return "Ready" if n.ready else "NotReady"


NODES = Kind(
    name="nodes",
    aliases=("node", "no"),
    namespaced=False,
    list_all=_nodes,
    get_one=_node,
    columns=[
        ("NAME", lambda n: n.name),
        ("STATUS", node_status),
        ("UNDERLAY", lambda n: n.underlay_ip),
        ("POD-CIDR", lambda n: n.pod_cidr),
        ("ROUTING", lambda n: n.routing or "-"),
    ],
    wide=[
        ("HEALTH-IP", lambda n: n.health_ip or "-"),
        ("ROUTER-IP", lambda n: n.router_ip),
        ("VERSION", lambda n: n.version or "-"),
    ],
)

KINDS = [PODS, SERVICES, POLICIES, IDENTITIES, NODES]
BY_NAME = {alias: kind for kind in KINDS for alias in (kind.name, *kind.aliases)}
