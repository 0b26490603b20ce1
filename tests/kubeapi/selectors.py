"""Label and field selectors as the API server parses them (k8s.io/apimachinery/pkg/labels)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector the API server answers with 400 Bad Request."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return labels.get(self.key) in self.values
        # "!=" and "notin" also match objects without the key, as Kubernetes
        return labels.get(self.key) not in self.values


_SET = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_labels(text: str) -> list[Requirement]:
    if not text.strip():
        return []
    requirements: list[Requirement] = []
    for part in _split_top(text):
        eq = _EQ.match(part)
        if eq:
            op = "=" if eq.group(2) in ("=", "==") else "!="
            requirements.append(Requirement(eq.group(1), op, frozenset({eq.group(3)})))
            continue
        match = _SET.match(part)
        if not match or (match.group(1) and match.group(3)):
            raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
        negated, key, op, values = match.groups()
        if op:
            items = frozenset(v.strip() for v in values.split(",") if v.strip())
            requirements.append(Requirement(key, op, items))
        else:
            requirements.append(Requirement(key, "!" if negated else "exists"))
    return requirements


def _path(obj: Mapping[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


FieldMatcher = Callable[[Mapping[str, Any]], bool]


def parse_fields(text: str, allowed: frozenset[str]) -> FieldMatcher:
    """``key=value,key!=value`` over the fields the resource allows; others are a 400."""
    terms: list[tuple[str, bool, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            negate = True
        elif "==" in part:
            key, value = part.split("==", 1)
            negate = False
        elif "=" in part:
            key, value = part.split("=", 1)
            negate = False
        else:
            raise SelectorError(f"invalid selector: {part!r}; can't understand {part!r}")
        key = key.strip()
        if key not in allowed:
            raise SelectorError(f"field label not supported: {key}")
        terms.append((key, negate, value.strip()))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_path(obj, key) == value) != negate for key, negate, value in terms)

    return matches
