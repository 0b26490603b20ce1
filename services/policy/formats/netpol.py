"""``networking.k8s.io/v1`` NetworkPolicy specs -> :mod:`services.policy.model`.

The translation (policyTypes defaulting, peers, ports) is described in
:mod:`services.policy.parser`, the entry point."""

from __future__ import annotations

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
from services.policy.model import (
    CIDRRule,
    Direction,
    Entity,
    Peer,
    PolicySpec,
    PortRule,
    Rule,
    Selector,
)
from shared import doc_fields, protocols
from shared.errors import InvalidArgument
from shared.labels import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX
from shared.selectors import LabelSelector, Requirement

_KNP_PROTOCOLS = protocols.PORT_PROTOCOLS


def netpol_spec(raw: Any, ctx: Context) -> PolicySpec:
    if raw is None:
        raw = {}  # Kubernetes decodes a missing spec as the empty one
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field="spec")
    check_fields(raw, frozenset({"podSelector", "policyTypes", "ingress", "egress"}), "spec")
    pod_selector = _knp_label_selector(raw.get("podSelector", {}), "spec.podSelector")
    subject = Selector(
        selector_of(
            [
                *pod_selector.requirements,
                Requirement(NAMESPACE_LABEL, "In", frozenset([ctx.namespace])),
            ]
        )
    )
    ingress = doc_fields.optional_list(raw, "ingress", "spec")
    egress = doc_fields.optional_list(raw, "egress", "spec")
    types = _policy_types(raw)
    if not types:  # Kubernetes' defaulting: Ingress always, Egress when there are egress rules
        types = {"Ingress", "Egress"} if egress else {"Ingress"}
    rules: list[Rule] = []
    for section, entries, direction, peer_key in (
        ("ingress", ingress, Direction.INGRESS, "from"),
        ("egress", egress, Direction.EGRESS, "to"),
    ):
        enforced = direction.value.capitalize() in types
        parsed = [
            _knp_rule(entry, f"spec.{section}[{i}]", peer_key, ctx)
            for i, entry in enumerate(entries)
        ]
        if not enforced:
            if parsed:
                ctx.warnings.append(
                    f"spec.{section}: ignored, policyTypes does not include "
                    f"{direction.value.capitalize()}"
                )
            continue
        for i, (peers, ports) in enumerate(parsed):
            rules.append(ctx.rule(f"spec.{section}[{i}]", direction, False, peers, ports))
    return PolicySpec(
        path="spec",
        subject=subject,
        enforces_ingress="Ingress" in types,
        enforces_egress="Egress" in types,
        rules=tuple(rules),
    )


def _policy_types(raw: Mapping[str, Any]) -> set[str]:
    types = doc_fields.optional_list(raw, "policyTypes", "spec")
    if len(types) > 2:
        raise InvalidArgument("may not specify more than two policyTypes", field="spec.policyTypes")
    for index, value in enumerate(types):
        if value not in ("Ingress", "Egress"):
            raise InvalidArgument(
                f"must be Ingress or Egress, got {doc_fields.typed(value)}",
                field=f"spec.policyTypes[{index}]",
            )
    return set(types)


def _knp_rule(
    raw: Any, path: str, peer_key: str, ctx: Context
) -> tuple[tuple[Peer, ...], tuple[PortRule, ...]]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    other = "to" if peer_key == "from" else "from"
    if other in raw:
        raise InvalidArgument(
            f"unknown field: {'ingress' if other == 'from' else 'egress'} rules use {other!r}, "
            f"these use {peer_key!r}",
            field=f"{path}.{other}",
        )
    check_fields(raw, frozenset({peer_key, "ports"}), path)
    entries = doc_fields.optional_list(raw, peer_key, path)
    peers = [_knp_peer(entry, f"{path}.{peer_key}[{i}]", ctx) for i, entry in enumerate(entries)]
    if not entries:
        peers = [Peer(entity=Entity.ALL)]  # no from/to: every source/destination
    ports = [
        _knp_port(entry, f"{path}.ports[{i}]")
        for i, entry in enumerate(doc_fields.optional_list(raw, "ports", path))
    ]
    return unique(peers), unique(ports)


