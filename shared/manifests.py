"""Kubernetes manifests for ``membrane apply -f`` and ``membrane delete -f``: parse and validate.

A file is validated completely before anything is applied, so that a typo in its last document
cannot leave the cluster half-changed: the first error rejects the whole file and names the
source, the document (1-based position in the YAML stream, kind and name when known), the field
path and the reason. Namespaces, Pods and Deployments become typed documents; the kinds that other
services own (policies, services) are only checked far enough to route them, and those services
validate the rest. The rules are Kubernetes' own, so a manifest that works here works there.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared import doc_fields, kube_yaml, protocols
from shared.errors import InvalidArgument
from shared.labels import check_pod_labels, validate_key, validate_value
from shared.messages import ContainerPort
from shared.names import (
    DNS_1035_LABEL,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    IANA_SVC_NAME,
    OBJECT_META_FIELDS,
)
from shared.selectors import LabelSelector

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"
PROTOCOLS = tuple(protocols.PORT_PROTOCOLS)
SERVICE_POLICY = "policy"
SERVICE_LB = "lb"

MAX_REPLICAS = 2**31 - 1  # int32, as Kubernetes
_HASH_LENGTH = 10
_SUFFIX_LENGTH = 5
# Kubernetes cuts a generated name's base so that base + random suffix fits a DNS label (63).
_MAX_GENERATED_BASE = 63 - _SUFFIX_LENGTH
# The alphabet Kubernetes uses for generated names: no vowels (no words), no look-alikes.
_SAFE_CHARS = "bcdfghjklmnpqrstvwxz2456789"


_OBJECT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_DEPLOYMENT_SPEC_FIELDS = frozenset(
    {
        "replicas",
        "selector",
        "template",
        "strategy",
        "minReadySeconds",
        "revisionHistoryLimit",
        "paused",
        "progressDeadlineSeconds",
    }
)
_TEMPLATE_FIELDS = frozenset({"metadata", "spec"})
_PORT_FIELDS = frozenset({"containerPort", "hostPort", "hostIP", "name", "protocol"})
_NAMESPACE_SPEC_FIELDS = frozenset({"finalizers"})


@dataclass(frozen=True)
class NamespaceDoc:
    name: str
    labels: dict[str, str]  # always has kubernetes.io/metadata.name, as the API server sets it


@dataclass(frozen=True)
class PodDoc:
    namespace: str
    name: str
    labels: dict[str, str]
    service_account: str
    ports: tuple[ContainerPort, ...]
    node_name: str = ""  # spec.nodeName: pins the pod to a node
    owner: str = ""  # "Deployment/<name>" for pods expanded from a Deployment


@dataclass(frozen=True)
class DeploymentDoc:
    namespace: str
    name: str
    replicas: int
    selector: dict[str, str]  # spec.selector.matchLabels; matchExpressions are only validated
    template: PodDoc  # name empty, namespace the deployment's


@dataclass(frozen=True)
class RoutedDoc:
    """A document another service owns; only what routing needs has been checked."""

    service: str  # SERVICE_POLICY | SERVICE_LB
    kind: str
    api_version: str
    namespace: str  # "" for cluster-scoped kinds
    name: str
    body: dict[str, Any]


Document = NamespaceDoc | PodDoc | DeploymentDoc | RoutedDoc


class ManifestError(InvalidArgument):
    """An :class:`InvalidArgument` whose message already names source, document and field.

    ``str()`` is the message alone, so that ``error: {exc}`` does not print the field twice.
    """

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Kind:
    api_version: str
    service: str  # "" when this module turns it into a typed document
    namespaced: bool
    name_rule: str  # "label" | "subdomain" | "1035": the name syntax Kubernetes checks


KINDS: dict[str, _Kind] = {
    "Namespace": _Kind("v1", "", namespaced=False, name_rule="label"),
    "Pod": _Kind("v1", "", namespaced=True, name_rule="subdomain"),
    "Deployment": _Kind("apps/v1", "", namespaced=True, name_rule="subdomain"),
    "CiliumNetworkPolicy": _Kind("cilium.io/v2", SERVICE_POLICY, True, "subdomain"),
    "CiliumClusterwideNetworkPolicy": _Kind("cilium.io/v2", SERVICE_POLICY, False, "subdomain"),
    "NetworkPolicy": _Kind("networking.k8s.io/v1", SERVICE_POLICY, True, "subdomain"),
    "Service": _Kind("v1", SERVICE_LB, True, "1035"),
    "EndpointSlice": _Kind("discovery.k8s.io/v1", SERVICE_LB, True, "subdomain"),
}
_LIST_KIND = "List"
_LIST_API_VERSION = "v1"


# --- loading ----------------------------------------------------------------------------------


def load(text: str, source: str) -> list[Document]:
    """Every object in a multi-document YAML text, all validated; the first error raises.

    ``source`` (a path, or "-" for stdin) only names the input in messages. Empty documents are
    skipped but still counted, so "document 3" is the third in the file; ``kind: List`` items are
    read in place. Raises :class:`InvalidArgument` with the field path in ``field``.
    """
    return Reader(source).feed(kube_yaml.load_all(text, source, ManifestError))


class Reader:
    """:func:`load` a piece at a time: the documents of each piece of a file (see
    :func:`pieces`) validated as they come, numbered and checked for names defined twice
    across the whole file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0  # documents so far, empty ones included
        self.defined: dict[tuple[str, str, str], _Label] = {}

    def feed(self, raws: list[Any]) -> list[Document]:
        """The validated objects of the next documents, read as :func:`kube_yaml.load_all`
        reads them."""
        documents: list[Document] = []
        source, defined = self.source, self.defined
        for index, raw in enumerate(raws, start=self.count + 1):
            if raw is None:
                continue
            for item_where, obj in _objects(raw, index, source):
                try:
                    doc = _parse_object(obj)
                    key = _identity(doc)
                    first = defined.get(key)
                    if first is not None:
                        kind, namespace, name = key
                        what = f"{namespace}/{name}" if namespace else name
                        raise InvalidArgument(
                            f"{kind} {what} is defined twice, first by {first}",
                            field="metadata.name",
                        )
                except InvalidArgument as exc:
                    label = kube_yaml.describe(_where(item_where), obj)
                    raise _located(source, label, exc) from None
                defined[key] = _Label(item_where, obj)
                documents.append(doc)
        self.count += len(raws)
        return documents


