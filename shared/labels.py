"""Labels: the vocabulary of security identities.

A label is ``source:key=value`` as in Cilium (``k8s:app=web``, ``reserved:host``,
``cidr:10.0.0.0/8``). A :class:`LabelSet` is immutable, validated, and has one canonical text
form (sorted), so that the same workload always maps to the same identity however its labels
were ordered or spelled.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from shared.errors import InvalidArgument

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCES = (SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR)

# Label keys Kubernetes and Cilium give every pod; the policy service selects on these.
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Keys under these prefixes say what the pod's namespace and service account are: only the
# cluster may write them (pod_identity_labels), never a pod's own labels, or a pod labelled
# io.cilium.k8s.namespace.labels.team=trusted would be selected as if its namespace were.
RESERVED_POD_LABEL_PREFIXES = (NAMESPACE_LABEL, "io.cilium.k8s.")

MAX_NAME_LENGTH = 63
MAX_PREFIX_LENGTH = 253
MAX_LABELS = 128

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_key(key: str, field: str = "key") -> None:
    """Kubernetes label key syntax: an optional DNS-subdomain prefix and '/', then a name."""
    if not key:
        raise InvalidArgument("label key must not be empty", field=field)
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            raise InvalidArgument(f"label key {key!r} has an empty prefix", field=field)
        if len(prefix) > MAX_PREFIX_LENGTH:
            raise InvalidArgument(
                f"label key prefix of {key!r} is longer than {MAX_PREFIX_LENGTH} characters",
                field=field,
            )
        if not _DNS_SUBDOMAIN_RE.match(prefix):
            raise InvalidArgument(
                f"label key prefix of {key!r} must be a DNS subdomain "
                "(lowercase letters, digits, '-' and '.')",
                field=field,
            )
    if not name:
        raise InvalidArgument(f"label key {key!r} has an empty name", field=field)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"label key name {name!r} is longer than {MAX_NAME_LENGTH} characters", field=field
        )
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"label key name {name!r} must start and end with a letter or digit and contain "
            "only letters, digits, '-', '_' and '.'",
            field=field,
        )


def validate_value(value: str, field: str = "value") -> None:
    """Kubernetes label value syntax: empty, or a name of at most 63 characters."""
    if value == "":
        return
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"label value {value[:20]!r}... is longer than {MAX_NAME_LENGTH} characters",
            field=field,
        )
    if not _NAME_RE.match(value):
        raise InvalidArgument(
            f"label value {value!r} must start and end with a letter or digit and contain "
            "only letters, digits, '-', '_' and '.'",
            field=field,
        )


@dataclass(frozen=True, order=True, slots=True)
class Label:
    source: str
    key: str
    value: str = ""

    @classmethod
    def parse(cls, text: str, default_source: str = SOURCE_K8S) -> Label:
        """Parse ``[source:]key[=value]``; ``reserved:host`` and ``cidr:10.0.0.0/8`` too."""
        field = f"labels[{text!r}]"
        if not text or not text.strip():
            raise InvalidArgument("label must not be empty", field=field)
        source = default_source
        rest = text
        head, colon, tail = text.partition(":")
        if colon and head in SOURCES:
            source, rest = head, tail
        if source == SOURCE_CIDR:
            key, value = rest, ""
        else:
            key, _, value = rest.partition("=")
        return cls.create(source, key, value, field=field)

    @classmethod
    def create(cls, source: str, key: str, value: str = "", *, field: str = "label") -> Label:
        if source not in SOURCES:
            raise InvalidArgument(
                f"unknown label source {source!r}, expected one of {', '.join(SOURCES)}",
                field=field,
            )
        if source == SOURCE_CIDR:
            try:
                network = ipaddress.ip_network(key, strict=True)
            except ValueError as exc:
                raise InvalidArgument(f"cidr label {key!r}: {exc}", field=field) from None
            if value:
                raise InvalidArgument("cidr labels take no value", field=field)
            return cls(source, str(network))
        validate_key(key, field=field)
        validate_value(value, field=field)
        return cls(source, key, value)

    def __str__(self) -> str:
        if self.source == SOURCE_CIDR or (self.source == SOURCE_RESERVED and not self.value):
            return f"{self.source}:{self.key}"
        return f"{self.source}:{self.key}={self.value}"


class LabelSet(Mapping[str, Label]):
    """An immutable, validated set of labels, at most one per ``source:key``."""

    __slots__ = ("_by_key", "_canonical")

    def __init__(self, labels: Iterable[Label] = ()) -> None:
        by_key: dict[str, Label] = {}
        for label in labels:
            ident = f"{label.source}:{label.key}"
            previous = by_key.get(ident)
            if previous is not None and previous != label:
                raise InvalidArgument(
                    f"label {ident!r} given twice with different values "
                    f"({previous.value!r} and {label.value!r})",
                    field=f"labels[{ident!r}]",
                )
            by_key[ident] = label
        if len(by_key) > MAX_LABELS:
            raise InvalidArgument(
                f"a label set holds at most {MAX_LABELS} labels, got {len(by_key)}",
                field="labels",
            )
        self._by_key = dict(sorted(by_key.items()))
        self._canonical = ";".join(str(label) for label in self._by_key.values())

    @classmethod
    def parse(cls, texts: Iterable[str], default_source: str = SOURCE_K8S) -> LabelSet:
        return cls(Label.parse(text, default_source) for text in texts)

    @classmethod
    def from_canonical(cls, text: str) -> LabelSet:
        if not text:
            return cls()
        return cls.parse(text.split(";"))

    @classmethod
    def from_k8s(cls, labels: Mapping[str, str]) -> LabelSet:
        """Labels from a Kubernetes object's ``metadata.labels``, as ``k8s:`` labels."""
        return cls(
            Label.create(SOURCE_K8S, key, value, field=f"metadata.labels[{key!r}]")
            for key, value in labels.items()
        )

    @property
    def canonical(self) -> str:
        """The one text form of this set: sorted ``source:key=value`` joined by ';'."""
        return self._canonical

    def strings(self) -> list[str]:
        return [str(label) for label in self._by_key.values()]

    def k8s_map(self) -> dict[str, str]:
        """The ``k8s:`` labels as a plain key -> value map, what selectors match against."""
        return {lb.key: lb.value for lb in self._by_key.values() if lb.source == SOURCE_K8S}

    def is_reserved(self) -> bool:
        return any(label.source == SOURCE_RESERVED for label in self._by_key.values())

    def union(self, other: Iterable[Label]) -> LabelSet:
        return LabelSet([*self._by_key.values(), *other])

    def __getitem__(self, ident: str) -> Label:
        return self._by_key[ident]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __hash__(self) -> int:
        return hash(self._canonical)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LabelSet):
            return self._canonical == other._canonical
        return NotImplemented

    def __repr__(self) -> str:
        return f"LabelSet({self._canonical!r})"


