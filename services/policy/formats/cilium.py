"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy specs -> :mod:`services.policy.model`.

The semantics (namespace scoping, directions, ports, ICMP) are described in
:mod:`services.policy.parser`, the entry point."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from services.policy.formats.common import (
    Context,
    check_fields,
    check_port_name,
    cidr_excepts,
    cidr_value,
    end_port,
    optional_str,
    selector_of,
    unique,
)
from services.policy.formats.l7 import l7_rules
from services.policy.model import (
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_ICMPV6,
    CIDRRule,
    Direction,
    Entity,
    Peer,
    PolicyKind,
    PolicySpec,
    PortRule,
    Rule,
    Selector,
)
from shared import doc_fields, fqdn, protocols
from shared.errors import InvalidArgument
from shared.labels import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX
from shared.selectors import LabelSelector, Requirement

MAX_PORTS = 40  # Cilium's maxPorts per toPorts entry
MAX_ICMP_FIELDS = 40  # Cilium's maxICMPFields
_SECTIONS = (
    ("ingress", Direction.INGRESS, False),
    ("ingressDeny", Direction.INGRESS, True),
    ("egress", Direction.EGRESS, False),
    ("egressDeny", Direction.EGRESS, True),
)
_SPEC_FIELDS = frozenset(
    {"endpointSelector", "enableDefaultDeny", "description", "labels"}
    | {section for section, _, _ in _SECTIONS}
)
_INGRESS_L3 = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
_EGRESS_L3 = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities")
_L4_FIELDS = frozenset({"toPorts", "icmps"})
_CILIUM_PROTOCOLS = {**protocols.PORT_PROTOCOLS, "ANY": PROTO_ANY}
_ICMP_FAMILIES = {"IPv4": PROTO_ICMP, "IPv6": PROTO_ICMPV6}
_ICMP_TYPES: dict[int, dict[str, int]] = {
    PROTO_ICMP: {
        "EchoReply": 0,
        "DestinationUnreachable": 3,
        "Redirect": 5,
        "Echo": 8,
        "EchoRequest": 8,
        "RouterAdvertisement": 9,
        "RouterSelection": 10,
        "TimeExceeded": 11,
        "ParameterProblem": 12,
        "Timestamp": 13,
        "TimestampReply": 14,
        "Photuris": 40,
        "ExtendedEchoRequest": 42,
        "ExtendedEchoReply": 43,
    },
    PROTO_ICMPV6: {
        "DestinationUnreachable": 1,
        "PacketTooBig": 2,
        "TimeExceeded": 3,
        "ParameterProblem": 4,
        "EchoRequest": 128,
        "EchoReply": 129,
        "MulticastListenerQuery": 130,
        "MulticastListenerReport": 131,
        "MulticastListenerDone": 132,
        "RouterSolicitation": 133,
        "RouterAdvertisement": 134,
        "NeighborSolicitation": 135,
        "NeighborAdvertisement": 136,
        "RedirectMessage": 137,
        "RouterRenumbering": 138,
        "ICMPNodeInformationQuery": 139,
        "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141,
        "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144,
        "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146,
        "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160,
        "ExtendedEchoReply": 161,
    },
}


def cilium_specs(obj: Mapping[str, Any], ctx: Context) -> tuple[PolicySpec, ...]:
    entries: list[tuple[str, Any]] = []
    if obj.get("spec") is not None:
        entries.append(("spec", obj["spec"]))
    entries.extend(
        (f"specs[{i}]", spec) for i, spec in enumerate(doc_fields.optional_list(obj, "specs", ""))
    )
    if not entries:
        raise InvalidArgument(
            f"a {ctx.kind.value} needs a spec or a non-empty specs list", field="spec"
        )
    return tuple(_cilium_spec(raw, path, ctx) for path, raw in entries)


