"""Policy documents -> :mod:`services.policy.model`, validated the way Cilium and Kubernetes do.

API:

- :func:`parse_documents` ``(text, source) -> list[Policy]``: every policy in a multi-document
  YAML text (``kind: List`` items are read in place), all validated before any is returned.
- :func:`parse_document` ``(doc, source, index) -> Policy``: one document already decoded, as the
  service receives it over the bus.
- :class:`PolicyDocumentError`, an ``InvalidArgument`` raised for the first error; its message
  is ``"<source>: document <N> (<Kind>/<name>): <field.path>: <reason>"`` (the form of
  ``membrane/manifests.py``) and ``field`` is the path. A document with any error is rejected whole.
- :data:`AUDIT_ANNOTATION`: ``policy.membrane.io/audit: "true"`` sets ``Policy.audit``.

Semantics follow upstream: Cilium's ``pkg/k8s/apis/cilium.io/utils/utils.go`` (namespace scoping),
``pkg/policy/api/rule_validation.go`` (validation), ``pkg/policy/api/entity.go`` (entities) and
``pkg/k8s/network_policy.go`` (NetworkPolicy translation); Kubernetes'
``pkg/apis/networking/validation/validation.go`` and NetworkPolicy API docs. In particular:

- A CiliumNetworkPolicy's ``endpointSelector`` gets ``io.kubernetes.pod.namespace=<ns>``
  (a different namespace in its matchLabels is replaced, with a warning, as Cilium does). A
  ``fromEndpoints``/``toEndpoints`` selector without a namespace key gets the same, unless it
  selects on namespace labels; in a cluster-wide policy it gets ``io.kubernetes.pod.namespace``
  Exists instead (pods of any namespace). Keys may be written ``k8s:key``, ``any:key`` or ``key``.
- A Cilium direction is enforced when the spec has a non-empty ``ingress`` or ``ingressDeny``
  list (``egress``/``egressDeny``), unless ``enableDefaultDeny`` says otherwise; a spec with
  none of the four is rejected, as by Cilium. ``ingress: [{}]`` enforces and allows nothing.
  A rule with no L3 field but ``toPorts``/``icmps`` allows every peer on those ports; an L3
  field given as an empty list selects no peer.
- NetworkPolicy: ``policyTypes`` defaults to Ingress, plus Egress when ``egress`` is non-empty;
  a listed direction is enforced, an empty or missing list of rules then allows nothing; rules
  of an unlisted direction are ignored with a warning. An ingress rule without ``from`` (or an
  egress rule without ``to``) allows every source (entity ``all``, as Cilium translates it);
  without ``ports`` every port. Peers: ``podSelector`` alone = pods of the policy's namespace;
  ``namespaceSelector`` (alone, or ANDed with ``podSelector``) = pods of matching namespaces.
- Ports: TCP/UDP/SCTP/ANY -> 6/17/132/0 (Cilium's protocol default ANY, case-insensitive;
  Kubernetes' default TCP, exact case); port 0 or absent = every port; ``endPort`` makes a
  range (rejected below ``port``, with a named port, or without a port); named ports are kept
  by name (lower-cased for Cilium, which compares them case-insensitively). ``icmps`` fields
  become protocol 1 (IPv4) or 58 (IPv6) with the type, a number or Cilium's CamelCase name,
  in the port.

Rejected because membrane does not implement them, rather than ignored, since ignoring would
change what a policy allows: ``nodeSelector`` (host policies), ``fromRequires``/``toRequires``
(they narrow every other rule selecting the endpoint; deprecated upstream), ``fromGroups``,
``toGroups``, ``fromNodes``, ``toNodes``, ``toServices``, ``toFQDNs``, ``authentication``,
``log``, ``cidrGroupRef``, ``cidrGroupSelector``, TLS/``serverNames``/``listener``,
``l7proto``/``l7``, protocols other than TCP/UDP/SCTP/ANY in ``toPorts`` (use ``icmps``) and
the entities ``world-ipv4``/``world-ipv6``. Cilium's own limits are kept: one kind of L3 peer
per rule, ``icmps`` not beside ``toPorts``, 40 ports per ``toPorts`` entry and 40 ICMP fields,
L7 rules only on TCP (DNS on any) and not on port 0, DNS only at egress and with ports, one L7
protocol per port rule, none in deny rules. Stricter than Cilium: an ``except`` must be a
strict subnet of its ``cidr`` (Kubernetes' rule for ipBlock), and a ``toPorts`` entry must
list ports (Cilium silently allows nothing).
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.policy.model import (
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    CIDRRule,
    Direction,
    Entity,
    L7Rules,
    Network,
    Peer,
    Policy,
    PolicyKind,
    PolicySpec,
    PortRule,
    Rule,
    Selector,
    rule_id,
)
from shared import doc_fields, kube_yaml
from shared.errors import InvalidArgument
from shared.labels import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, validate_key, validate_value
from shared.names import DNS_LABEL, DNS_SUBDOMAIN, IANA_SVC_NAME
from shared.selectors import LabelSelector, Requirement

AUDIT_ANNOTATION = "policy.membrane.io/audit"
DEFAULT_NAMESPACE = "default"
MAX_PORTS = 40  # Cilium's maxPorts per toPorts entry
MAX_ICMP_FIELDS = 40  # Cilium's maxICMPFields

_LIST_KIND = "List"

_CILIUM_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "specs", "status"})
_KNP_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
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
    "toFQDNs": "toFQDNs (DNS-based policy) is not supported: use toCIDR or toCIDRSet",
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

_CILIUM_PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ANY": PROTO_ANY}
_KNP_PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP}
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
_KAFKA_ROLES = ("produce", "consume")
_DNS_FIELDS: dict[str, type] = {"matchName": str, "matchPattern": str}
_TYPE_WORDS: dict[type, str] = {str: "a string", list: "a list", dict: "a mapping"}


class PolicyDocumentError(InvalidArgument):
    """An ``InvalidArgument`` whose message already names source, document and field path.

    ``str()`` is the message alone, so that ``error: {exc}`` does not print the field twice.
    """

    def __str__(self) -> str:
        return self.message


# --- entry points ------------------------------------------------------------------------------


def parse_documents(text: str, source: str) -> list[Policy]:
    """Every policy of a multi-document YAML text; the first error rejects the whole text.

    ``source`` (a path, or "-") only names the input in messages. Empty documents are skipped
    but counted, so "document 3" is the third in the text. A policy defined twice is an error.
    """
    policies: list[Policy] = []
    defined: dict[tuple[PolicyKind, str, str], str] = {}
    for index, raw in enumerate(kube_yaml.load_all(text, source, PolicyDocumentError), start=1):
        if raw is None:
            continue
        for where, obj in _objects(raw, f"document {index}", source):
            policy = _parse_located(obj, source, where)
            key = (policy.kind, policy.namespace, policy.name)
            first = defined.get(key)
            if first is not None:
                raise _located(
                    source,
                    kube_yaml.describe(where, obj),
                    InvalidArgument(
                        f"{policy.kind.value} {policy.key} is defined twice, first by {first}",
                        field="metadata.name",
                    ),
                )
            defined[key] = kube_yaml.describe(where, obj)
            policies.append(policy)
    return policies


def parse_document(doc: Mapping[str, Any], source: str, index: int = 1) -> Policy:
    """One decoded document (``index``: its 1-based position in ``source``), validated."""
    return _parse_located(doc, source, f"document {index}")


def _parse_located(obj: Any, source: str, where: str) -> Policy:
    try:
        return _parse_policy(obj)
    except InvalidArgument as exc:
        raise _located(source, kube_yaml.describe(where, obj), exc) from None


def _located(source: str, label: str, exc: InvalidArgument) -> PolicyDocumentError:
    prefix = f"{source}: {label}: "
    if exc.field:
        return PolicyDocumentError(f"{prefix}{exc.field}: {exc.message}", field=exc.field)
    return PolicyDocumentError(f"{prefix}{exc.message}")


def _objects(raw: Any, where: str, source: str) -> list[tuple[str, Any]]:
    """The objects a document holds: itself, or the items of a ``kind: List``."""
    if not isinstance(raw, Mapping) or raw.get("kind") != _LIST_KIND:
        return [(where, raw)]
    try:
        _check_fields(raw, frozenset({"apiVersion", "kind", "metadata", "items"}), "")
        if raw.get("apiVersion") != "v1":
            raise InvalidArgument(
                f"List is served as apiVersion 'v1', got {raw.get('apiVersion')!r}",
                field="apiVersion",
            )
        items = doc_fields.optional_list(raw, "items", "")
    except InvalidArgument as exc:
        raise _located(source, f"{where} (List)", exc) from None
    return [(f"{where} items[{position}]", item) for position, item in enumerate(items)]


# --- the document ------------------------------------------------------------------------------


@dataclass
class _Context:
    """What rule parsing needs to know about its document, and what it collects on the way."""

    kind: PolicyKind
    namespace: str  # "" for a cluster-wide policy
    name: str
    warnings: list[str] = field(default_factory=list)
    next_index: int = 0

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


def _parse_policy(obj: Any) -> Policy:
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"a document must be a mapping, got {doc_fields.type_name(obj)}")
    kind_name = obj.get("kind")
    if kind_name is None:
        raise InvalidArgument("is required", field="kind")
    kinds = {kind.value: kind for kind in PolicyKind}
    if kind_name not in kinds:
        raise InvalidArgument(
            f"{kind_name!r} is not a policy; the policy service accepts {', '.join(kinds)}",
            field="kind",
        )
    kind = kinds[kind_name]
    api_version = obj.get("apiVersion")
    if api_version != kind.api_version:
        got = "none" if api_version is None else repr(api_version)
        raise InvalidArgument(
            f"{kind.value} is served as apiVersion {kind.api_version!r}, got {got}",
            field="apiVersion",
        )
    _check_fields(obj, _KNP_FIELDS if kind is PolicyKind.KNP else _CILIUM_FIELDS, "")
    source = _plain(obj, "")
    meta = doc_fields.mapping(obj, "metadata", "", required=True)
    _check_fields(meta, _META_FIELDS, "metadata")
    name = _name(meta)
    warnings: list[str] = []
    if kind.namespaced:
        namespace = _optional_str(meta, "namespace", "metadata") or DEFAULT_NAMESPACE
        _check_dns_label(namespace, "metadata.namespace")
    else:
        namespace = ""
        if meta.get("namespace"):
            warnings.append(f"metadata.namespace: ignored, a {kind.value} is cluster-scoped")
    _string_map(meta.get("labels"), "metadata.labels", labels=True)
    annotations = _string_map(meta.get("annotations"), "metadata.annotations", labels=False)
    audit = _audit(annotations)
    ctx = _Context(kind, namespace, name, warnings)
    if kind is PolicyKind.KNP:
        specs: tuple[PolicySpec, ...] = (_knp_spec(obj.get("spec"), ctx),)
    else:
        specs = _cilium_specs(obj, ctx)
    return Policy(
        kind=kind,
        namespace=namespace,
        name=name,
        specs=specs,
        audit=audit,
        warnings=tuple(ctx.warnings),
        source=source,
    )


def _name(meta: Mapping[str, Any]) -> str:
    name = meta.get("name")
    if name is None or name == "":
        hint = " (generateName is not supported)" if "generateName" in meta else ""
        raise InvalidArgument(f"is required{hint}", field="metadata.name")
    if not isinstance(name, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.type_name(name)}", field="metadata.name"
        )
    if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        raise InvalidArgument(
            f"{name!r} is not a DNS-1123 subdomain: at most 253 lowercase letters, digits, "
            "'-' and '.', each dot-separated part starting and ending with a letter or digit",
            field="metadata.name",
        )
    return name


def _audit(annotations: Mapping[str, str]) -> bool:
    value = annotations.get(AUDIT_ANNOTATION)
    if value is None:
        return False
    if value not in ("true", "false"):
        raise InvalidArgument(
            f'must be "true" or "false", got {value!r}',
            field=f"metadata.annotations[{AUDIT_ANNOTATION!r}]",
        )
    return value == "true"


# --- Cilium ------------------------------------------------------------------------------------


def _cilium_specs(obj: Mapping[str, Any], ctx: _Context) -> tuple[PolicySpec, ...]:
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


def _cilium_spec(raw: Any, path: str, ctx: _Context) -> PolicySpec:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    _check_fields(raw, _SPEC_FIELDS, path)
    if "endpointSelector" not in raw or raw["endpointSelector"] is None:
        raise InvalidArgument(
            "is required (use {} to select every pod "
            + ("of the cluster)" if ctx.kind is PolicyKind.CCNP else "of the namespace)"),
            field=f"{path}.endpointSelector",
        )
    subject = _subject_selector(raw["endpointSelector"], f"{path}.endpointSelector", ctx)
    description = _optional_str(raw, "description", path)
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
    _check_fields(default_deny, frozenset({"ingress", "egress"}), f"{path}.enableDefaultDeny")
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
    entry: Any, path: str, direction: Direction, deny: bool, ctx: _Context
) -> tuple[tuple[Peer, ...], tuple[PortRule, ...]]:
    if entry is None:
        entry = {}  # "- " in YAML: an empty rule, as Go decodes null
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(entry)}", field=path)
    l3_fields = _INGRESS_L3 if direction is Direction.INGRESS else _EGRESS_L3
    _check_fields(entry, frozenset(l3_fields) | _L4_FIELDS, path)
    given = [name for name in l3_fields if entry.get(name) is not None]
    used = [name for name in given if entry[name] != []]
    if len(used) > 1:
        raise InvalidArgument(
            f"combining {used[0]} and {used[1]} in one rule is not supported (as in Cilium): "
            "write them as separate rules",
            field=path,
        )
    endpoints_key, cidr_key, cidr_set_key, entities_key = l3_fields
    peers: list[Peer] = []
    for index, raw in enumerate(doc_fields.optional_list(entry, endpoints_key, path)):
        selector = _peer_selector(raw, f"{path}.{endpoints_key}[{index}]", ctx)
        peers.append(Peer(selector=selector))
    for index, raw in enumerate(doc_fields.optional_list(entry, cidr_key, path)):
        cidr = _cidr_value(raw, f"{path}.{cidr_key}[{index}]", ctx, allow_address=True)
        peers.append(Peer(cidr=CIDRRule(cidr)))
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
    return _unique(peers), _unique(ports)


def _subject_selector(raw: Any, path: str, ctx: _Context) -> Selector:
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
    return Selector(_selector_of(requirements))


def _peer_selector(raw: Any, path: str, ctx: _Context) -> Selector:
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
    return Selector(_selector_of([*selector.requirements, extra]))


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


def _selector_of(requirements: Iterable[Requirement]) -> LabelSelector:
    """A selector from requirements, ordered as ``LabelSelector.parse`` orders them."""
    unique = set(requirements)
    return LabelSelector(tuple(sorted(unique, key=lambda r: (r.key, r.operator, sorted(r.values)))))


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


def _cidr_set(raw: Any, path: str, ctx: _Context) -> CIDRRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with cidr and except, got {doc_fields.type_name(raw)}", field=path
        )
    _check_fields(raw, frozenset({"cidr", "except"}), path)
    if raw.get("cidr") is None:
        raise InvalidArgument("is required", field=f"{path}.cidr")
    network = _cidr_value(raw["cidr"], f"{path}.cidr", ctx, allow_address=False)
    return CIDRRule(
        network,
        _excepts(network, doc_fields.optional_list(raw, "except", path), f"{path}.except", ctx),
    )


def _excepts(network: Network, raw: list[Any], path: str, ctx: _Context) -> tuple[Network, ...]:
    excepts: list[Network] = []
    for index, value in enumerate(raw):
        item_path = f"{path}[{index}]"
        excluded = _cidr_value(value, item_path, ctx, allow_address=False)
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


def _cidr_value(raw: Any, path: str, ctx: _Context, *, allow_address: bool) -> Network:
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


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.partition("/")[0])


# --- Cilium ports ------------------------------------------------------------------------------


def _cilium_port_rule(raw: Any, path: str, direction: Direction, deny: bool) -> list[PortRule]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with ports, got {doc_fields.type_name(raw)}", field=path
        )
    if deny and "rules" in raw:
        raise InvalidArgument(
            "L7 rules are not allowed in deny rules (as in Cilium)", field=f"{path}.rules"
        )
    _check_fields(raw, frozenset({"ports"} if deny else {"ports", "rules"}), path)
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
    l7 = _l7_rules(raw.get("rules"), f"{path}.rules", ports, direction)
    if l7 is None:
        return ports
    return [PortRule(p.protocol, p.port, p.end_port, p.port_name, l7) for p in ports]


def _cilium_port(raw: Any, path: str) -> PortRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with port, protocol, got {doc_fields.type_name(raw)}", field=path
        )
    _check_fields(raw, frozenset({"port", "endPort", "protocol"}), path)
    protocol_text = _optional_str(raw, "protocol", path) or "ANY"
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
        return PortRule(protocol, number, _end_port(raw, number, path))
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a port number or a port name, got {doc_fields.typed(value)}",
            field=f"{path}.port",
        )
    name = value.lower()  # Cilium compares port names case-insensitively
    _check_port_name(name, f"{path}.port")
    if raw.get("endPort") is not None:
        raise InvalidArgument("cannot be used with a named port", field=f"{path}.endPort")
    return PortRule(protocol, port_name=name)


def _end_port(raw: Mapping[str, Any], port: int, path: str) -> int:
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


def _icmp_rule(raw: Any, path: str) -> list[PortRule]:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with fields, got {doc_fields.type_name(raw)}", field=path
        )
    _check_fields(raw, frozenset({"fields"}), path)
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
        _check_fields(entry, frozenset({"type", "family"}), fpath)
        family = _optional_str(entry, "family", fpath) or "IPv4"
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


# --- L7 ----------------------------------------------------------------------------------------


def _l7_rules(raw: Any, path: str, ports: list[PortRule], direction: Direction) -> L7Rules | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping (http, kafka or dns), got {doc_fields.type_name(raw)}", field=path
        )
    _check_fields(raw, frozenset(("http", "kafka", "dns")), path)
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
    _check_shape(raw, shape, path)
    rule: dict[str, Any] = _plain(raw, path)
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
            _check_shape(match, _HEADER_MATCH_FIELDS, mpath)
            if not match.get("name"):
                raise InvalidArgument("is required", field=f"{mpath}.name")
            action = match.get("mismatch")
            if action is not None and action not in _HEADER_MISMATCH_ACTIONS:
                raise InvalidArgument(
                    f"must be one of {', '.join(_HEADER_MISMATCH_ACTIONS)}, got {action!r}",
                    field=f"{mpath}.mismatch",
                )
    elif protocol == "kafka":
        role = rule.get("role")
        if role is not None and role not in _KAFKA_ROLES:
            raise InvalidArgument(
                f"must be one of {', '.join(_KAFKA_ROLES)}, got {role!r}", field=f"{path}.role"
            )
        if role and rule.get("apiKey"):
            raise InvalidArgument("role and apiKey cannot both be set (as in Cilium)", field=path)
    else:
        names = [key for key in ("matchName", "matchPattern") if rule.get(key)]
        if len(names) != 1:
            raise InvalidArgument("needs exactly one of matchName and matchPattern", field=path)
    return rule


def _check_shape(raw: Mapping[str, Any], shape: Mapping[str, type], path: str) -> None:
    _check_fields(raw, frozenset(shape), path)
    for key, expected in shape.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, expected):
            want = _TYPE_WORDS[expected]
            raise InvalidArgument(
                f"must be {want}, got {doc_fields.typed(value)}", field=doc_fields.join(path, key)
            )


# --- NetworkPolicy -----------------------------------------------------------------------------


def _knp_spec(raw: Any, ctx: _Context) -> PolicySpec:
    if raw is None:
        raw = {}  # Kubernetes decodes a missing spec as the empty one
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field="spec")
    _check_fields(raw, frozenset({"podSelector", "policyTypes", "ingress", "egress"}), "spec")
    pod_selector = _knp_label_selector(raw.get("podSelector", {}), "spec.podSelector")
    subject = Selector(
        _selector_of(
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
    raw: Any, path: str, peer_key: str, ctx: _Context
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
    _check_fields(raw, frozenset({peer_key, "ports"}), path)
    entries = doc_fields.optional_list(raw, peer_key, path)
    peers = [_knp_peer(entry, f"{path}.{peer_key}[{i}]", ctx) for i, entry in enumerate(entries)]
    if not entries:
        peers = [Peer(entity=Entity.ALL)]  # no from/to: every source/destination
    ports = [
        _knp_port(entry, f"{path}.ports[{i}]")
        for i, entry in enumerate(doc_fields.optional_list(raw, "ports", path))
    ]
    return _unique(peers), _unique(ports)


def _knp_peer(raw: Any, path: str, ctx: _Context) -> Peer:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    _check_fields(raw, frozenset({"podSelector", "namespaceSelector", "ipBlock"}), path)
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
    return Peer(selector=Selector(_selector_of(requirements)))


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


def _ip_block(raw: Any, path: str, ctx: _Context) -> CIDRRule:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping with cidr and except, got {doc_fields.type_name(raw)}", field=path
        )
    _check_fields(raw, frozenset({"cidr", "except"}), path)
    if not raw.get("cidr"):
        raise InvalidArgument("is required", field=f"{path}.cidr")
    network = _cidr_value(raw["cidr"], f"{path}.cidr", ctx, allow_address=False)
    return CIDRRule(
        network,
        _excepts(network, doc_fields.optional_list(raw, "except", path), f"{path}.except", ctx),
    )


def _knp_port(raw: Any, path: str) -> PortRule:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(raw)}", field=path)
    _check_fields(raw, frozenset({"protocol", "port", "endPort"}), path)
    protocol_text = _optional_str(raw, "protocol", path) or "TCP"
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
        return PortRule(protocol, value, _end_port(raw, value, path))
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a number or a port name, got {doc_fields.typed(value)}", field=f"{path}.port"
        )
    _check_port_name(value, f"{path}.port")
    if raw.get("endPort") is not None:
        raise InvalidArgument(
            "may not be specified when port is a named port", field=f"{path}.endPort"
        )
    return PortRule(protocol, port_name=value)


# --- field helpers -----------------------------------------------------------------------------


def _unique(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _optional_str(parent: Mapping[str, Any], key: str, path: str) -> str:
    value = parent.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.typed(value)} (quote it in YAML)",
            field=doc_fields.join(path, key),
        )
    return value


def _check_fields(obj: Mapping[Any, Any], known: frozenset[str], path: str) -> None:
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


def _string_map(raw: Any, path: str, *, labels: bool) -> dict[str, str]:
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


def _plain(value: Any, path: str) -> Any:
    """A deep copy as plain JSON data (str keys; str, int, float, bool, None, list, dict)."""
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(
                    f"keys must be strings, got {doc_fields.typed(key)} (quote it in YAML)",
                    field=doc_fields.join(path, str(key)),
                )
            copied[key] = _plain(item, doc_fields.join(path, key))
        return copied
    if isinstance(value, list):
        return [_plain(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise InvalidArgument(f"unsupported value of type {type(value).__name__}", field=path or None)


def _check_dns_label(value: str, path: str) -> None:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            field=path,
        )


def _check_port_name(name: str, path: str) -> None:
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