# a line that starts a YAML document: "---" alone or before a space. At the start of a line it
# is always one (inside a block or quoted scalar YAML forbids it), so a text cut there reads as
# the documents of its pieces, in order
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|\Z)", re.MULTILINE)


def pieces(text: str, size: int) -> list[str]:
    """``text`` cut at document starts into pieces of at least ``size`` characters (the last
    may be shorter); their documents, read one piece after another, are the text's."""
    cuts = [0]
    while (m := _DOCUMENT_START.search(text, cuts[-1] + size)) is not None:
        cuts.append(m.start())
    cuts.append(len(text))
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


class _Label:
    """What names a document in messages (``document 3 (Service/web)``), made only when a
    message needs it: a bulk file has tens of thousands of documents and no error."""

    __slots__ = ("obj", "where")

    def __init__(self, where: int | str, obj: Any) -> None:
        self.where = where
        self.obj = obj

    def __str__(self) -> str:
        return kube_yaml.describe(_where(self.where), self.obj)


def _where(where: int | str) -> str:
    """A document's place: its number in the file, or a List item's path already made."""
    return f"document {where}" if isinstance(where, int) else where


def _objects(raw: Any, index: int, source: str) -> list[tuple[int | str, Any]]:
    """The objects a document holds: itself, or the items of a ``kind: List``."""
    if type(raw) is dict:  # the usual case, without the ABC check (bulk manifests)
        if raw.get("kind") != _LIST_KIND:
            return [(index, raw)]
    elif not isinstance(raw, Mapping) or raw.get("kind") != _LIST_KIND:
        return [(index, raw)]
    where = _where(index)
    label = f"{where} (List)"
    try:
        _check_fields(raw, frozenset({"apiVersion", "kind", "metadata", "items"}), "")
        api_version = raw.get("apiVersion")
        if api_version != _LIST_API_VERSION:
            raise InvalidArgument(
                f"List is served as apiVersion {_LIST_API_VERSION!r}, got {api_version!r}",
                field="apiVersion",
            )
        items = doc_fields.optional_list(raw, "items", "")
        for position, item in enumerate(items):
            if isinstance(item, Mapping) and item.get("kind") == _LIST_KIND:
                raise InvalidArgument(
                    "a List inside a List is not supported", field=f"items[{position}]"
                )
    except InvalidArgument as exc:
        raise _located(source, label, exc) from None
    return [(f"{where} items[{position}]", item) for position, item in enumerate(items)]