def _cilium_spec(raw: Any, path: str, ctx: Context) -> PolicySpec:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    check_fields(raw, _SPEC_FIELDS, path)
    if "endpointSelector" not in raw or raw["endpointSelector"] is None:
        raise InvalidArgument(
            "is required (use {} to select every pod "
            + ("of the cluster)" if ctx.kind is PolicyKind.CCNP else "of the namespace)"),
            field=f"{path}.endpointSelector",
        )
    subject = _subject_selector(raw["endpointSelector"], f"{path}.endpointSelector", ctx)
    description = optional_str(raw, "description", path)
    doc_fields.optional_list(
        raw, "labels", path
    )  # Cilium rule labels: metadata only, kept in the source
    sections = {
        section: doc_fields.optional_list(raw, section, path) for section, _, _ in _SECTIONS
    }
    if not any(sections.values()):
        raise InvalidArgument(
            "must have a non-empty ingress, ingressDeny, egress or egressDeny list "
            "(ingress: [{}] enforces ingress and allows nothing)",
            field=path,
        )
    default_deny = doc_fields.mapping(raw, "enableDefaultDeny", path)
    check_fields(default_deny, frozenset({"ingress", "egress"}), f"{path}.enableDefaultDeny")
    enforces = {
        Direction.INGRESS: bool(sections["ingress"] or sections["ingressDeny"]),
        Direction.EGRESS: bool(sections["egress"] or sections["egressDeny"]),
    }
    for direction in Direction:
        explicit = default_deny.get(direction.value)
        if explicit is None:
            continue
        if not isinstance(explicit, bool):
            raise InvalidArgument(
                f"must be true or false, got {doc_fields.typed(explicit)}",
                field=f"{path}.enableDefaultDeny.{direction.value}",
            )
        enforces[direction] = explicit
    rules: list[Rule] = []
    for section, direction, deny in _SECTIONS:
        for index, entry in enumerate(sections[section]):
            rule_path = f"{path}.{section}[{index}]"
            peers, ports = _cilium_rule(entry, rule_path, direction, deny, ctx)
            rules.append(ctx.rule(rule_path, direction, deny, peers, ports))
    return PolicySpec(
        path=path,
        subject=subject,
        enforces_ingress=enforces[Direction.INGRESS],
        enforces_egress=enforces[Direction.EGRESS],
        rules=tuple(rules),
        description=description,
    )


def _cilium_rule(
    entry: Any, path: str, direction: Direction, deny: bool, ctx: Context
) -> tuple[tuple[Peer, ...], tuple[PortRule, ...]]:
    if entry is None:
        entry = {}  # "- " in YAML: an empty rule, as Go decodes null
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(entry)}", field=path)
    l3_fields = _INGRESS_L3 if direction is Direction.INGRESS else _EGRESS_L3
    # toFQDNs: egress allows only (Cilium's EgressDenyRule has no toFQDNs)
    fqdns = direction is Direction.EGRESS and not deny
    known = frozenset(l3_fields) | _L4_FIELDS | ({"toFQDNs"} if fqdns else set())
    check_fields(entry, known, path)
    given = [name for name in (*l3_fields, "toFQDNs") if entry.get(name) is not None]
    used = [name for name in given if entry[name] != []]
    if len(used) > 1:
        raise InvalidArgument(
            f"combining {used[0]} and {used[1]} in one rule is not supported (as in Cilium): "
            "write them as separate rules",
            field=path,
        )
    endpoints_key, cidr_key, cidr_set_key, entities_key = l3_fields
    peers: list[Peer] = []
    for index, raw in enumerate(doc_fields.optional_list(entry, "toFQDNs", path)):
        peers.append(Peer(fqdn=fqdn.parse(raw, f"{path}.toFQDNs[{index}]")))
    for index, raw in enumerate(doc_fields.optional_list(entry, endpoints_key, path)):
        selector = _peer_selector(raw, f"{path}.{endpoints_key}[{index}]", ctx)
        peers.append(Peer(selector=selector))
    for index, raw in enumerate(doc_fields.optional_list(entry, cidr_key, path)):
        cidr = cidr_value(raw, f"{path}.{cidr_key}[{index}]", ctx, allow_address=True)
        peers.append(Peer(cidr=CIDRRule(cidr, pods=ctx.cidr_matches_pods)))
    for index, raw in enumerate(doc_fields.optional_list(entry, cidr_set_key, path)):
        peers.append(Peer(cidr=_cidr_set(raw, f"{path}.{cidr_set_key}[{index}]", ctx)))
    for index, raw in enumerate(doc_fields.optional_list(entry, entities_key, path)):
        peers.append(Peer(entity=_entity(raw, f"{path}.{entities_key}[{index}]")))
    to_ports = doc_fields.optional_list(entry, "toPorts", path)
    icmps = doc_fields.optional_list(entry, "icmps", path)
    if to_ports and icmps:
        raise InvalidArgument(
            "icmps and toPorts cannot be in the same rule (as in Cilium): write a separate rule",
            field=path,
        )
    ports: list[PortRule] = []
    for index, raw in enumerate(to_ports):
        ports.extend(_cilium_port_rule(raw, f"{path}.toPorts[{index}]", direction, deny))
    for index, raw in enumerate(icmps):
        ports.extend(_icmp_rule(raw, f"{path}.icmps[{index}]"))
    if not given and ports:
        # Cilium: no L3 field but ports means every peer on those ports
        peers.append(Peer(entity=Entity.ALL))
    return unique(peers), unique(ports)


