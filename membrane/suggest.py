"""``policy suggest``: least-privilege policies allowing exactly the flows that were observed.

Pure: recorded flow groups and identity labels in, policy documents out. One policy per
workload of the namespace that sent or received a forwarded (or audited) connection, selecting
it by its pod labels; both directions enforced, each rule naming one peer and only the ports
(or ICMP types) seen with it:

- a pod peer by its pod labels (plus its namespace when it is another one);
- an address outside the cluster by ``<ip>/32`` (``toCIDR``, or a NetworkPolicy ``ipBlock``);
- a reserved identity (host, remote-node, health, ...) by its entity (CiliumNetworkPolicy only:
  NetworkPolicy cannot name them, so such flows are reported as not covered).

Selectors leave out the labels that change without the workload changing: the namespace
(implied by the policy's), the namespace's own labels and the service account, and whatever
Cilium's default label filter drops (``pod-template-hash`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import identities, protocols
from shared.flow_api import FlowGroup
from shared.flow_groups import is_pod_identity
from shared.labels import (
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
    SOURCE_K8S,
    Label,
    LabelFilter,
)

CNP = "CiliumNetworkPolicy"
KNP = "NetworkPolicy"
KINDS = (CNP, KNP)
DELIVERED = ("FORWARDED", "AUDIT")  # audited connections were delivered too
PORT_PROTOCOLS = tuple(protocols.PORT_PROTOCOLS)
MAX_PORTS = 40  # per toPorts entry (Cilium's limit)
ENTITIES = {
    name: name
    for name in ("host", "remote-node", "health", "init", "unmanaged", "kube-apiserver", "world")
}
_FILTER = LabelFilter()
_NAME = re.compile(r"[^a-z0-9-]+")

Service = tuple[str, int]  # (protocol, port or ICMP type)


@dataclass(frozen=True, order=True)
class Peer:
    kind: str  # pod, cidr or entity
    value: str  # the namespace of a pod, the network, the entity's name
    labels: tuple[tuple[str, str], ...] = ()  # a pod's labels for a selector
    namespace_labels: tuple[tuple[str, str], ...] = ()  # its namespace's (NetworkPolicy)


@dataclass
class _Subject:
    namespace: str
    labels: dict[str, str]
    workload: str
    ingress: dict[Peer, set[Service]] = field(default_factory=dict)
    egress: dict[Peer, set[Service]] = field(default_factory=dict)


@dataclass
class Suggestion:
    documents: list[dict[str, Any]]
    flows: int  # the observed flows the documents allow
    uncovered: list[str]  # flows that could not be expressed (and why)


def pod_labels(labels: Iterable[str]) -> tuple[str, dict[str, str], dict[str, str]]:
    """(namespace, the pod labels a selector should use, the namespace's labels) of an
    identity's labels."""
    namespace, chosen, of_namespace = "", {}, {}
    for text in labels:
        source, _, rest = text.partition(":")
        key, _, value = rest.partition("=")
        if source != SOURCE_K8S:
            continue
        if key == NAMESPACE_LABEL:
            namespace = value
        elif key.startswith(NAMESPACE_LABELS_PREFIX):
            of_namespace[key[len(NAMESPACE_LABELS_PREFIX) :]] = value
        elif key != SERVICE_ACCOUNT_LABEL and _FILTER.keeps(Label(source, key, value)):
            chosen[key] = value
    return namespace, chosen, of_namespace


def suggest(
    groups: Sequence[FlowGroup],
    labels: Mapping[int, Sequence[str]],
    namespace: str,
    *,
    kind: str = CNP,
    workload: str = "",
) -> Suggestion:
    subjects: dict[tuple[tuple[str, str], ...], _Subject] = {}
    uncovered: list[str] = []
    covered = 0

    def subject(number: int, name: str) -> _Subject | None:
        ns, chosen, _ = pod_labels(labels.get(number, ()))
        if ns != namespace or not is_pod_identity(number) or not chosen:
            return None
        if workload and workload not in (name, name.partition("/")[2]):
            return None
        key = tuple(sorted(chosen.items()))
        return subjects.setdefault(key, _Subject(ns, chosen, name))

    for group in groups:
        if group.verdict not in DELIVERED:
            continue
        service = _service(group)
        src = subject(group.src_identity, group.source)
        dst = subject(group.dst_identity, group.destination)
        if service is None:
            if src or dst:
                uncovered.append(f"{_text(group)}: protocol {group.protocol} has no port rule")
            continue
        expressed = True
        if src is not None:
            peer = _peer(group.dst_identity, group.dst_ip, labels, kind)
            if peer is None:
                expressed = False
            else:
                src.egress.setdefault(peer, set()).add(service)
        if dst is not None:
            peer = _peer(group.src_identity, group.src_ip, labels, kind)
            if peer is None:
                expressed = False
            else:
                dst.ingress.setdefault(peer, set()).add(service)
        if src is None and dst is None:
            continue
        if kind == KNP and (service[0] == "ICMP" or not _knp_expressible(group, labels, namespace)):
            expressed = False
        if not expressed:
            uncovered.append(f"{_text(group)}: a {kind} cannot name that peer or protocol")
        else:
            covered += group.count
    names: set[str] = set()
    documents = []
    for _, found in sorted(subjects.items()):
        name = _unique(_policy_name(found), names)
        documents.append(_cnp(name, found) if kind == CNP else _knp(name, found))
    return Suggestion(documents, covered, uncovered)


def _service(group: FlowGroup) -> Service | None:
    if group.protocol in PORT_PROTOCOLS and group.port:
        return (group.protocol, group.port)
    if group.protocol == "ICMP":
        return ("ICMP", group.port)
    return None


def _peer(number: int, address: str, labels: Mapping[int, Sequence[str]], kind: str) -> Peer | None:
    if is_pod_identity(number):
        ns, chosen, of_namespace = pod_labels(labels.get(number, ()))
        if not ns or not chosen:
            return None  # an identity gone since: nothing to select it by
        return Peer("pod", ns, tuple(sorted(chosen.items())), tuple(sorted(of_namespace.items())))
    if address and (number == identities.WORLD or number >= identities.LOCAL_BASE):
        return Peer("cidr", f"{address}/32")
    name = identities.BY_ID.get(number, "")
    if kind == CNP and name in ENTITIES:
        return Peer("entity", name)
    return None


def _knp_expressible(group: FlowGroup, labels: Mapping[int, Sequence[str]], namespace: str) -> bool:
    """A NetworkPolicy names pods of another namespace by that namespace's labels only."""
    for number in (group.src_identity, group.dst_identity):
        if is_pod_identity(number):
            ns, _, of_namespace = pod_labels(labels.get(number, ()))
            if ns != namespace and not of_namespace:
                return False
        elif identities.BY_ID.get(number) not in (None, "world"):
            return False
    return True


def _text(group: FlowGroup) -> str:
    return f"{group.source} -> {group.destination}:{group.port}/{group.protocol}"


def _policy_name(found: _Subject) -> str:
    base = found.workload.partition("/")[2] or found.workload
    return (_NAME.sub("-", base.lower()).strip("-") or "workload")[:50] + "-observed"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _ports(services: Iterable[Service]) -> list[dict[str, Any]]:
    ported = sorted((p, proto) for proto, p in services if proto != "ICMP")
    return [
        {"ports": [{"port": str(p), "protocol": proto} for p, proto in ported[i : i + MAX_PORTS]]}
        for i in range(0, len(ported), MAX_PORTS)
    ]


def _icmps(services: Iterable[Service]) -> list[dict[str, Any]]:
    types = sorted(t for proto, t in services if proto == "ICMP")
    return [
        {"fields": [{"type": t, "family": "IPv4"} for t in types[i : i + MAX_PORTS]]}
        for i in range(0, len(types), MAX_PORTS)
    ]


def _cnp_peer(peer: Peer, subject_ns: str, direction: str) -> dict[str, Any]:
    prefix = "from" if direction == "ingress" else "to"
    if peer.kind == "cidr":
        return {f"{prefix}CIDR": [peer.value]}
    if peer.kind == "entity":
        return {f"{prefix}Entities": [peer.value]}
    match = dict(peer.labels)
    if peer.value != subject_ns:
        match[f"{SOURCE_K8S}:{NAMESPACE_LABEL}"] = peer.value
    return {f"{prefix}Endpoints": [{"matchLabels": match}]}


def _cnp_rules(peers: Mapping[Peer, set[Service]], subject_ns: str, direction: str) -> list[Any]:
    rules: list[dict[str, Any]] = []
    for peer, services in sorted(peers.items()):
        selector = _cnp_peer(peer, subject_ns, direction)
        if ports := _ports(services):
            rules.append({**selector, "toPorts": ports})
        if icmps := _icmps(services):
            rules.append({**selector, "icmps": icmps})
    return rules or [{}]  # enforced, nothing allowed: no such connection was seen


def _cnp(name: str, found: _Subject) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": CNP,
        "metadata": {"name": name, "namespace": found.namespace},
        "spec": {
            "description": f"what {found.workload} was seen doing (membrane policy suggest)",
            "endpointSelector": {"matchLabels": dict(sorted(found.labels.items()))},
            "ingress": _cnp_rules(found.ingress, found.namespace, "ingress"),
            "egress": _cnp_rules(found.egress, found.namespace, "egress"),
        },
    }