def _located(source: str, label: str, exc: InvalidArgument) -> ManifestError:
    prefix = f"{source}: {label}: "
    if exc.field:
        return ManifestError(f"{prefix}{exc.field}: {exc.message}", field=exc.field)
    return ManifestError(f"{prefix}{exc.message}")


def _identity(doc: Document) -> tuple[str, str, str]:
    if isinstance(doc, NamespaceDoc):
        return ("Namespace", "", doc.name)
    if isinstance(doc, PodDoc):
        return ("Pod", doc.namespace, doc.name)
    if isinstance(doc, DeploymentDoc):
        return ("Deployment", doc.namespace, doc.name)
    return (doc.kind, doc.namespace, doc.name)


def _parse_object(obj: Any) -> Document:
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise InvalidArgument(
            f"a document must be a mapping (a Kubernetes object), got {doc_fields.type_name(obj)}"
        )
    kind_name = obj.get("kind")
    if kind_name is None:
        raise InvalidArgument("is required", field="kind")
    if not isinstance(kind_name, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.type_name(kind_name)}", field="kind"
        )
    kind = KINDS.get(kind_name)
    if kind is None:
        raise InvalidArgument(
            f"unknown kind {kind_name!r}; membrane accepts {', '.join(KINDS)} and List",
            field="kind",
        )
    api_version = obj.get("apiVersion")
    if api_version != kind.api_version:
        got = "none" if api_version is None else repr(api_version)
        raise InvalidArgument(
            f"{kind_name} is served as apiVersion {kind.api_version!r}, got {got}",
            field="apiVersion",
        )
    if kind.service:
        return _routed(obj, kind_name, kind)
    _check_fields(obj, _OBJECT_FIELDS, "")
    meta = doc_fields.mapping(obj, "metadata", "")
    _check_fields(meta, OBJECT_META_FIELDS, "metadata")
    name = _name(meta, kind)
    if kind_name == "Namespace":
        labels = _labels(meta, "metadata")
        _check_fields(doc_fields.mapping(obj, "spec", ""), _NAMESPACE_SPEC_FIELDS, "spec")
        # the API server sets this label on every namespace, overriding what the user wrote
        labels[NAMESPACE_NAME_LABEL] = name
        return NamespaceDoc(name=name, labels=labels)
    namespace = _namespace(meta)
    labels = _labels(meta, "metadata")
    if kind_name == "Pod":
        check_pod_labels(labels, "metadata.labels")
        spec = doc_fields.mapping(obj, "spec", "", required=True)
        return _pod(spec, "spec", namespace=namespace, name=name, labels=labels)
    return _deployment(obj, namespace, name)


def _routed(obj: Mapping[str, Any], kind_name: str, kind: _Kind) -> RoutedDoc:
    meta = doc_fields.mapping(obj, "metadata", "")
    name = _name(meta, kind)
    # a cluster-scoped object has no namespace; Kubernetes ignores one if given
    namespace = _namespace(meta) if kind.namespaced else ""
    return RoutedDoc(
        service=kind.service,
        kind=kind_name,
        api_version=kind.api_version,
        namespace=namespace,
        name=name,
        body=obj if type(obj) is dict else dict(obj),  # read from YAML: nothing else holds it
    )


