"""Flows -> enriched flows, from caches of the KV buckets (pure logic: no NATS here).

Each ``on_*`` method takes one KV change (key, value or None when deleted) and keeps a lookup
table current; :meth:`Enricher.enrich` then names both workloads of a flow (identity -> labels,
IP -> namespace/pod/node, IP:port -> service), the reason, and the rule and policy that decided;
:meth:`Enricher.encode_records` does the same for a binary batch's records straight into the
flows' JSON lines (the monitor's hot path), :meth:`Enricher.encode_l7` for the L7 proxy's
records. Unreadable entries are skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, itemgetter, truediv
from typing import Any, Final

import msgspec

from shared import identities, l7_wire
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
from shared.l7_wire import L7Record
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
    # JSON fragments of encode_records, encoded once for every flow until a table changes
    # (any bucket change clears those that depend on one): by address (host-order u32), by
    # identity, by rule id, and by the combination of the small fields. Not the whole peer: a
    # client's port is new in nearly every connection, so a cache by port would miss.
    head_json: dict[tuple[int, ...], tuple[bytes, str, bool, bool]] = field(default_factory=dict)
    peer_json: dict[int, tuple[str, bytes, bytes, str]] = field(default_factory=dict)
    peer_ip_json: dict[str, tuple[str, bytes, bytes, str]] = field(default_factory=dict)  # L7
    l7_head_json: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    labels_json: dict[int, bytes] = field(default_factory=dict)
    rule_json: dict[int, bytes] = field(default_factory=dict)
    addresses: AddressNames = field(default_factory=AddressNames)
    policies: int = -1  # distinct policies of the rules, counted when asked (-1: not yet)

    def _changed(self) -> None:
        self.peer_json.clear()
        self.peer_ip_json.clear()
        self.labels_json.clear()
        self.rule_json.clear()
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

    def encode_records(
        self,
        records: list[tuple[int, ...]],
        node: str,
        offset_ns: int,
        groups: dict[tuple[str, str], list[bytes]],
    ) -> list[bytes]:
        """Each ring buffer record tuple (:data:`shared.flow_wire.RECORD_FIELDS`) enriched
        straight into its JSON line: byte for byte ``msgspec.json.encode(self.enrich(flow))``
        of the decoded flow and a newline, without an EnrichedFlow or FlowPeer in between.

        A line is spliced from JSON fragments encoded once and cached until a bucket changes:
        per address (ip, namespace, pod, node), per identity (labels), per rule id (rule,
        policy) and per combination of the small fields (type, verdict, reason, direction,
        observation point, protocol, TCP flags, reply); only ports, identities, length and
        rule id are formatted per flow, and the timestamps in one C call for the batch.
        ``groups`` gets each line under (verdict, :func:`event_namespace`), in order: what the
        monitor publishes together. The lines are returned in record order.
        """
        if not records:
            return []
        heads, peers, labels, rules = (
            self.head_json,
            self.peer_json,
            self.labels_json,
            self.rule_json,
        )
        for cache in (heads, peers, labels, rules):
            if len(cache) > CACHE_SIZE:
                cache.clear()
        # msgspec's own float text (shortest round trip), every timestamp in one call
        times = _encode(
            list(map(truediv, map(add, map(_TS, records), repeat(offset_ns)), repeat(1e9)))
        )[1:-1].split(b",")
        node_json = _encode(node)
        head_of, peer_of, labels_of, rule_of = (
            self._head_json,
            self._peer_json,
            self._labels_json,
            self._rule_json,
        )
        service_of = self._service_json if self.services or self.backends else None
        names_of = self._names_json if self.dns_names else None
        default_deny = self._default_deny_json
        known_rules = self.rules
        line = _LINE
        lines: list[bytes] = []
        append = lines.append
        group_of = groups.get
        for record, time_json in zip(records, times, strict=True):
            (
                _len,
                _pg_off,
                _ts,
                _kind,
                reason,
                direction,
                _point,
                _proto,
                _tcp,
                _fl,
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
            ) = record
            small = record[3:10]  # kind, reason, direction, point, protocol, tcp flags, flags
            head_json, verdict, reply, egress = heads.get(small) or head_of(small)
            src = peers.get(saddr) or peer_of(saddr)
            dst = peers.get(daddr) or peer_of(daddr)
            if service_of is None:
                src_service = dst_service = _EMPTY_STR
            else:
                src_service = service_of(src[0], sport, reply)
                dst_service = service_of(dst[0], dport, not reply)
            if rule_id:
                rule_json = rules.get(rule_id) or (
                    rule_of(rule_id) if rule_id in known_rules else _NO_RULE_JSON
                )
            elif reason == POLICY_DENIED:
                rule_json = default_deny(direction, src_id, dst_id)
            else:
                rule_json = _NO_RULE_JSON
            text = line % (
                time_json,
                node_json,
                head_json,
                length,
                src[1],
                sport,
                src_id,
                src[2],
                labels.get(src_id) or labels_of(src_id),
                src_service,
                dst[1],
                dport,
                dst_id,
                dst[2],
                labels.get(dst_id) or labels_of(dst_id),
                dst_service,
                _EMPTY_LIST if reply or names_of is None else names_of(src[0], dst[0]),
                rule_id,
                rule_json,
            )
            append(text)
            # the namespace of the observing endpoint: the source on egress, else the
            # destination; the other side's when that is no pod (event_namespace)
            key = (verdict, src[3] or dst[3]) if egress else (verdict, dst[3] or src[3])
            group = group_of(key)
            if group is None:
                groups[key] = [text]
            else:
                group.append(text)
        return lines

    def encode_l7(
        self, records: list[L7Record], node: str, groups: dict[tuple[str, str], list[bytes]]
    ) -> list[bytes]:
        """The L7 proxy's records (:mod:`shared.l7_wire`) enriched straight into their JSON
        lines, as :meth:`encode_records` does the datapath's: byte for byte
        ``msgspec.json.encode(self.enrich(l7_wire.flow(record, node)))`` and a newline, from
        the same cached fragments (the peers' by address text); the request itself (``l7``)
        encoded by msgspec. ``groups`` as in :meth:`encode_records`. The loop is that of
        :meth:`encode_records` over other fields, written out again rather than shared: a call
        per flow would cost more than the splice itself."""
        if not records:
            return []
        heads, peers, labels, rules = (
            self.l7_head_json,
            self.peer_ip_json,
            self.labels_json,
            self.rule_json,
        )
        for cache in (heads, peers, labels, rules):
            if len(cache) > CACHE_SIZE:
                cache.clear()
        times = _encode([record.time for record in records])[1:-1].split(b",")
        node_json = _encode(node)
        peer_of, labels_of, rule_of = self._peer_ip_json, self._labels_json, self._rule_json
        service_of = self._service_json if self.services or self.backends else None
        names_of = self._names_json if self.dns_names else None
        known_rules = self.rules
        line = _L7_LINE
        lines: list[bytes] = []
        append = lines.append
        group_of = groups.get
        for record, time_json in zip(records, times, strict=True):
            verdict, direction = record.verdict, record.direction
            small = (verdict, direction, record.protocol)
            head_json = heads.get(small) or self._l7_head_json(small)
            src_ip, dst_ip = record.src_ip, record.dst_ip
            sport, dport = record.src_port, record.dst_port
            src_id, dst_id, rule_id = record.src_identity, record.dst_identity, record.rule_id
            src = peers.get(src_ip) or peer_of(src_ip)
            dst = peers.get(dst_ip) or peer_of(dst_ip)
            if service_of is None:
                src_service = dst_service = _EMPTY_STR
            else:
                src_service = service_of(src_ip, sport, False)
                dst_service = service_of(dst_ip, dport, True)
            if rule_id:
                rule_json = rules.get(rule_id) or (
                    rule_of(rule_id) if rule_id in known_rules else _NO_RULE_JSON
                )
            else:
                rule_json = _NO_RULE_JSON
            text = line % (
                time_json,
                node_json,
                head_json,
                0,  # bytes
                src[1],
                sport,
                src_id,
                src[2],
                labels.get(src_id) or labels_of(src_id),
                src_service,
                dst[1],
                dport,
                dst_id,
                dst[2],
                labels.get(dst_id) or labels_of(dst_id),
                dst_service,
                _encode(record.l7),
                _EMPTY_LIST if names_of is None else names_of(src_ip, dst_ip),
                rule_id,
                rule_json,
            )
            append(text)
            # event_namespace: the source's on egress, else the destination's
            key = (
                (verdict, src[3] or dst[3])
                if direction == "egress"
                else (verdict, dst[3] or src[3])
            )
            group = group_of(key)
            if group is None:
                groups[key] = [text]
            else:
                group.append(text)
        return lines

    def _l7_head_json(self, small: tuple[str, str, str]) -> bytes:
        """The fields type .. is_reply and the key of ``bytes`` of an L7 record's (verdict,
        direction, protocol), cached; the rest is what every proxy flow has."""
        verdict, direction, protocol = small
        text = self.l7_head_json[small] = b"".join(
            (
                b',"type":',
                _encode(l7_wire.TYPE),
                b',"verdict":',
                _encode(verdict),
                b',"drop_reason":0,"drop_reason_desc":"","direction":',
                _encode(direction),
                b',"observation_point":',
                _encode(l7_wire.OBSERVATION_POINT),
                b',"protocol":',
                _encode(protocol),
                b',"tcp_flags":[],"is_reply":false,"bytes":',
            )
        )
        return text

    def _head_json(self, small: tuple[int, ...]) -> tuple[bytes, str, bool, bool]:
        """(the fields type .. is_reply and the key of ``bytes``, verdict, is_reply, egress) of
        (kind, reason, direction, point, protocol, tcp flags, flags), cached."""
        kind, reason, direction, point, proto, tcp, fl = small
        verdict = VERDICTS[kind << 3 | (fl & VERDICT_BITS)]
        reply = (fl & F_REPLY) == F_REPLY
        text = b"".join(
            (
                b',"type":',
                _encode(TYPES[kind]),
                b',"verdict":',
                _encode(verdict),
                b',"drop_reason":%d,"drop_reason_desc":' % reason,
                _encode(REASON_NAMES[reason]),
                b',"direction":',
                _encode(DIRECTIONS[direction]),
                b',"observation_point":',
                _encode(OBSERVATION_POINTS[point]),
                b',"protocol":',
                _encode(PROTOCOLS[proto]),
                b',"tcp_flags":',
                _encode(TCP_FLAGS[tcp]),
                b',"is_reply":true,"bytes":' if reply else b',"is_reply":false,"bytes":',
            )
        )
        head = self.head_json[small] = (text, verdict, reply, direction == DIR_EGRESS)
        return head

    def _peer_json(self, raw: int) -> tuple[str, bytes, bytes, str]:
        """(ip, the peer's JSON up to its port's value, from the identity's key to that of the
        labels, namespace) of an address (host-order u32), whatever the port and identity."""
        part = self.peer_json[raw] = self._peer_parts(self.addresses[raw])
        return part

    def _peer_ip_json(self, ip: str) -> tuple[str, bytes, bytes, str]:
        """:meth:`_peer_json` of an address the L7 proxy names as text."""
        part = self.peer_ip_json[ip] = self._peer_parts(ip)
        return part

    def _peer_parts(self, ip: str) -> tuple[str, bytes, bytes, str]:
        pod = self.pods.get(ip)
        namespace, name, node = (
            ("", "", self.ip_nodes.get(ip, ""))
            if pod is None
            else (pod.namespace, pod.name, pod.node)
        )
        return (
            ip,
            b'{"ip":' + _encode(ip) + b',"port":',
            b',"namespace":%b,"pod":%b,"node":%b,"labels":'
            % (_encode(namespace), _encode(name), _encode(node)),
            namespace,
        )

    def _labels_json(self, identity: int) -> bytes:
        """An identity's labels and the key of the peer's ``service``, cached."""
        labels = self.labels.get(identity) or _RESERVED_LABELS.get(identity, _NO_LABELS)
        text = self.labels_json[identity] = _encode(labels) + b',"service":'
        return text

    def _rule_json(self, rule_id: int) -> bytes:
        """``"rule":...,"policy":...`` of a rule id; cached for the ids a rule carries (an
        unknown id is no reason to fill the cache)."""
        rule = self.rules.get(rule_id, "")
        if not rule:
            return _NO_RULE_JSON
        text = self.rule_json[rule_id] = (
            b'"rule":' + _encode(rule) + b',"policy":' + _encode(policy_of(rule))
        )
        return text

    def _default_deny_json(self, direction: int, src_identity: int, dst_identity: int) -> bytes:
        policy = self._default_deny(direction, src_identity, dst_identity)
        return b'"rule":"","policy":' + _encode(policy) if policy else _NO_RULE_JSON

    def _service_json(self, ip: str, port: int, backend: bool) -> bytes:
        service = self._port_service(ip, port, backend)
        return _encode(service) if service else _EMPTY_STR

    def _names_json(self, src_ip: str, dst_ip: str) -> bytes:
        names = self._names_of(src_ip, dst_ip)
        return _encode(names) if names else _EMPTY_LIST

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
# entries of each enrichment cache; beyond it the cache starts over
CACHE_SIZE = 65536
DIR_INGRESS = 1  # bpf/events.h
DIR_EGRESS = 2

# --- the JSON line of an EnrichedFlow, spliced (encode_records) ---------------------------------

_encode: Final = msgspec.json.encode
_TS: Final = itemgetter(2)  # a record's timestamp
_EMPTY_STR: Final = b'""'
_EMPTY_LIST: Final = b"[]"
_NO_RULE_JSON: Final = b'"rule":"","policy":""'
# EnrichedFlow's fields in their encoding order, ``l7`` null (the datapath's flows have none);
# the peers' after their port; %b are cached fragments (see encode_records), %d numbers
_LINE: Final = (
    b'{"time":%b,"node":%b%b%d,'
    b'"source":%b%d,"identity":%d%b%b%b,"v":1},'
    b'"destination":%b%d,"identity":%d%b%b%b,"v":1},'
    b'"l7":null,"destination_names":%b,"rule_id":%d,%b,"v":1}\n'
)
# what _LINE and the fragments spell out, in order: a field added to either struct must be
# added there too (tests/unit/test_enrich_records.py compares the bytes)
_LINE_FIELDS: Final = (
    ("time", "node", "type", "verdict", "drop_reason", "drop_reason_desc", "direction",
     "observation_point", "protocol", "tcp_flags", "is_reply", "bytes", "source",
     "destination", "l7", "destination_names", "rule_id", "rule", "policy", "v"),
    ("ip", "port", "identity", "namespace", "pod", "node", "labels", "service", "v"),
)  # fmt: skip
# an L7 record's line: the same, its request in place of null
_L7_LINE: Final = _LINE.replace(b'"l7":null', b'"l7":%b')
if (EnrichedFlow.__struct_encode_fields__, FlowPeer.__struct_encode_fields__) != _LINE_FIELDS:
    raise RuntimeError("EnrichedFlow or FlowPeer changed: update encode_records' _LINE")

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
