"""The normalized policy model: what a policy document means, ready to be resolved.

:mod:`services.policy.parser` turns CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
NetworkPolicy documents into these frozen (hashable) objects; the resolver turns them into a
:class:`shared.messages.ResolvedPolicy` per subject identity. Every default and every scoping
rule of Cilium and Kubernetes has been applied already, so nothing here needs the YAML again::

    Policy          one document: kind, namespace, name, audit flag, specs, the source document
    └ PolicySpec    one Cilium rule (``spec``, or one element of ``specs``; the whole spec of a
      │             NetworkPolicy): the subject selector and the directions it enforces
      └ Rule        one entry of ingress/ingressDeny/egress/egressDeny: direction, allow or deny,
        │           peers (OR), ports (OR; none = every protocol and port), stable name and id
        ├ Peer      exactly one of: Selector (endpoints), Entity, CIDRRule, NameMatch (toFQDNs)
        └ PortRule  protocol number and port, port range or named port; optional L7Rules

What the resolver does with it:

- A spec selects a subject identity when ``spec.subject.matches(k8s_labels)``. Subjects are pod
  identities (cluster-local, ``CLUSTER_MIN``..``CLUSTER_MAX``): host policies (``nodeSelector``)
  are rejected by the parser, so reserved identities are never subjects.
- A spec puts its subjects in default deny in a direction when ``enforces_ingress`` /
  ``enforces_egress`` is true. Policies on one identity are a union: it is enforced in a direction
  if any spec selecting it enforces that direction, and allowed what any of their allow rules
  allow. Deny rules beat allow rules, and still deny where no spec enforces the direction (Cilium's
  ``enableDefaultDeny: false``): there the resolver allows everything else (peer 0, protocol 0,
  port 0) next to the deny entries.
- Traffic matches a rule when the remote identity matches one of ``rule.peers`` and the protocol
  and port match one of ``rule.ports`` (no ports: any). A rule without peers matches nothing: a
  Cilium ``ingress: [{}]`` enforces ingress and allows nothing, as does an explicitly empty list
  such as ``fromEndpoints: []``.
- A :class:`Selector` is over the identity's labels of the ``k8s`` source, keyed as the datapath
  sees them minus the ``k8s:`` prefix: pod labels (``app``), the namespace
  (``io.kubernetes.pod.namespace``), namespace labels (``io.cilium.k8s.namespace.labels.<key>``),
  the service account (``io.cilium.k8s.policy.serviceaccount``). Namespace scoping is already in
  the selector. Reserved and CIDR identities have no ``k8s`` labels.
- An :class:`Entity` stands for reserved identities and/or whole classes of identities:
  :attr:`Entity.targets`.
- A :class:`CIDRRule` selects addresses outside the cluster. The resolver gives its network and
  each except a node-local CIDR identity (``LOCAL_BASE | n``, never on the wire); the datapath
  finds an address's identity by longest-prefix match, so an excepted address gets an identity
  the rule does not select. An address in no known prefix is ``world`` (2), which a network of
  prefix length 0 (``0.0.0.0/0``, ``::/0``) therefore selects too (:attr:`CIDRRule.selects_world`).
- A :class:`shared.fqdn.NameMatch` (``toFQDNs``) selects the CIDR identities of the ``/32`` of
  every address the DNS proxies learned for a name it matches (``services.policy.fqdn_table``).
- A named port (``PortRule.port_name``) is resolved per endpoint from its container ports: for
  ingress from the subject pod, for egress from the destination pod.

Rule names and ids: ``Rule.name`` is ``"<namespace>/<name>[<index>]"`` (``"<name>[<index>]"``
for a cluster-wide policy). The index runs over all rules of the document in document order:
specs in order (``spec`` first, then ``specs[0]``, ``specs[1]`` ...), and in each spec its
``ingress``, ``ingressDeny``, ``egress`` and ``egressDeny`` entries in that order (NetworkPolicy:
``ingress``, then ``egress``; rules of a direction its policyTypes leave out are ignored and get
no index). ``Rule.id`` is :func:`rule_id`: a nonzero 32-bit blake2s hash of the kind and the
name, the same in every process and after restarts. The kind is hashed too because a
CiliumNetworkPolicy and a NetworkPolicy may share namespace and name. Two different rules still
collide about once in 2**32 pairs; the service detects and handles that.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import identities, protocols
from shared.fqdn import NameMatch
from shared.labels import SOURCE_K8S, LabelSet
from shared.selectors import LabelSelector, Requirement

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cilium's reserved identity numbers (DESIGN §4), from shared as every service takes them
RESERVED_HOST = identities.HOST
RESERVED_WORLD = identities.WORLD
RESERVED_UNMANAGED = identities.UNMANAGED
RESERVED_HEALTH = identities.HEALTH
RESERVED_INIT = identities.INIT
RESERVED_REMOTE_NODE = identities.REMOTE_NODE
RESERVED_KUBE_APISERVER = identities.KUBE_APISERVER
RESERVED_INGRESS = identities.INGRESS
CLUSTER_MIN = identities.CLUSTER_MIN
CLUSTER_MAX = identities.CLUSTER_MAX
LOCAL_BASE = identities.LOCAL_BASE

# IANA protocol numbers, as PolicyEntry.protocol carries them. 0 is "any": TCP, UDP and SCTP.
PROTO_ANY = protocols.ANY
PROTO_ICMP = protocols.ICMP
PROTO_TCP = protocols.TCP
PROTO_UDP = protocols.UDP
PROTO_ICMPV6 = protocols.ICMPV6
PROTO_SCTP = protocols.SCTP
PROTOCOL_NAMES = protocols.NAMES


class PolicyKind(enum.Enum):
    """The three document kinds, valued by their ``kind`` field."""

    CNP = "CiliumNetworkPolicy"
    CCNP = "CiliumClusterwideNetworkPolicy"
    KNP = "NetworkPolicy"

    @property
    def api_version(self) -> str:
        return "networking.k8s.io/v1" if self is PolicyKind.KNP else "cilium.io/v2"

    @property
    def namespaced(self) -> bool:
        return self is not PolicyKind.CCNP


class Direction(enum.Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


@dataclass(frozen=True, slots=True)
class EntityTargets:
    """The identities an entity stands for.

    ``reserved``: reserved identity numbers; ``cluster``: every cluster-local identity (all pods
    of the cluster); ``cidr``: every node-local CIDR identity (addresses outside the cluster);
    ``wildcard``: any identity at all, known or not, which the resolver emits as peer 0.
    """

    reserved: frozenset[int] = frozenset()
    cluster: bool = False
    cidr: bool = False
    wildcard: bool = False


class Entity(enum.Enum):
    """Cilium's ``fromEntities``/``toEntities`` values (pkg/policy/api/entity.go)."""

    ALL = "all"
    WORLD = "world"
    CLUSTER = "cluster"
    HOST = "host"
    REMOTE_NODE = "remote-node"
    HEALTH = "health"
    INIT = "init"
    UNMANAGED = "unmanaged"
    KUBE_APISERVER = "kube-apiserver"
    INGRESS = "ingress"
    NONE = "none"  # selectable, never matches: Cilium's placeholder

    @property
    def targets(self) -> EntityTargets:
        return _ENTITY_TARGETS[self]