def _name(meta: Mapping[str, Any], kind: _Kind) -> str:
    name = meta.get("name")
    if name is None or name == "":
        hint = " (generateName is not supported by apply)" if "generateName" in meta else ""
        raise InvalidArgument(f"is required{hint}", field="metadata.name")
    if not isinstance(name, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.type_name(name)}", field="metadata.name"
        )
    if kind.name_rule == "label":
        _check_dns_label(name, "metadata.name")
    elif kind.name_rule == "1035":
        _check_dns_1035_label(name, "metadata.name")
    else:
        _check_dns_subdomain(name, "metadata.name")
    return name


def _namespace(meta: Mapping[str, Any]) -> str:
    namespace = _optional_str(meta, "namespace", "metadata", DEFAULT_NAMESPACE)
    _check_dns_label(namespace, "metadata.namespace")
    return namespace


def _pod(
    spec: Mapping[str, Any], path: str, *, namespace: str, name: str, labels: dict[str, str]
) -> PodDoc:
    # the deprecated serviceAccount is honoured when serviceAccountName is absent, as Kubernetes
    legacy = _optional_str(spec, "serviceAccount", path, DEFAULT_SERVICE_ACCOUNT)
    service_account = _optional_str(spec, "serviceAccountName", path, legacy)
    sa_field = (
        f"{path}.serviceAccountName" if "serviceAccountName" in spec else f"{path}.serviceAccount"
    )
    _check_dns_subdomain(service_account, sa_field)
    node_name = _optional_str(spec, "nodeName", path, "")
    if node_name:
        _check_dns_subdomain(node_name, f"{path}.nodeName")
    containers = doc_fields.optional_list(spec, "containers", path)
    if not containers:
        raise InvalidArgument("must list at least one container", field=f"{path}.containers")
    ports: list[ContainerPort] = []
    container_names: dict[str, str] = {}
    port_names: dict[str, str] = {}
    for c_index, container in enumerate(containers):
        c_path = f"{path}.containers[{c_index}]"
        if not isinstance(container, Mapping):
            raise InvalidArgument(
                f"must be a mapping, got {doc_fields.type_name(container)}", field=c_path
            )
        c_name = container.get("name")
        if c_name is None or c_name == "":
            raise InvalidArgument("is required", field=f"{c_path}.name")
        if not isinstance(c_name, str):
            raise InvalidArgument(
                f"must be a string, got {doc_fields.type_name(c_name)}", field=f"{c_path}.name"
            )
        _check_dns_label(c_name, f"{c_path}.name")
        if c_name in container_names:
            raise InvalidArgument(
                f"duplicate container name {c_name!r} (also {container_names[c_name]})",
                field=f"{c_path}.name",
            )
        container_names[c_name] = f"{c_path}.name"
        for p_index, entry in enumerate(doc_fields.optional_list(container, "ports", c_path)):
            p_path = f"{c_path}.ports[{p_index}]"
            port = _port(entry, p_path)
            if port.name:
                if port.name in port_names:
                    raise InvalidArgument(
                        f"duplicate port name {port.name!r} (also {port_names[port.name]})",
                        field=f"{p_path}.name",
                    )
                port_names[port.name] = f"{p_path}.name"
            ports.append(port)
    return PodDoc(
        namespace=namespace,
        name=name,
        labels=labels,
        service_account=service_account,
        ports=tuple(ports),
        node_name=node_name,
    )


def _port(entry: Any, path: str) -> ContainerPort:
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"must be a mapping, got {doc_fields.type_name(entry)}", field=path)
    _check_fields(entry, _PORT_FIELDS, path)
    number = entry.get("containerPort")
    if number is None:
        raise InvalidArgument("is required", field=f"{path}.containerPort")
    if not doc_fields.is_int(number) or not 1 <= number <= 65535:
        raise InvalidArgument(
            f"must be an integer in 1..65535, got {doc_fields.show(number)}",
            field=f"{path}.containerPort",
        )
    protocol = _optional_str(entry, "protocol", path, "TCP")
    if protocol not in PROTOCOLS:
        raise InvalidArgument(
            f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}", field=f"{path}.protocol"
        )
    name = _optional_str(entry, "name", path, "")
    if name:
        _check_port_name(name, f"{path}.name")
    return ContainerPort(port=number, protocol=protocol, name=name)


