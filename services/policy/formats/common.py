"""What the Cilium and NetworkPolicy readers share: the document context, field checks and
values both formats spell the same way (CIDRs, port ranges, port names, label maps)."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.policy.model import (
    Direction,
    Network,
    Peer,
    PolicyKind,
    PortRule,
    Rule,
    rule_id,
)
from shared import doc_fields
from shared.errors import InvalidArgument
from shared.labels import validate_key, validate_value
from shared.names import DNS_LABEL, IANA_SVC_NAME
from shared.selectors import LabelSelector, Requirement

# Cilium fields with semantics membrane does not implement: a clear error instead of "unknown".
_UNSUPPORTED: dict[str, str] = {
    "nodeSelector": "host policies (nodeSelector) are not supported: membrane enforces policy "
    "on pods only; use endpointSelector",
    "log": "policy logging (log) is not supported; flows already name the rule that decided",
    "fromRequires": "fromRequires is not supported (deprecated in Cilium): write the "
    "requirement into each fromEndpoints selector",
    "toRequires": "toRequires is not supported (deprecated in Cilium): write the requirement "
    "into each toEndpoints selector",
    "fromGroups": "fromGroups (cloud provider groups) is not supported",
    "toGroups": "toGroups (cloud provider groups) is not supported",
    "fromNodes": "fromNodes is not supported: use fromEntities (host, remote-node)",
    "toNodes": "toNodes is not supported: use toEntities (host, remote-node)",
    "toServices": "toServices is not supported: select the service's pods with toEndpoints",
    "toFQDNs": "toFQDNs is allowed in egress rules only",
    "authentication": "mutual authentication is not supported",
    "cidrGroupRef": "CiliumCIDRGroup references are not supported: write the cidr",
    "cidrGroupSelector": "CiliumCIDRGroup selectors are not supported: write the cidr",
    "terminatingTLS": "TLS interception is not supported",
    "originatingTLS": "TLS interception is not supported",
    "serverNames": "TLS server names (SNI) are not supported",
    "listener": "custom Envoy listeners are not supported",
    "l7proto": "generic L7 protocols (l7proto) are not supported: use http, kafka or dns",
    "l7": "generic L7 rules (l7) are not supported: use http, kafka or dns",
}


@dataclass
class Context:
    """What rule parsing needs to know about its document, and what it collects on the way."""

    kind: PolicyKind
    namespace: str  # "" for a cluster-wide policy
    name: str
    warnings: list[str] = field(default_factory=list)
    next_index: int = 0
    cidr_matches_pods: bool = False  # Cilium CIDR rules with the NetworkPolicy meaning

    def rule(
        self,
        path: str,
        direction: Direction,
        deny: bool,
        peers: tuple[Peer, ...],
        ports: tuple[PortRule, ...],
    ) -> Rule:
        index = self.next_index
        self.next_index += 1
        prefix = f"{self.namespace}/{self.name}" if self.namespace else self.name
        name = f"{prefix}[{index}]"
        return Rule(
            name=name,
            id=rule_id(self.kind, name),
            index=index,
            path=path,
            direction=direction,
            deny=deny,
            peers=peers,
            ports=ports,
        )


def unique(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def optional_str(parent: Mapping[str, Any], key: str, path: str) -> str:
    value = parent.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.typed(value)} (quote it in YAML)",
            field=doc_fields.join(path, key),
        )
    return value


def check_fields(obj: Mapping[Any, Any], known: frozenset[str], path: str) -> None:
    """Reject unknown fields (kubectl's strict validation), saying what was meant if it can."""
    for key in obj:
        if key in known:
            continue
        reason = _UNSUPPORTED.get(key) if isinstance(key, str) else None
        if reason is not None:
            raise InvalidArgument(reason, field=doc_fields.join(path, key))
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgument(f"unknown field{hint}", field=doc_fields.join(path, str(key)))


def string_map(raw: Any, path: str, *, labels: bool) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping of key: value, got {doc_fields.type_name(raw)}", field=path
        )
    result: dict[str, str] = {}
    for key, value in raw.items():
        fpath = f"{path}[{key!r}]"
        if not isinstance(key, str):
            raise InvalidArgument(f"key must be a string, got {doc_fields.typed(key)}", field=fpath)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InvalidArgument(
                f"value must be a string, got {doc_fields.typed(value)} (quote it in YAML)",
                field=fpath,
            )
        if labels:
            validate_key(key, field=fpath)
            validate_value(value, field=fpath)
        result[key] = value
    return result


