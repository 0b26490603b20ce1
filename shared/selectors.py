"""Kubernetes label selectors: matchLabels plus matchExpressions (In, NotIn, Exists, DoesNotExist).

Keys may carry a Cilium source prefix (``k8s:app``, ``any:app``); both select the ``k8s:``
label ``app``, which is how Cilium reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidArgument
from shared.labels import validate_key, validate_value

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_SOURCE_PREFIXES = ("k8s:", "any:")


def _strip_source(key: str) -> str:
    for prefix in _SOURCE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed selector; the empty selector matches everything, as in Kubernetes."""

    requirements: tuple[Requirement, ...] = field(default=())

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def keys(self) -> frozenset[str]:
        return frozenset(req.key for req in self.requirements)

    @classmethod
    def parse(cls, doc: Any, path: str = "selector") -> LabelSelector:
        """Parse ``{matchLabels: {...}, matchExpressions: [...]}``; errors name the field."""
        if doc is None:
            return cls()
        if not isinstance(doc, Mapping):
            raise InvalidArgument("must be a mapping with matchLabels/matchExpressions", field=path)
        unknown = set(doc) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise InvalidArgument(f"unknown field(s) {', '.join(sorted(unknown))}", field=path)
        reqs: list[Requirement] = []
        match_labels = doc.get("matchLabels")
        if match_labels is None:
            match_labels = {}
        # a malformed value must not silently become the empty, match-everything selector
        if not isinstance(match_labels, Mapping):
            raise InvalidArgument("must be a mapping of key: value", field=f"{path}.matchLabels")
        for raw_key, value in match_labels.items():
            fpath = f"{path}.matchLabels[{raw_key!r}]"
            key = _strip_source(str(raw_key))
            validate_key(key, field=fpath)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InvalidArgument(
                    f"value must be a string, got {type(value).__name__} (quote it in YAML)",
                    field=fpath,
                )
            validate_value(value, field=fpath)
            reqs.append(Requirement(key, "In", frozenset([value])))
        expressions = doc.get("matchExpressions")
        if expressions is None:
            expressions = []
        if not isinstance(expressions, Sequence) or isinstance(expressions, str):
            raise InvalidArgument("must be a list", field=f"{path}.matchExpressions")
        for index, expr in enumerate(expressions):
            reqs.append(_parse_expression(expr, f"{path}.matchExpressions[{index}]"))
        return cls(tuple(sorted(reqs, key=lambda r: (r.key, r.operator, sorted(r.values)))))


def _parse_expression(expr: Any, path: str) -> Requirement:
    if not isinstance(expr, Mapping):
        raise InvalidArgument("must be a mapping with key, operator, values", field=path)
    unknown = set(expr) - {"key", "operator", "values"}
    if unknown:
        raise InvalidArgument(f"unknown field(s) {', '.join(sorted(unknown))}", field=path)
    key = expr.get("key")
    if not isinstance(key, str):
        raise InvalidArgument("key is required", field=f"{path}.key")
    key = _strip_source(key)
    validate_key(key, field=f"{path}.key")
    operator = expr.get("operator")
    if operator not in OPERATORS:
        raise InvalidArgument(
            f"operator {operator!r} is not one of {', '.join(OPERATORS)}", field=f"{path}.operator"
        )
    values = expr.get("values")
    if values is None:
        values = []
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise InvalidArgument("must be a list of strings", field=f"{path}.values")
    if operator in ("In", "NotIn") and not values:
        raise InvalidArgument(
            f"operator {operator} needs at least one value", field=f"{path}.values"
        )
    if operator in ("Exists", "DoesNotExist") and values:
        raise InvalidArgument(f"operator {operator} takes no values", field=f"{path}.values")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidArgument(
                f"value must be a string, got {type(value).__name__} (quote it in YAML)",
                field=f"{path}.values[{index}]",
            )
        validate_value(value, field=f"{path}.values[{index}]")
    return Requirement(key, operator, frozenset(values))