def _deployment(obj: Mapping[str, Any], namespace: str, name: str) -> DeploymentDoc:
    spec = doc_fields.mapping(obj, "spec", "", required=True)
    _check_fields(spec, _DEPLOYMENT_SPEC_FIELDS, "spec")
    replicas = spec.get("replicas", 1)
    if replicas is None:
        replicas = 1
    if not doc_fields.is_int(replicas) or not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(
            f"must be an integer in 0..{MAX_REPLICAS}, got {doc_fields.show(replicas)}",
            field="spec.replicas",
        )
    raw_selector = doc_fields.mapping(spec, "selector", "spec", required=True)
    # matchLabels first with the plain Kubernetes key rules (no Cilium "k8s:" source prefix)
    match_labels = _label_map(raw_selector.get("matchLabels"), "spec.selector.matchLabels")
    selector = LabelSelector.parse(raw_selector, "spec.selector")
    if selector.is_empty:
        raise InvalidArgument(
            "must not be empty: a Deployment must say which pods are its own",
            field="spec.selector",
        )
    template = doc_fields.mapping(spec, "template", "spec", required=True)
    _check_fields(template, _TEMPLATE_FIELDS, "spec.template")
    t_meta = doc_fields.mapping(template, "metadata", "spec.template")
    _check_fields(t_meta, OBJECT_META_FIELDS, "spec.template.metadata")
    t_labels = _labels(t_meta, "spec.template.metadata")
    check_pod_labels(t_labels, "spec.template.metadata.labels")
    if not selector.matches(t_labels):
        raise InvalidArgument(
            f"selector does not match template labels (selector {_show_selector(selector)}, "
            f"template labels {_show_labels(t_labels)})",
            field="spec.template.metadata.labels",
        )
    t_spec = doc_fields.mapping(template, "spec", "spec.template", required=True)
    # the template's own namespace and name are ignored: the pods live where the deployment is
    pod = _pod(t_spec, "spec.template.spec", namespace=namespace, name="", labels=t_labels)
    return DeploymentDoc(
        namespace=namespace, name=name, replicas=replicas, selector=match_labels, template=pod
    )


# --- deployments ------------------------------------------------------------------------------


def template_hash(template: PodDoc) -> str:
    """A 10-character hash of what makes the pods: a changed template gives new pod names."""
    content = {
        "labels": template.labels,
        "serviceAccount": template.service_account,
        "ports": [[p.port, p.protocol, p.name] for p in template.ports],
        "nodeName": template.node_name,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return _encode(hashlib.sha256(canonical.encode()).digest(), _HASH_LENGTH)


def expand_deployment(deployment: DeploymentDoc, nodes: Sequence[str]) -> list[PodDoc]:
    """The pods a Deployment stands for, named as Kubernetes names them but deterministically.

    The same deployment always expands to the same names, so applying it again changes nothing;
    replica ``i`` keeps its name and node when scaling, so scaling only adds or removes pods. Pods
    go round-robin over the sorted ``nodes`` unless the template pins a node.
    """
    template = deployment.template
    phash = template_hash(template)
    placement = sorted(set(nodes))
    base = f"{deployment.name}-{phash}-"[:_MAX_GENERATED_BASE]
    labels = {**template.labels, POD_TEMPLATE_HASH_LABEL: phash}
    taken: set[str] = set()
    pods: list[PodDoc] = []
    for index in range(deployment.replicas):
        suffix = _suffix(f"{deployment.name}/{phash}/{index}", taken)
        taken.add(suffix)
        node = template.node_name
        if not node and placement:
            node = placement[index % len(placement)]
        pods.append(
            PodDoc(
                namespace=deployment.namespace,
                name=base + suffix,
                labels=dict(labels),
                service_account=template.service_account,
                ports=template.ports,
                node_name=node,
                owner=f"Deployment/{deployment.name}",
            )
        )
    return pods


def _suffix(seed: str, taken: Collection[str]) -> str:
    # the deployment name is in the seed too: names cut to fit 63 characters must still differ
    attempt = 0
    while True:
        digest = hashlib.sha256(f"{seed}/{attempt}".encode()).digest()
        suffix = _encode(digest, _SUFFIX_LENGTH)
        if suffix not in taken:
            return suffix
        attempt += 1


def _encode(digest: bytes, length: int) -> str:
    number = int.from_bytes(digest, "big")
    chars: list[str] = []
    for _ in range(length):
        number, digit = divmod(number, len(_SAFE_CHARS))
        chars.append(_SAFE_CHARS[digit])
    return "".join(chars)


# --- field helpers ----------------------------------------------------------------------------


def _optional_str(parent: Mapping[str, Any], key: str, path: str, default: str) -> str:
    value = parent.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.typed(value)} (quote it in YAML)",
            field=doc_fields.join(path, key),
        )
    return value


