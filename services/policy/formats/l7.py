"""L7 rules of a Cilium ``toPorts`` entry (http, kafka, dns), checked against Cilium's shapes
(PortRuleHTTP, kafka.PortRule, PortRuleDNS) and limits (TCP only, no port 0, DNS at egress)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.policy.formats.common import (
    check_fields,
    plain,
)
from services.policy.model import (
    PROTO_TCP,
    Direction,
    L7Rules,
    PortRule,
)
from shared import doc_fields, fqdn, l7_http, l7_kafka
from shared.errors import InvalidArgument

# L7 rule shapes (Cilium PortRuleHTTP, kafka.PortRule, PortRuleDNS): field -> expected type
_HTTP_FIELDS: dict[str, type] = {
    "path": str,
    "method": str,
    "host": str,
    "headers": list,
    "headerMatches": list,
}
_HEADER_MATCH_FIELDS: dict[str, type] = {"name": str, "value": str, "mismatch": str, "secret": dict}
_HEADER_MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
_KAFKA_FIELDS: dict[str, type] = {
    "role": str,
    "apiKey": str,
    "apiVersion": str,
    "clientID": str,
    "topic": str,
}
_DNS_FIELDS: dict[str, type] = {"matchName": str, "matchPattern": str}
_TYPE_WORDS: dict[type, str] = {str: "a string", list: "a list", dict: "a mapping"}


def l7_rules(raw: Any, path: str, ports: list[PortRule], direction: Direction) -> L7Rules | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping (http, kafka or dns), got {doc_fields.type_name(raw)}", field=path
        )
    check_fields(raw, frozenset(("http", "kafka", "dns")), path)
    given = [name for name in ("http", "kafka", "dns") if raw.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgument(
            f"one L7 protocol per port rule (as in Cilium), got {' and '.join(given)}", field=path
        )
    protocol = given[0]
    if protocol == "dns" and direction is Direction.INGRESS:
        raise InvalidArgument("DNS rules are only allowed at egress", field=f"{path}.dns")
    for port in ports:
        if port.port == 0 and not port.port_name:
            raise InvalidArgument(
                "L7 rules cannot be used with port 0 (every port)", field=f"{path}.{protocol}"
            )
        if protocol != "dns" and port.protocol != PROTO_TCP:
            raise InvalidArgument(
                f"{protocol} rules apply to TCP ports only; set protocol: TCP",
                field=f"{path}.{protocol}",
            )
        if protocol == "dns" and port.end_port:
            raise InvalidArgument(
                "DNS rules do not support port ranges", field=f"{path}.{protocol}"
            )
    rules = doc_fields.optional_list(raw, protocol, path)
    checked = [
        _l7_rule(protocol, rule, f"{path}.{protocol}[{index}]") for index, rule in enumerate(rules)
    ]
    return L7Rules.of(protocol, checked)


def _l7_rule(protocol: str, raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    shape = {"http": _HTTP_FIELDS, "kafka": _KAFKA_FIELDS, "dns": _DNS_FIELDS}[protocol]
    check_shape(raw, shape, path)
    rule: dict[str, Any] = plain(raw, path)
    if protocol == "http":
        for index, header in enumerate(rule.get("headers") or []):
            if not isinstance(header, str):
                raise InvalidArgument(
                    f"must be a string, got {doc_fields.typed(header)}",
                    field=f"{path}.headers[{index}]",
                )
        for index, match in enumerate(rule.get("headerMatches") or []):
            mpath = f"{path}.headerMatches[{index}]"
            if not isinstance(match, Mapping):
                raise InvalidArgument(
                    f"must be a mapping, got {doc_fields.type_name(match)}", field=mpath
                )
            check_shape(match, _HEADER_MATCH_FIELDS, mpath)
            if not match.get("name"):
                raise InvalidArgument("is required", field=f"{mpath}.name")
            action = match.get("mismatch")
            if action is not None and action not in _HEADER_MISMATCH_ACTIONS:
                raise InvalidArgument(
                    f"must be one of {', '.join(_HEADER_MISMATCH_ACTIONS)}, got {action!r}",
                    field=f"{mpath}.mismatch",
                )
        # what the proxy will match each request against must compile now, not at a request
        l7_http.compile_rule(rule, path)
    elif protocol == "kafka":
        # what the proxy will match each request against must check now, not at a request
        l7_kafka.compile_rule(rule, path)
    else:
        # what the DNS proxy matches each query against, normalized as it compares names
        rule = fqdn.parse(rule, path).to_dict()
    return rule


def check_shape(raw: Mapping[str, Any], shape: Mapping[str, type], path: str) -> None:
    check_fields(raw, frozenset(shape), path)
    for key, expected in shape.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, expected):
            want = _TYPE_WORDS[expected]
            raise InvalidArgument(
                f"must be {want}, got {doc_fields.typed(value)}", field=doc_fields.join(path, key)
            )