def _subject_selector(raw: Any, path: str, ctx: Context) -> Selector:
    selector = _cilium_label_selector(raw, path)
    if not ctx.namespace:
        return Selector(selector)
    # Cilium pins the subject to the policy's namespace, replacing a namespace in matchLabels
    requirements = list(selector.requirements)
    for raw_key, value in (raw.get("matchLabels") or {}).items():
        value = value or ""  # what LabelSelector.parse makes of null
        if _strip_source(str(raw_key)) == NAMESPACE_LABEL and value != ctx.namespace:
            ctx.warnings.append(
                f"{path}.matchLabels[{raw_key!r}]: replaced by {ctx.namespace!r}: the "
                "endpointSelector of a namespaced policy always selects in its own namespace"
            )
            dropped = Requirement(NAMESPACE_LABEL, "In", frozenset([value]))
            requirements = [req for req in requirements if req != dropped]
    requirements.append(Requirement(NAMESPACE_LABEL, "In", frozenset([ctx.namespace])))
    return Selector(selector_of(requirements))


def _peer_selector(raw: Any, path: str, ctx: Context) -> Selector:
    selector = _cilium_label_selector(raw, path)
    keys = selector.keys()
    if NAMESPACE_LABEL in keys:
        return Selector(selector)
    if not ctx.namespace:
        # cluster-wide: pods of any namespace, never a bare wildcard over all identities
        extra = Requirement(NAMESPACE_LABEL, "Exists")
    elif any(key.startswith(NAMESPACE_LABELS_PREFIX) for key in keys):
        return Selector(selector)  # selects by namespace labels, across namespaces
    else:
        extra = Requirement(NAMESPACE_LABEL, "In", frozenset([ctx.namespace]))
    return Selector(selector_of([*selector.requirements, extra]))


def _cilium_label_selector(raw: Any, path: str) -> LabelSelector:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with matchLabels/matchExpressions (use {{}} to select all), "
            f"got {doc_fields.type_name(raw)}",
            field=path,
        )
    match_labels = raw.get("matchLabels")
    if isinstance(match_labels, Mapping):
        for key in match_labels:
            _check_source(key, f"{path}.matchLabels[{key!r}]")
    expressions = raw.get("matchExpressions")
    if isinstance(expressions, list):
        for index, expr in enumerate(expressions):
            if isinstance(expr, Mapping) and isinstance(expr.get("key"), str):
                _check_source(expr["key"], f"{path}.matchExpressions[{index}].key")
    return LabelSelector.parse(raw, path)


def _check_source(key: Any, path: str) -> None:
    if not isinstance(key, str):
        raise InvalidArgument(
            f"label key must be a string, got {doc_fields.typed(key)} (quote it in YAML)",
            field=path,
        )
    head, colon, _ = key.partition(":")
    if not colon or head in ("k8s", "any"):
        return
    if head == "reserved":
        raise InvalidArgument(
            f"reserved labels ({key!r}) cannot be selected here: use fromEntities/toEntities "
            "(host, world, remote-node, health, init, ...)",
            field=path,
        )
    raise InvalidArgument(
        f"label source {head!r} is not supported in selectors: write the key alone, or with "
        "k8s: or any:",
        field=path,
    )


