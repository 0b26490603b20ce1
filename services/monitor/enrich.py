"""Flows -> enriched flows, from caches of the KV buckets (pure logic: no NATS here).

Each ``on_*`` method takes one KV change (key, value or None when deleted) and keeps a lookup
table current; :meth:`Enricher.enrich` then names both workloads of a flow (identity -> labels,
IP -> namespace/pod/node, IP:port -> service), the reason, and the rule and policy that decided.
Unreadable entries are skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared import identities
from shared.flow_api import EnrichedFlow, FlowPeer
from shared.flow_decode import (
    DIRECTIONS,
    F_REPLY,
    OBSERVATION_POINTS,
    PROTOCOLS,
    REASON_NAMES,
    TCP_FLAGS,
    TYPES,
    VERDICT_BITS,
    VERDICTS,
    AddressNames,
    WireFlow,
)
from shared.messages import (
    Endpoint,
    Flow,
    FQDNCache,
    Identity,
    IPCacheEntry,
    LBService,
    PolicyEntry,
    ResolvedPolicy,
)
from shared.reasons import POLICY_DENIED, reason_name


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    identity: int


@dataclass
class Enricher:
    labels: dict[int, list[str]] = field(default_factory=dict)  # identity -> labels
    pods: dict[str, PodInfo] = field(default_factory=dict)  # pod IP -> pod
    pod_ips: dict[str, str] = field(default_factory=dict)  # endpoints key -> IP
    ip_nodes: dict[str, str] = field(default_factory=dict)  # ipcache address -> node
    # ipcache key -> (address, node): a key's deletion frees what it said
    ipcache_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    rules: dict[int, str] = field(default_factory=dict)  # rule id -> "ns/name[index]"
    subjects_rules: dict[str, list[int]] = field(default_factory=dict)  # resolved key -> ids
    # subject identity -> (ingress, egress): the policies that make a direction default-deny
    enforcing: dict[int, tuple[str, str]] = field(default_factory=dict)
    services: dict[tuple[str, int], str] = field(default_factory=dict)  # (ip, port) -> "ns/name"
    service_keys: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # (ip, port) of a backend -> the services it serves: the datapath reports a flow to a
    # frontend after translating it, so the backend is what names the service
    backends: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    backend_keys: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # endpoint address -> destination address -> the names it resolved to it (fqdn bucket)
    dns_names: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    bad_entries: int = 0
    # address -> (namespace, pod, node), and rule id -> (rule, policy): looked up once, for
    # every flow until a table changes (any bucket change clears them). Not the whole peer: a
    # client's port is new in nearly every connection, so a cache by port would miss; building
    # the peer positionally from its cached part costs less than a miss.
    peer_cache: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    rule_cache: dict[int, tuple[str, str]] = field(default_factory=dict)
    addresses: AddressNames = field(default_factory=AddressNames)
    policies: int = -1  # distinct policies of the rules, counted when asked (-1: not yet)

    def _changed(self) -> None:
        self.peer_cache.clear()
        self.rule_cache.clear()
        self.policies = -1

    # --- bucket changes -------------------------------------------------------------------

    def on_identity(self, key: str, value: bytes | None) -> None:
        self._changed()
        try:
            number = int(key)
        except ValueError:
            self.bad_entries += 1
            return
        if value is None:
            self.labels.pop(number, None)
            return
        identity = self._decode(value, Identity)
        if identity is not None:
            self.labels[number] = sorted(identity.labels)

    def on_endpoint(self, key: str, value: bytes | None) -> None:
        self._changed()
        old_ip = self.pod_ips.pop(key, None)
        if old_ip is not None:
            self.pods.pop(old_ip, None)
        if value is None:
            return
        endpoint = self._decode(value, Endpoint)
        if endpoint is None or not endpoint.ip:
            return
        self.pod_ips[key] = endpoint.ip
        self.pods[endpoint.ip] = PodInfo(
            endpoint.namespace, endpoint.name, endpoint.node, endpoint.identity
        )

    def on_ipcache(self, key: str, value: bytes | None) -> None:
        self._changed()
        # an address some node owns (a pod's, a health endpoint's); a policy prefix owns none
        old = self.ipcache_keys.pop(key, None)
        if old is not None and self.ip_nodes.get(old[0]) == old[1]:
            del self.ip_nodes[old[0]]
        entry = None if value is None else self._decode(value, IPCacheEntry)
        if entry is not None and entry.node and entry.cidr.endswith("/32"):
            address = entry.cidr.split("/")[0]
            self.ipcache_keys[key] = (address, entry.node)
            self.ip_nodes[address] = entry.node

    def on_resolved(self, key: str, value: bytes | None) -> None:
        self._changed()
        # rule ids are hashes of kind and rule name: one id names one rule in every subject,
        # so a name stays known while any subject still carries it
        if value is None:
            ids = self.subjects_rules.pop(key, [])
            with contextlib.suppress(ValueError):
                self.enforcing.pop(int(key), None)
        else:
            resolved = self._decode(value, ResolvedPolicy)
            if resolved is None:
                return
            ids = self.subjects_rules.get(key, [])
            self.subjects_rules[key] = list(resolved.rules)
            self.rules.update(resolved.rules)
            self.enforcing[resolved.identity] = (
                _enforcing(resolved, resolved.ingress_enforced, resolved.ingress),
                _enforcing(resolved, resolved.egress_enforced, resolved.egress),
            )
        still = {i for held in self.subjects_rules.values() for i in held} if ids else set()
        for rule in ids:
            if rule not in still:
                self.rules.pop(rule, None)

    def on_fqdn(self, key: str, value: bytes | None) -> None:
        """An endpoint's DNS cache (key ``<node>.<endpoint ip>``)."""
        cache = self._decode(value, FQDNCache) if value is not None else None
        node_ip = key.split(".", 1)
        if cache is None:
            if len(node_ip) == 2:
                self.dns_names.pop(node_ip[1], None)
            return
        names: dict[str, list[str]] = {}
        for entry in cache.names:
            for address in entry.addresses:
                names.setdefault(address.ip, []).append(entry.name)
        self.dns_names[cache.ip] = names

    def on_service(self, key: str, value: bytes | None) -> None:
        """A ``services`` entry (``LBService``): each frontend address names the service.
        NodePort frontends (0.0.0.0) name no address of their own."""
        self._changed()
        for frontend in self.service_keys.pop(key, []):
            self.services.pop(frontend, None)
        old_name = key.replace(".", "/", 1)  # the bucket key is namespace.name
        for backend in self.backend_keys.pop(key, []):
            serving = self.backends.get(backend, set())
            serving.discard(old_name)
            if not serving:
                self.backends.pop(backend, None)
        if value is None:
            return
        service = self._decode(value, LBService)
        if service is None:
            return
        name = f"{service.namespace}/{service.name}"
        frontends = sorted({(f.ip, f.port) for f in service.frontends if not f.node_port})
        self.service_keys[key] = frontends
        for frontend in frontends:
            self.services[frontend] = name
        backends = sorted({(b.ip, b.port) for f in service.frontends for b in f.backends})
        self.backend_keys[key] = backends
        for backend in backends:
            self.backends.setdefault(backend, set()).add(name)

    def backend_service(self, ip: str, port: int) -> str:
        """The services ``ip:port`` is a backend of (comma-separated, sorted), or ""."""
        serving = self.backends.get((ip, port)) if self.backends else None
        return ",".join(sorted(serving)) if serving else ""

    def _decode(self, value: bytes, type_: type[Any]) -> Any:
        try:
            return msgspec.json.decode(value, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.bad_entries += 1
            return None

    # --- flows ----------------------------------------------------------------------------

    def peer(self, ip: str, port: int, identity: int, backend: bool = False) -> FlowPeer:
        """One side of a flow; ``backend``: the side a service's traffic was translated to
        (the destination of a request, the source of a reply), named by its service."""
        pod = self.pods.get(ip)
        labels = self.labels.get(identity) or _RESERVED_LABELS.get(identity, [])
        service = self.services.get((ip, port), "") if self.services else ""
        if not service and backend:
            service = self.backend_service(ip, port)
        if pod is None:
            return FlowPeer(
                ip=ip,
                port=port,
                identity=identity,
                node=self.ip_nodes.get(ip, ""),
                labels=labels,
                service=service,
            )
        return FlowPeer(
            ip=ip,
            port=port,
            identity=identity,
            namespace=pod.namespace,
            pod=pod.name,
            node=pod.node,
            labels=labels,
            service=service,
        )

    def enrich(self, flow: Flow | WireFlow) -> EnrichedFlow:
        if flow.rule_id:
            rule = self.rules.get(flow.rule_id, "")
            policy = policy_of(rule)
        else:
            rule = ""
            policy = self._default_deny_policy(flow) if flow.reason == POLICY_DENIED else ""
        return EnrichedFlow(
            time=flow.time,
            node=flow.node,
            type=flow.type,
            verdict=flow.verdict,
            drop_reason=flow.reason,
            drop_reason_desc=flow.reason_name or (reason_name(flow.reason) if flow.reason else ""),
            direction=flow.direction,
            observation_point=flow.observation_point,
            protocol=flow.protocol,
            tcp_flags=flow.tcp_flags,
            is_reply=flow.is_reply,
            bytes=flow.bytes,
            source=self.peer(flow.src_ip, flow.src_port, flow.src_identity, flow.is_reply),
            destination=self.peer(flow.dst_ip, flow.dst_port, flow.dst_identity, not flow.is_reply),
            rule_id=flow.rule_id,
            rule=rule,
            policy=policy,
            l7=flow.l7,
            destination_names=self._names(flow),
        )

    def enrich_records(
        self,
        records: list[tuple[int, ...]],
        node: str,
        offset_ns: int,
        groups: dict[tuple[str, str], list[EnrichedFlow]] | None = None,
    ) -> list[EnrichedFlow]:
        """Enriched flows straight from ring buffer record tuples (:data:`shared.flow_wire.
        RECORD_FIELDS`), as :meth:`enrich` of the decoded flows would give them, without the
        decoded flow in between: names by table lookup, peers and rules from the caches.
        ``groups``, if given, also gets each flow under (verdict, :func:`event_namespace`), in
        order: what the monitor publishes together, found here where the parts are at hand."""
        ips = self.addresses
        peers, rules = self.peer_cache, self.rule_cache
        if len(peers) > CACHE_SIZE:
            peers.clear()
        if len(rules) > CACHE_SIZE:
            rules.clear()
        peer_part = self._peer_part
        labels_of, reserved, no_labels = self.labels.get, _RESERVED_LABELS.get, _NO_LABELS
        no_names = _NO_NAMES
        by_port = self._port_service if self.services or self.backends else None
        names = self._names_of if self.dns_names else None
        default_deny = self._default_deny
        types, verdicts, reasons = TYPES, VERDICTS, REASON_NAMES
        directions, points, protocols, flags = DIRECTIONS, OBSERVATION_POINTS, PROTOCOLS, TCP_FLAGS
        out: list[EnrichedFlow] = []
        append = out.append
        group_of = groups.get if groups is not None else None
        for (
            _len,
            _pg_off,
            ts,
            kind,
            reason,
            direction,
            point,
            proto,
            tcp,
            fl,
            _pad,
            _ifindex,
            src_id,
            dst_id,
            saddr,
            daddr,
            sport,
            dport,
            rule_id,
            length,
        ) in records:
            reply = (fl & F_REPLY) == F_REPLY
            src_ip, dst_ip = ips[saddr], ips[daddr]
            src_part = peers.get(src_ip) or peer_part(src_ip)
            source = FlowPeer(
                src_ip,
                sport,
                src_id,
                *src_part,
                labels_of(src_id) or reserved(src_id, no_labels),
                by_port(src_ip, sport, reply) if by_port is not None else "",
            )
            dst_part = peers.get(dst_ip) or peer_part(dst_ip)
            destination = FlowPeer(
                dst_ip,
                dport,
                dst_id,
                *dst_part,
                labels_of(dst_id) or reserved(dst_id, no_labels),
                by_port(dst_ip, dport, not reply) if by_port is not None else "",
            )
            if rule_id:
                decided = rules.get(rule_id)
                if decided is None:
                    rule = self.rules.get(rule_id, "")
                    if rule:  # an unknown id (none of the rules) is no reason to fill the cache
                        decided = rules[rule_id] = (rule, policy_of(rule))
                    else:
                        decided = _NO_RULE
                rule, policy = decided
            else:
                rule = ""
                policy = default_deny(direction, src_id, dst_id) if reason == POLICY_DENIED else ""
            verdict = verdicts[kind << 3 | (fl & VERDICT_BITS)]
            flow = EnrichedFlow(
                (ts + offset_ns) / 1e9,
                node,
                types[kind],
                verdict,
                reason,
                reasons[reason],
                directions[direction],
                points[point],
                protocols[proto],
                flags[tcp],
                reply,
                length,
                source,
                destination,
                None,
                no_names if reply or names is None else names(src_ip, dst_ip),
                rule_id,
                rule,
                policy,
            )
            append(flow)
            if group_of is not None:
                # the namespace of the observing endpoint: the source on egress, else the
                # destination; the other side's when that is no pod (event_namespace)
                if direction == DIR_EGRESS:
                    key = (verdict, src_part[0] or dst_part[0])
                else:
                    key = (verdict, dst_part[0] or src_part[0])
                group = group_of(key)
                if group is None:
                    groups[key] = [flow]  # type: ignore[index]
                else:
                    group.append(flow)
        return out

    def _peer_part(self, ip: str) -> tuple[str, str, str]:
        """What :meth:`peer` says of an address whatever the port and identity, cached."""
        pod = self.pods.get(ip)
        if pod is None:
            part = ("", "", self.ip_nodes.get(ip, ""))
        else:
            part = (pod.namespace, pod.name, pod.node)
        self.peer_cache[ip] = part
        return part

    def _port_service(self, ip: str, port: int, backend: bool) -> str:
        service = self.services.get((ip, port), "") if self.services else ""
        if not service and backend:
            service = self.backend_service(ip, port)
        return service

    def _names_of(self, src_ip: str, dst_ip: str) -> list[str]:
        return sorted(self.dns_names.get(src_ip, {}).get(dst_ip, ()))

    def _default_deny(self, direction: int, src_identity: int, dst_identity: int) -> str:
        if direction == DIR_INGRESS:
            return self.enforcing.get(dst_identity, ("", ""))[0]
        return self.enforcing.get(src_identity, ("", ""))[1]

    def _names(self, flow: Flow | WireFlow) -> list[str]:
        """What the source resolved to the destination's address (a reply's destination is
        the client: no names)."""
        if flow.is_reply or not self.dns_names:
            return []
        return sorted(self.dns_names.get(flow.src_ip, {}).get(flow.dst_ip, ()))

    def _default_deny_policy(self, flow: Flow | WireFlow) -> str:
        """A drop no rule matched: the policies selecting the endpoint in that direction are
        what made it default-deny, so they are what decided."""
        if flow.direction == "ingress":
            return self.enforcing.get(flow.dst_identity, ("", ""))[0]
        return self.enforcing.get(flow.src_identity, ("", ""))[1]

    def _policy_count(self) -> int:
        # kept until the rules change: a status request every 50 ms walked 20,000 rules each
        if self.policies < 0:
            self.policies = len({policy_of(r) for r in self.rules.values()})
        return self.policies

    def counts(self) -> dict[str, int]:
        return {
            "identities": len(self.labels),
            "endpoints": len(self.pods),
            "rules": len(self.rules),
            "policies": self._policy_count(),
            "services": len(set(self.services.values())),
        }


_NO_LABELS: list[str] = []  # shared by the peers of identities without labels: never mutated
# shared by the flows without DNS names (never mutated): a new empty list per flow is one more
# object for the garbage collector to track and walk
_NO_NAMES: list[str] = []
# entries of each enrichment cache; beyond it the cache starts over
CACHE_SIZE = 65536
DIR_INGRESS = 1  # bpf/events.h
DIR_EGRESS = 2
_NO_RULE = ("", "")  # (rule, policy) of an id no rule carries

# reserved identities are not in the ``identities`` bucket; their labels are fixed
_RESERVED_LABELS: dict[int, list[str]] = {
    number: [f"reserved:{name}"] for number, name in identities.BY_ID.items() if number
}


def _enforcing(resolved: ResolvedPolicy, enforced: bool, entries: list[PolicyEntry]) -> str:
    if not enforced:
        return ""
    names = {policy_of(resolved.rules.get(e.rule_id, "")) for e in entries if e.rule_id}
    names.discard("")
    if not names:  # e.g. an empty rule list: every policy the subject has
        names = {policy_of(r) for r in resolved.rules.values()}
    return ",".join(sorted(names))


def policy_of(rule: str) -> str:
    """``ns/name[3]`` -> ``ns/name``."""
    return rule.rsplit("[", 1)[0] if rule.endswith("]") else rule


def group_flows(flows: list[EnrichedFlow]) -> dict[tuple[str, str], list[EnrichedFlow]]:
    """The flows by (verdict, :func:`event_namespace`), each group in order (as
    :meth:`Enricher.enrich_records` groups them)."""
    groups: dict[tuple[str, str], list[EnrichedFlow]] = {}
    for flow in flows:
        groups.setdefault((flow.verdict, event_namespace(flow)), []).append(flow)
    return groups


def event_namespace(flow: EnrichedFlow) -> str:
    """The namespace a flow belongs to: that of the endpoint where it was observed (the source
    on egress, the destination on ingress), else the other side's."""
    near, far = (
        (flow.source, flow.destination)
        if flow.direction == "egress"
        else (flow.destination, flow.source)
    )
    return near.namespace or far.namespace