_ALL_RESERVED = frozenset(range(RESERVED_HOST, RESERVED_INGRESS + 1))
_ENTITY_TARGETS: dict[Entity, EntityTargets] = {
    Entity.ALL: EntityTargets(_ALL_RESERVED, cluster=True, cidr=True, wildcard=True),
    # CIDR identities carry reserved:world in Cilium, so world selects them all
    Entity.WORLD: EntityTargets(frozenset({RESERVED_WORLD}), cidr=True),
    # Cilium's cluster: every pod of this cluster and every reserved identity but world
    Entity.CLUSTER: EntityTargets(_ALL_RESERVED - {RESERVED_WORLD}, cluster=True),
    Entity.HOST: EntityTargets(frozenset({RESERVED_HOST})),
    Entity.REMOTE_NODE: EntityTargets(frozenset({RESERVED_REMOTE_NODE})),
    Entity.HEALTH: EntityTargets(frozenset({RESERVED_HEALTH})),
    Entity.INIT: EntityTargets(frozenset({RESERVED_INIT})),
    Entity.UNMANAGED: EntityTargets(frozenset({RESERVED_UNMANAGED})),
    Entity.KUBE_APISERVER: EntityTargets(frozenset({RESERVED_KUBE_APISERVER})),
    Entity.INGRESS: EntityTargets(frozenset({RESERVED_INGRESS})),
    Entity.NONE: EntityTargets(),
}


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector over an identity's ``k8s`` labels, namespace scoping included.

    Hashable, so the resolver's selector cache can key on it; equal selectors (whatever their
    spelling in the documents) compare equal.
    """

    label_selector: LabelSelector = field(default_factory=LabelSelector)

    def matches(self, k8s_labels: Mapping[str, str]) -> bool:
        """``k8s_labels``: the identity's ``k8s`` labels as key -> value (``LabelSet.k8s_map``)."""
        return self.label_selector.matches(k8s_labels)

    def selects(self, labels: LabelSet) -> bool:
        return self.label_selector.matches(labels.k8s_map())

    @property
    def requirements(self) -> tuple[Requirement, ...]:
        return self.label_selector.requirements

    def __str__(self) -> str:
        """Cilium's spelling: ``k8s:app=web, k8s:io.kubernetes.pod.namespace=default``."""
        if not self.label_selector.requirements:
            return "{}"
        return ", ".join(_show_requirement(req) for req in self.label_selector.requirements)