def _strip_source(key: str) -> str:
    for prefix in ("k8s:", "any:"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _entity(raw: Any, path: str) -> Entity:
    names = [entity.value for entity in Entity]
    if not isinstance(raw, str) or raw not in names:
        hint = ""
        if isinstance(raw, str):
            close = difflib.get_close_matches(raw, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgument(
            f"unknown entity {raw!r}{hint}; membrane knows {', '.join(names)}", field=path
        )
    return Entity(raw)


def _cidr_set(raw: Any, path: str, ctx: Context) -> CIDRRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with cidr and except, got {doc_fields.type_name(raw)}", field=path
        )
    check_fields(raw, frozenset({"cidr", "except"}), path)
    if raw.get("cidr") is None:
        raise InvalidArgument("is required", field=f"{path}.cidr")
    network = cidr_value(raw["cidr"], f"{path}.cidr", ctx, allow_address=False)
    return CIDRRule(
        network,
        cidr_excepts(network, doc_fields.optional_list(raw, "except", path), f"{path}.except", ctx),
        pods=ctx.cidr_matches_pods,
    )


def _cilium_port_rule(raw: Any, path: str, direction: Direction, deny: bool) -> list[PortRule]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with ports, got {doc_fields.type_name(raw)}", field=path
        )
    if deny and "rules" in raw:
        raise InvalidArgument(
            "L7 rules are not allowed in deny rules (as in Cilium)", field=f"{path}.rules"
        )
    check_fields(raw, frozenset({"ports"} if deny else {"ports", "rules"}), path)
    entries = doc_fields.optional_list(raw, "ports", path)
    if not entries:
        raise InvalidArgument(
            "must list at least one port (an entry without ports allows nothing)",
            field=f"{path}.ports",
        )
    if len(entries) > MAX_PORTS:
        raise InvalidArgument(
            f"at most {MAX_PORTS} ports, got {len(entries)}", field=f"{path}.ports"
        )
    ports = [_cilium_port(entry, f"{path}.ports[{i}]") for i, entry in enumerate(entries)]
    l7 = l7_rules(raw.get("rules"), f"{path}.rules", ports, direction)
    if l7 is None:
        return ports
    return [PortRule(p.protocol, p.port, p.end_port, p.port_name, l7) for p in ports]


def _cilium_port(raw: Any, path: str) -> PortRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with port, protocol, got {doc_fields.type_name(raw)}", field=path
        )
    check_fields(raw, frozenset({"port", "endPort", "protocol"}), path)
    protocol_text = optional_str(raw, "protocol", path) or "ANY"
    protocol = _CILIUM_PROTOCOLS.get(protocol_text.upper())
    if protocol is None:
        hint = " (use icmps for ICMP)" if protocol_text.upper().startswith("ICMP") else ""
        raise InvalidArgument(
            f"protocol {protocol_text!r} is not supported{hint}; use one of "
            f"{', '.join(_CILIUM_PROTOCOLS)}",
            field=f"{path}.protocol",
        )
    value = raw.get("port")
    if value is None or value == "":
        raise InvalidArgument("is required (0 for every port)", field=f"{path}.port")
    if doc_fields.is_int(value) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 0 <= number <= 65535:
            raise InvalidArgument(f"must be in 0..65535, got {number}", field=f"{path}.port")
        return PortRule(protocol, number, end_port(raw, number, path))
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a port number or a port name, got {doc_fields.typed(value)}",
            field=f"{path}.port",
        )
    name = value.lower()  # Cilium compares port names case-insensitively
    check_port_name(name, f"{path}.port")
    if raw.get("endPort") is not None:
        raise InvalidArgument("cannot be used with a named port", field=f"{path}.endPort")
    return PortRule(protocol, port_name=name)


def _icmp_rule(raw: Any, path: str) -> list[PortRule]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with fields, got {doc_fields.type_name(raw)}", field=path
        )
    check_fields(raw, frozenset({"fields"}), path)
    fields = doc_fields.optional_list(raw, "fields", path)
    if len(fields) > MAX_ICMP_FIELDS:
        raise InvalidArgument(
            f"at most {MAX_ICMP_FIELDS} fields, got {len(fields)}", field=f"{path}.fields"
        )
    rules: list[PortRule] = []
    for index, entry in enumerate(fields):
        fpath = f"{path}.fields[{index}]"
        if not isinstance(entry, Mapping):
            raise InvalidArgument(
                f"must be a mapping with type, family, got {doc_fields.type_name(entry)}",
                field=fpath,
            )
        check_fields(entry, frozenset({"type", "family"}), fpath)
        family = optional_str(entry, "family", fpath) or "IPv4"
        protocol = _ICMP_FAMILIES.get(family)
        if protocol is None:
            raise InvalidArgument(f"must be IPv4 or IPv6, got {family!r}", field=f"{fpath}.family")
        rules.append(PortRule(protocol, _icmp_type(entry.get("type"), protocol, f"{fpath}.type")))
    return rules


def _icmp_type(value: Any, protocol: int, path: str) -> int:
    if value is None:
        raise InvalidArgument("is required", field=path)
    if doc_fields.is_int(value) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 0 <= number <= 255:
            raise InvalidArgument(f"must be in 0..255, got {number}", field=path)
        return number
    names = _ICMP_TYPES[protocol]
    if isinstance(value, str) and value in names:
        return names[value]
    family = "IPv4" if protocol == PROTO_ICMP else "IPv6"
    raise InvalidArgument(
        f"must be a number in 0..255 or an {family} ICMP type name ({', '.join(names)}), "
        f"got {doc_fields.typed(value)}",
        field=path,
    )