def plain(value: Any, path: str) -> Any:
    """A deep copy as plain JSON data (str keys; str, int, float, bool, None, list, dict)."""
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(
                    f"keys must be strings, got {doc_fields.typed(key)} (quote it in YAML)",
                    field=doc_fields.join(path, str(key)),
                )
            copied[key] = plain(item, doc_fields.join(path, key))
        return copied
    if isinstance(value, list):
        return [plain(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise InvalidArgument(f"unsupported value of type {type(value).__name__}", field=path or None)


def check_dns_label(value: str, path: str) -> None:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            field=path,
        )


def check_port_name(name: str, path: str) -> None:
    """IANA_SVC_NAME, what container port names are and named ports in policies refer to."""
    if len(name) > 15:
        raise InvalidArgument(f"port name {name!r} is longer than 15 characters", field=path)
    if not IANA_SVC_NAME.match(name) or "--" in name:
        raise InvalidArgument(
            f"port name {name!r} must be lowercase letters, digits and '-', starting and ending "
            "with a letter or digit, without '--'",
            field=path,
        )
    if not any(c.isalpha() for c in name):
        raise InvalidArgument(
            f"port name {name!r} must contain a letter (write a port number unquoted)",
            field=path,
        )


def end_port(raw: Mapping[str, Any], port: int, path: str) -> int:
    """The normalized end of a range: 0 for a single port."""
    end = raw.get("endPort")
    if end is None:
        return 0
    if not doc_fields.is_int(end) or not 1 <= end <= 65535:
        raise InvalidArgument(
            f"must be an integer in 1..65535, got {doc_fields.show(end)}", field=f"{path}.endPort"
        )
    if port == 0:
        raise InvalidArgument("needs a port to start the range", field=f"{path}.endPort")
    if end < port:
        raise InvalidArgument(
            f"must be greater than or equal to port ({end} < {port})", field=f"{path}.endPort"
        )
    return end if end > port else 0


def selector_of(requirements: Iterable[Requirement]) -> LabelSelector:
    """A selector from requirements, ordered as ``LabelSelector.parse`` orders them."""
    distinct = set(requirements)
    return LabelSelector(
        tuple(sorted(distinct, key=lambda r: (r.key, r.operator, sorted(r.values))))
    )


def cidr_value(raw: Any, path: str, ctx: Context, *, allow_address: bool) -> Network:
    if not isinstance(raw, str):
        raise InvalidArgument(f"must be a CIDR string, got {doc_fields.typed(raw)}", field=path)
    if "/" not in raw and not allow_address:
        raise InvalidArgument(f"{raw!r} is not a CIDR: write address/prefix-length", field=path)
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        what = "an IP address or CIDR" if allow_address else "a CIDR"
        raise InvalidArgument(f"{raw!r} is not {what}", field=path) from None
    if "/" in raw and str(network) != raw and network.network_address != _address(raw):
        ctx.warnings.append(f"{path}: {raw!r} has host bits set; using {network}")
    return network


def cidr_excepts(network: Network, raw: list[Any], path: str, ctx: Context) -> tuple[Network, ...]:
    excepts: list[Network] = []
    for index, value in enumerate(raw):
        item_path = f"{path}[{index}]"
        excluded = cidr_value(value, item_path, ctx, allow_address=False)
        if (
            excluded.version != network.version
            or not excluded.subnet_of(network)  # type: ignore[arg-type]
            or excluded.prefixlen <= network.prefixlen
        ):
            raise InvalidArgument(
                f"{excluded} is not a strict subnet of {network}", field=item_path
            )
        excepts.append(excluded)
    return tuple(dict.fromkeys(excepts))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.partition("/")[0])