# Cilium's default identity-relevant label filter. A pattern is a regular expression searched
# in the label key (unanchored, as Cilium does, so 'kubernetes\.io' catches
# 'statefulset.kubernetes.io/pod-name'); '!' makes it an exclusion. When an inclusion and an
# exclusion both match, the longer pattern (the more specific one) decides.
DEFAULT_LABEL_FILTER: tuple[str, ...] = (
    r"^io\.kubernetes\.pod\.namespace$",
    r"^io\.cilium\.k8s\.namespace\.labels\.",
    r"^io\.cilium\.k8s\.policy\.",
    r"^app\.kubernetes\.io/",
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    r"!beta\.kubernetes\.io",
    r"!k8s\.io",
    r"!pod-template-generation",
    r"!pod-template-hash",
    r"!controller-revision-hash",
    r"!annotation.*",
    r"!etcd_node",
)
_DEFAULT_INCLUSIONS = frozenset(p for p in DEFAULT_LABEL_FILTER if not p.startswith("!"))


class LabelFilter:
    """Drops high-cardinality ``k8s:`` labels so that all replicas share one identity.

    As in Cilium, an inclusion pattern of the user's own (one not in the defaults) turns the
    filter into an allow-list: only labels that some inclusion matches count.
    """

    def __init__(self, patterns: Iterable[str] = DEFAULT_LABEL_FILTER) -> None:
        self.patterns = tuple(patterns)
        include: list[re.Pattern[str]] = []
        exclude: list[re.Pattern[str]] = []
        for index, pattern in enumerate(self.patterns):
            negated = pattern.startswith("!")
            body = pattern[1:] if negated else pattern
            try:
                compiled = re.compile(body)
            except re.error as exc:
                raise InvalidArgument(
                    f"label filter pattern {pattern!r} is not a regular expression: {exc}",
                    field=f"label_filter[{index}]",
                ) from None
            (exclude if negated else include).append(compiled)
        self._include = include
        self._exclude = exclude
        self._allow_list = any(
            not p.startswith("!") and p not in _DEFAULT_INCLUSIONS for p in self.patterns
        )

    def keeps(self, label: Label) -> bool:
        if label.source != SOURCE_K8S:
            return True
        included = max((len(p.pattern) for p in self._include if p.search(label.key)), default=0)
        excluded = max((len(p.pattern) for p in self._exclude if p.search(label.key)), default=0)
        if excluded > included:
            return False
        return included > 0 or not self._allow_list

    def apply(self, labels: LabelSet) -> LabelSet:
        return LabelSet(label for label in labels.values() if self.keeps(label))


def reserved_pod_label(key: str) -> bool:
    return key.startswith(RESERVED_POD_LABEL_PREFIXES)


def check_pod_labels(labels: Mapping[str, str], field: str) -> None:
    """A pod's own labels must not claim a namespace label or a service account."""
    for key in labels:
        if reserved_pod_label(key):
            raise InvalidArgument(
                f"label {key!r}: keys under {' and '.join(RESERVED_POD_LABEL_PREFIXES)} are "
                "set from the pod's namespace and service account, a pod cannot carry them",
                field=f"{field}[{key!r}]",
            )


def pod_identity_labels(
    namespace: str,
    pod_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    service_account: str,
) -> list[str]:
    """The labels a pod's identity is allocated from, spelled as Cilium spells them. Pod labels
    under the reserved prefixes are left out (apply refuses them; whatever else creates pods
    cannot smuggle them in)."""
    labels = [
        f"{SOURCE_K8S}:{key}={value}"
        for key, value in pod_labels.items()
        if not reserved_pod_label(key)
    ]
    labels.append(f"{SOURCE_K8S}:{NAMESPACE_LABEL}={namespace}")
    labels.extend(
        f"{SOURCE_K8S}:{NAMESPACE_LABELS_PREFIX}{key}={value}"
        for key, value in namespace_labels.items()
    )
    if service_account:
        labels.append(f"{SOURCE_K8S}:{SERVICE_ACCOUNT_LABEL}={service_account}")
    return labels