def _knp_peer(peer: Peer, subject_ns: str) -> dict[str, Any] | None:
    """None: a pod of another namespace whose namespace has no labels to select it by."""
    if peer.kind == "cidr":
        return {"ipBlock": {"cidr": peer.value}}
    selector: dict[str, Any] = {"podSelector": {"matchLabels": dict(peer.labels)}}
    if peer.value != subject_ns:
        if not peer.namespace_labels:
            return None
        selector["namespaceSelector"] = {"matchLabels": dict(peer.namespace_labels)}
    return selector


def _knp_rules(peers: Mapping[Peer, set[Service]], subject_ns: str, direction: str) -> list[Any]:
    key = "from" if direction == "ingress" else "to"
    rules = []
    for peer, services in sorted(peers.items()):
        ported = sorted((p, proto) for proto, p in services if proto != "ICMP")
        selector = None if peer.kind == "entity" else _knp_peer(peer, subject_ns)
        if selector is None or not ported:
            continue  # counted as not covered by suggest()
        rules.append(
            {
                key: [selector],
                "ports": [{"port": p, "protocol": proto} for p, proto in ported],
            }
        )
    return rules


def _knp(name: str, found: _Subject) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": KNP,
        "metadata": {"name": name, "namespace": found.namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(sorted(found.labels.items()))},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": _knp_rules(found.ingress, found.namespace, "ingress"),
            "egress": _knp_rules(found.egress, found.namespace, "egress"),
        },
    }