def _show_requirement(req: Requirement) -> str:
    key = f"{SOURCE_K8S}:{req.key}"
    values = ",".join(sorted(req.values))
    if req.operator == "In":
        return f"{key}={values}" if len(req.values) == 1 else f"{key} in ({values})"
    if req.operator == "NotIn":
        return f"{key} notin ({values})"
    if req.operator == "Exists":
        return key
    return f"!{key}"


@dataclass(frozen=True, slots=True)
class CIDRRule:
    """A network, minus the ``excepts`` (each a strict subnet of it).

    ``pods``: the NetworkPolicy meaning (``ipBlock``), which also matches pod addresses inside
    the network and outside every except, per address; without it, Cilium's meaning
    (``fromCIDR``/``toCIDR``/``fromCIDRSet``): addresses outside the cluster only, a pod being
    its identity whatever its address."""

    network: Network
    excepts: tuple[Network, ...] = ()
    pods: bool = False

    @property
    def selects_world(self) -> bool:
        """A /0 also selects ``world``, the identity of addresses in no known prefix."""
        return self.network.prefixlen == 0

    def contains(self, address: Address) -> bool:
        if address not in self.network:
            return False
        return not any(address in excluded for excluded in self.excepts)

    def __str__(self) -> str:
        text = str(self.network)
        if self.excepts:
            text += f" except {', '.join(str(net) for net in self.excepts)}"
        return f"{text} (pod addresses too)" if self.pods else text


@dataclass(frozen=True, slots=True)
class Peer:
    """The other side of a connection: exactly one of ``selector``, ``entity``, ``cidr`` and
    ``fqdn``."""

    selector: Selector | None = None
    entity: Entity | None = None
    cidr: CIDRRule | None = None
    fqdn: NameMatch | None = None

    def __post_init__(self) -> None:
        parts = (self.selector, self.entity, self.cidr, self.fqdn)
        given = sum(part is not None for part in parts)
        if given != 1:
            raise ValueError(f"a Peer has exactly one of selector, entity, cidr, fqdn; got {given}")

    def __str__(self) -> str:
        if self.selector is not None:
            return f"endpoints {self.selector}"
        if self.entity is not None:
            return f"entity {self.entity.value}"
        if self.fqdn is not None:
            return f"fqdn {self.fqdn}"
        return f"cidr {self.cidr}"


L7_PROTOCOLS = ("http", "kafka", "dns")


@dataclass(frozen=True, slots=True)
class L7Rules:
    """Cilium L7 rules of one protocol (``http``, ``kafka`` or ``dns``), as validated plain dicts.

    Kept as canonical JSON so that the model stays immutable and hashable; an empty list means
    "every request of that protocol" (through the proxy), as in Cilium.
    """

    protocol: str
    canonical: str = "[]"  # JSON list of rule mappings, keys sorted

    @classmethod
    def of(cls, protocol: str, rules: list[dict[str, Any]]) -> L7Rules:
        return cls(protocol, json.dumps(rules, sort_keys=True, separators=(",", ":")))

    def rules(self) -> list[dict[str, Any]]:
        loaded: list[dict[str, Any]] = json.loads(self.canonical)
        return loaded

    def entries(self) -> list[dict[str, object]]:
        """The form ``PolicyEntry.l7`` carries: one ``{protocol: rule}`` mapping per rule."""
        return [{self.protocol: rule} for rule in self.rules()]