def _knp_peer(raw: Any, path: str, ctx: Context) -> Peer:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    check_fields(raw, frozenset({"podSelector", "namespaceSelector", "ipBlock"}), path)
    given = [
        key for key in ("podSelector", "namespaceSelector", "ipBlock") if raw.get(key) is not None
    ]
    if not given:
        raise InvalidArgument(
            "must specify a peer (podSelector, namespaceSelector or ipBlock)", field=path
        )
    if "ipBlock" in given:
        if len(given) > 1:
            raise InvalidArgument("may not specify both ipBlock and another peer", field=path)
        return Peer(cidr=_ip_block(raw["ipBlock"], f"{path}.ipBlock", ctx))
    pods = raw.get("podSelector")
    requirements = list(
        _knp_label_selector(pods, f"{path}.podSelector").requirements if pods is not None else ()
    )
    namespaces = raw.get("namespaceSelector")
    if namespaces is None:
        requirements.append(Requirement(NAMESPACE_LABEL, "In", frozenset([ctx.namespace])))
    else:
        ns_selector = _knp_label_selector(namespaces, f"{path}.namespaceSelector")
        requirements.extend(
            Requirement(NAMESPACE_LABELS_PREFIX + req.key, req.operator, req.values)
            for req in ns_selector.requirements
        )
        # pods only, even for NotIn/DoesNotExist namespace requirements, as Kubernetes means it
        requirements.append(Requirement(NAMESPACE_LABEL, "Exists"))
    return Peer(selector=Selector(selector_of(requirements)))


def _knp_label_selector(raw: Any, path: str) -> LabelSelector:
    # Kubernetes label keys: the Cilium source prefixes (k8s:, any:) are not allowed here
    if isinstance(raw, Mapping):
        match_labels = raw.get("matchLabels")
        keys: list[tuple[Any, str]] = []
        if isinstance(match_labels, Mapping):
            keys.extend((key, f"{path}.matchLabels[{key!r}]") for key in match_labels)
        expressions = raw.get("matchExpressions")
        if isinstance(expressions, list):
            keys.extend(
                (expr.get("key"), f"{path}.matchExpressions[{i}].key")
                for i, expr in enumerate(expressions)
                if isinstance(expr, Mapping)
            )
        for key, kpath in keys:
            if isinstance(key, str) and ":" in key:
                raise InvalidArgument(
                    f"{key!r} is not a Kubernetes label key (source prefixes such as k8s: "
                    "belong to CiliumNetworkPolicy)",
                    field=kpath,
                )
            if key is not None and not isinstance(key, str):
                raise InvalidArgument(
                    f"label key must be a string, got {doc_fields.typed(key)} (quote it in YAML)",
                    field=kpath,
                )
    return LabelSelector.parse(raw, path)


def _ip_block(raw: Any, path: str, ctx: Context) -> CIDRRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with cidr and except, got {doc_fields.type_name(raw)}", field=path
        )
    check_fields(raw, frozenset({"cidr", "except"}), path)
    if not raw.get("cidr"):
        raise InvalidArgument("is required", field=f"{path}.cidr")
    network = cidr_value(raw["cidr"], f"{path}.cidr", ctx, allow_address=False)
    # Kubernetes' meaning: an ipBlock matches every address in it, pod addresses included
    return CIDRRule(
        network,
        cidr_excepts(network, doc_fields.optional_list(raw, "except", path), f"{path}.except", ctx),
        pods=True,
    )


def _knp_port(raw: Any, path: str) -> PortRule:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    check_fields(raw, frozenset({"protocol", "port", "endPort"}), path)
    protocol_text = optional_str(raw, "protocol", path) or "TCP"
    protocol = _KNP_PROTOCOLS.get(protocol_text)
    if protocol is None:
        raise InvalidArgument(
            f"must be one of {', '.join(_KNP_PROTOCOLS)}, got {protocol_text!r}",
            field=f"{path}.protocol",
        )
    value = raw.get("port")
    if value is None:
        if raw.get("endPort") is not None:
            raise InvalidArgument("may not be specified when port is not", field=f"{path}.endPort")
        return PortRule(protocol)
    if doc_fields.is_int(value):
        if not 1 <= value <= 65535:
            raise InvalidArgument(f"must be in 1..65535, got {value}", field=f"{path}.port")
        return PortRule(protocol, value, end_port(raw, value, path))
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a number or a port name, got {doc_fields.typed(value)}", field=f"{path}.port"
        )
    check_port_name(value, f"{path}.port")
    if raw.get("endPort") is not None:
        raise InvalidArgument(
            "may not be specified when port is a named port", field=f"{path}.endPort"
        )
    return PortRule(protocol, port_name=value)
