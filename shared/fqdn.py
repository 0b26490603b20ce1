"""DNS names in policy: ``toFQDNs`` selectors and ``rules.dns`` (``matchName``/``matchPattern``).

Cilium's semantics (pkg/fqdn/matchpattern): names compare lowercase and without the trailing
dot; in a pattern ``*`` stands for any run of the characters a label may hold
(``[-a-zA-Z0-9_]``), never crossing a dot, so ``*.example.com`` matches ``a.example.com`` but
neither ``example.com`` nor ``a.b.example.com``; a lone ``*`` matches every name. The policy
service (toFQDNs peers), the DNS proxy (which queries it forwards) and the parser (which
rejects a bad name at ``policy apply``) all use this one module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from shared import doc_fields
from shared.errors import InvalidArgument

MAX_NAME = 253
MAX_LABEL = 63
# Cilium's allowed characters (api.FQDNMatchNameRegexString / FQDNMatchPatternRegexString)
_NAME = re.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")
_PATTERN = re.compile(r"^([-a-zA-Z0-9_*]+[.]?)+$")
_LABEL_CHARS = "[-a-zA-Z0-9_]"


def normalize(name: str) -> str:
    """Lowercase, without the trailing dot: the form names are compared and stored in."""
    return name.lower().rstrip(".")


def _check_length(value: str, field: str) -> None:
    if len(value.rstrip(".")) > MAX_NAME:
        raise InvalidArgument(f"longer than {MAX_NAME} characters", field=field)
    for label in value.rstrip(".").split("."):
        if len(label) > MAX_LABEL:
            raise InvalidArgument(f"label {label!r} is longer than {MAX_LABEL}", field=field)


def check_name(value: str, field: str) -> str:
    """A ``matchName``: a DNS name (letters, digits, '-', '_', dots); returns it normalized."""
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS name: letters, digits, '-' and '_' in dot-separated labels",
            field=field,
        )
    _check_length(value, field)
    return normalize(value)


def check_pattern(value: str, field: str) -> str:
    """A ``matchPattern``: a name in which ``*`` stands for part of a label; normalized."""
    if value != "*" and not _PATTERN.match(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS name pattern: letters, digits, '-', '_' and '*' in "
            "dot-separated labels ('*' never crosses a dot; a lone '*' matches every name)",
            field=field,
        )
    _check_length(value, field)
    return normalize(value)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a normalized pattern, over normalized names."""
    if pattern == "*":
        return re.compile(r"[^\n]*")
    parts = (re.escape(piece) for piece in pattern.split("*"))
    return re.compile(f"{_LABEL_CHARS}*".join(parts))


@dataclass(frozen=True)
class NameMatch:
    """One ``matchName`` or ``matchPattern`` (exactly one is set), normalized."""

    match_name: str = ""
    match_pattern: str = ""

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return pattern_regex(self.match_pattern)

    def matches(self, name: str) -> bool:
        """``name`` normalized (:func:`normalize`)."""
        if self.match_name:
            return name == self.match_name
        return self._regex.fullmatch(name) is not None

    @property
    def matches_all(self) -> bool:
        return self.match_pattern == "*"

    def __str__(self) -> str:
        return self.match_name or self.match_pattern

    def to_dict(self) -> dict[str, str]:
        if self.match_name:
            return {"matchName": self.match_name}
        return {"matchPattern": self.match_pattern}


def parse(raw: object, field: str) -> NameMatch:
    """A ``{matchName: ...}`` or ``{matchPattern: ...}`` mapping, checked."""
    if not isinstance(raw, Mapping):
        raise InvalidArgument("must be a mapping with matchName or matchPattern", field=field)
    unknown = sorted(set(raw) - {"matchName", "matchPattern"})
    if unknown:
        raise InvalidArgument("unknown field", field=f"{field}.{unknown[0]}")
    given = [key for key in ("matchName", "matchPattern") if raw.get(key)]
    if len(given) != 1:
        raise InvalidArgument("needs exactly one of matchName and matchPattern", field=field)
    key = given[0]
    value = raw[key]
    if not isinstance(value, str):
        raise InvalidArgument(
            f"must be a string, got {doc_fields.typed(value)}", field=f"{field}.{key}"
        )
    if key == "matchName":
        return NameMatch(match_name=check_name(value, f"{field}.{key}"))
    return NameMatch(match_pattern=check_pattern(value, f"{field}.{key}"))


def any_matches(rules: list[NameMatch], name: str) -> NameMatch | None:
    """The first rule matching ``name`` (normalized), or None."""
    for rule in rules:
        if rule.matches(name):
            return rule
    return None