@dataclass(frozen=True, slots=True)
class PortRule:
    """A protocol and port (or range, or named port), with optional L7 rules.

    ``protocol`` is an IANA number (``PROTO_*``); ``PROTO_ANY`` (0) stands for TCP, UDP and SCTP.
    ``port`` 0 is every port; for ICMP/ICMPv6 ``port`` is the ICMP type. ``end_port`` is the
    inclusive end of a range (> ``port``), else 0. ``port_name`` is a named port (then ``port``
    is 0), resolved per endpoint from its container ports.
    """

    protocol: int
    port: int = 0
    end_port: int = 0
    port_name: str = ""
    l7: L7Rules | None = None

    @property
    def is_icmp(self) -> bool:
        return self.protocol in (PROTO_ICMP, PROTO_ICMPV6)

    def __str__(self) -> str:
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.is_icmp:
            return f"{proto} type {self.port}"
        if self.port_name:
            where = self.port_name
        elif self.end_port:
            where = f"{self.port}-{self.end_port}"
        else:
            where = str(self.port) if self.port else "any"
        return f"{where}/{proto}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One ingress/ingressDeny/egress/egressDeny entry (for NetworkPolicy: ingress/egress)."""

    name: str  # "<namespace>/<name>[<index>]" or "<name>[<index>]"
    id: int  # rule_id(kind, name): nonzero, 32 bits
    index: int  # position in the document's flattened rule list
    path: str  # where it is in the document: "spec.ingress[0]", "specs[1].egressDeny[2]"
    direction: Direction
    deny: bool
    peers: tuple[Peer, ...]  # OR; empty: the rule matches nothing
    ports: tuple[PortRule, ...] = ()  # OR; empty: every protocol and port

    @property
    def has_l7(self) -> bool:
        return any(port.l7 is not None for port in self.ports)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One Cilium rule (``spec`` or ``specs[i]``), or the spec of a NetworkPolicy."""

    path: str  # "spec" or "specs[<i>]"
    subject: Selector  # the endpoints it applies to, namespace scoping included
    enforces_ingress: bool  # its subjects are default-deny at ingress
    enforces_egress: bool  # its subjects are default-deny at egress
    rules: tuple[Rule, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy document, validated and normalized.

    ``namespace`` is "" for a cluster-wide policy. ``warnings`` say what was accepted but
    ignored or corrected (as Cilium and Kubernetes do it), for ``apply`` to print. ``source`` is
    the document as given, as plain JSON-compatible data, for ``policy get -o yaml``.
    """

    kind: PolicyKind
    namespace: str
    name: str
    specs: tuple[PolicySpec, ...]
    audit: bool = False
    warnings: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """``namespace/name``, or ``name`` for a cluster-wide policy."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(rule for spec in self.specs for rule in spec.rules)

    @property
    def has_l7(self) -> bool:
        """Some port carries L7 rules: its connections need the node's proxy (``apply`` says so)."""
        return any(rule.has_l7 for rule in self.rules)

    def rule_names(self) -> dict[int, str]:
        """Rule id -> rule name, the form ``ResolvedPolicy.rules`` carries."""
        return {rule.id: rule.name for rule in self.rules}

    def selectors(self) -> frozenset[Selector]:
        """Every distinct selector of the policy, subjects and peers: the selector cache keys."""
        found = {spec.subject for spec in self.specs}
        for rule in self.rules:
            found.update(peer.selector for peer in rule.peers if peer.selector is not None)
        return frozenset(found)

    def to_dict(self) -> dict[str, Any]:
        """The source document (a copy), for ``policy get -o yaml|json``."""
        return copy.deepcopy(self.source)


def rule_id(kind: PolicyKind, name: str) -> int:
    """The stable numeric id of a rule: blake2s of ``"<kind>/<rule name>"``, 32 bits, never 0."""
    digest = hashlib.blake2s(f"{kind.value}/{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") or 1
