"""Policy documents -> :mod:`services.policy.model`, validated the way Cilium and Kubernetes do.

API:

- :func:`parse_documents` ``(text, source) -> list[Policy]``: every policy in a multi-document
  YAML text (``kind: List`` items are read in place), all validated before any is returned.
- :func:`parse_document` ``(doc, source, index) -> Policy``: one document already decoded, as the
  service receives it over the bus.
- :class:`PolicyDocumentError`, an ``InvalidArgument`` raised for the first error; its message
  is ``"<source>: document <N> (<Kind>/<name>): <field.path>: <reason>"`` (the form of
  ``shared/manifests.py``) and ``field`` is the path. A document with any error is rejected whole.
- :data:`AUDIT_ANNOTATION`: ``policy.membrane.io/audit: "true"`` sets ``Policy.audit``.

This module reads the document (kind, apiVersion, metadata, ``kind: List``); the specs are read
by :mod:`services.policy.formats`: ``cilium`` (CiliumNetworkPolicy and the cluster-wide one),
``netpol`` (NetworkPolicy), ``l7`` (the L7 rules of a Cilium port rule) and ``common`` (the
document context and the field checks both formats share).

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

from collections.abc import Mapping
from typing import Any

from services.policy.formats.cilium import cilium_specs
from services.policy.formats.common import (
    Context,
    check_dns_label,
    check_fields,
    optional_str,
    plain,
    string_map,
)
from services.policy.formats.netpol import netpol_spec
from services.policy.model import Policy, PolicyKind, PolicySpec
from shared import doc_fields, kube_yaml
from shared.errors import InvalidArgument
from shared.names import DNS_SUBDOMAIN, OBJECT_META_FIELDS

AUDIT_ANNOTATION = "policy.membrane.io/audit"
DEFAULT_NAMESPACE = "default"
_LIST_KIND = "List"
_CILIUM_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "specs", "status"})
_KNP_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


class PolicyDocumentError(InvalidArgument):
    """An ``InvalidArgument`` whose message already names source, document and field path.

    ``str()`` is the message alone, so that ``error: {exc}`` does not print the field twice.
    """

    def __str__(self) -> str:
        return self.message


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


def parse_document(
    doc: Mapping[str, Any], source: str, index: int = 1, *, cidr_matches_pods: bool = False
) -> Policy:
    """One decoded document (``index``: its 1-based position in ``source``), validated.

    ``cidr_matches_pods``: Cilium's CIDR rules get the NetworkPolicy meaning (they match pod
    addresses too, as ``ipBlock`` always does); the policy service's setting of that name."""
    return _parse_located(doc, source, f"document {index}", cidr_matches_pods)


def _parse_located(obj: Any, source: str, where: str, cidr_matches_pods: bool = False) -> Policy:
    try:
        return _parse_policy(obj, cidr_matches_pods)
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
        check_fields(raw, frozenset({"apiVersion", "kind", "metadata", "items"}), "")
        if raw.get("apiVersion") != "v1":
            raise InvalidArgument(
                f"List is served as apiVersion 'v1', got {raw.get('apiVersion')!r}",
                field="apiVersion",
            )
        items = doc_fields.optional_list(raw, "items", "")
    except InvalidArgument as exc:
        raise _located(source, f"{where} (List)", exc) from None
    return [(f"{where} items[{position}]", item) for position, item in enumerate(items)]


def _parse_policy(obj: Any, cidr_matches_pods: bool) -> Policy:
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
    check_fields(obj, _KNP_FIELDS if kind is PolicyKind.KNP else _CILIUM_FIELDS, "")
    source = plain(obj, "")
    meta = doc_fields.mapping(obj, "metadata", "", required=True)
    check_fields(meta, OBJECT_META_FIELDS, "metadata")
    name = _name(meta)
    warnings: list[str] = []
    if kind.namespaced:
        namespace = optional_str(meta, "namespace", "metadata") or DEFAULT_NAMESPACE
        check_dns_label(namespace, "metadata.namespace")
    else:
        namespace = ""
        if meta.get("namespace"):
            warnings.append(f"metadata.namespace: ignored, a {kind.value} is cluster-scoped")
    string_map(meta.get("labels"), "metadata.labels", labels=True)
    annotations = string_map(meta.get("annotations"), "metadata.annotations", labels=False)
    audit = _audit(annotations)
    ctx = Context(kind, namespace, name, warnings, cidr_matches_pods=cidr_matches_pods)
    if kind is PolicyKind.KNP:
        specs: tuple[PolicySpec, ...] = (netpol_spec(obj.get("spec"), ctx),)
    else:
        specs = cilium_specs(obj, ctx)
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