def _check_fields(obj: Mapping[Any, Any], known: frozenset[str], path: str) -> None:
    """Reject unknown fields where the set is small and fixed, as kubectl's strict validation.

    A misspelt ``ports`` or ``lables`` would otherwise be ignored silently. Pod and container
    specs are not checked: their many fields grow with every Kubernetes release.
    """
    for key in obj:
        if key in known:
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgument(f"unknown field{hint}", field=doc_fields.join(path, str(key)))


def _labels(meta: Mapping[str, Any], path: str) -> dict[str, str]:
    return _label_map(meta.get("labels"), doc_fields.join(path, "labels"))


def _label_map(raw: Any, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(
            f"must be a mapping of key: value, got {doc_fields.type_name(raw)}", field=path
        )
    labels: dict[str, str] = {}
    for key, value in raw.items():
        field = f"{path}[{key!r}]"
        if not isinstance(key, str):
            raise InvalidArgument(
                f"label key must be a string, got {doc_fields.typed(key)} (quote it in YAML)",
                field=field,
            )
        validate_key(key, field=field)
        if value is None:
            value = ""  # what Kubernetes makes of a null string
        if not isinstance(value, str):
            raise InvalidArgument(
                f"label value must be a string, got {doc_fields.typed(value)} (quote it in YAML)",
                field=field,
            )
        validate_value(value, field=field)
        labels[key] = value
    return labels


def _check_dns_label(value: str, field: str) -> None:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            field=field,
        )


def _check_dns_1035_label(value: str, field: str) -> None:
    if len(value) > 63 or not DNS_1035_LABEL.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS-1035 label: at most 63 lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit",
            field=field,
        )


def _check_dns_subdomain(value: str, field: str) -> None:
    if len(value) > 253 or not DNS_SUBDOMAIN.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS-1123 subdomain: at most 253 lowercase letters, digits, "
            "'-' and '.', each dot-separated part starting and ending with a letter or digit",
            field=field,
        )


def _check_port_name(name: str, field: str) -> None:
    """IANA_SVC_NAME, which named ports in policies and services refer to."""
    if len(name) > 15:
        raise InvalidArgument(f"{name!r} is longer than 15 characters", field=field)
    if not IANA_SVC_NAME.match(name) or "--" in name:
        raise InvalidArgument(
            f"{name!r} must be lowercase letters, digits and '-', starting and ending with a "
            "letter or digit, without '--'",
            field=field,
        )
    if not any(c.isalpha() for c in name):
        raise InvalidArgument(f"{name!r} must contain at least one letter", field=field)


def _show_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return "none"
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _show_selector(selector: LabelSelector) -> str:
    parts: list[str] = []
    for req in selector.requirements:
        if req.operator == "In" and len(req.values) == 1:
            parts.append(f"{req.key}={next(iter(req.values))}")
        elif req.values:
            parts.append(f"{req.key} {req.operator} ({','.join(sorted(req.values))})")
        else:
            parts.append(f"{req.key} {req.operator}")
    return ", ".join(parts)
