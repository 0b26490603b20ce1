"""Cilium's HTTP rule fields (``toPorts[].rules.http[]``), compiled and matched.

Used twice: the policy service compiles every rule at ``policy apply`` (a rule that does not
compile is an error naming its field, and nothing of the document is applied), and the L7 proxy
matches each request against the compiled rules. The semantics are Cilium's (Envoy's):

- ``method``, ``path``, ``host``: extended regular expressions matched against the whole
  method, request target (path with its query) and Host header, anchored at both ends;
- ``headers``: each ``"Name"`` must be present, each ``"Name: value"`` present with that value;
- ``headerMatches``: ``{name, value}`` must be present with that value (an empty value: present);
  with ``mismatch: LOG`` a mismatch is allowed and reported. ``ADD``/``DELETE``/``REPLACE``
  (header rewriting) and ``secret`` (values from Kubernetes secrets) are refused at apply.

An empty rule matches every request. A request is allowed when any rule matches it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgument

# a rule's text is user input that every request is matched against: keep it bounded
MAX_PATTERN = 1024


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lower case
    value: str | None  # None: only present
    log_only: bool = False  # mismatch: LOG


@dataclass(frozen=True)
class HttpRule:
    method: re.Pattern[str] | None = None
    path: re.Pattern[str] | None = None
    host: re.Pattern[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()

    def matches(self, method: str, target: str, headers: Mapping[str, str]) -> tuple[bool, bool]:
        """(allowed, a LOG-only header mismatch happened); ``headers`` keys are lower case."""
        if self.method is not None and not self.method.fullmatch(method):
            return False, False
        if self.path is not None and not self.path.fullmatch(target):
            return False, False
        if self.host is not None and not self.host.fullmatch(headers.get("host", "")):
            return False, False
        logged = False
        for match in self.headers:
            have = headers.get(match.name)
            ok = have is not None and (match.value is None or have == match.value)
            if not ok:
                if not match.log_only:
                    return False, False
                logged = True
        return True, logged


def _regex(raw: Any, field: str) -> re.Pattern[str] | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidArgument(f"must be a string, got {type(raw).__name__}", field=field)
    if len(raw) > MAX_PATTERN:
        raise InvalidArgument(f"is longer than {MAX_PATTERN} characters", field=field)
    try:
        return re.compile(raw)
    except re.error as exc:
        raise InvalidArgument(f"is not a valid regular expression: {exc}", field=field) from None


def _header(raw: Any, field: str) -> HeaderMatch:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidArgument("must be a header name, or 'Name: value'", field=field)
    name, sep, value = raw.partition(":")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise InvalidArgument(f"has no valid header name: {raw!r}", field=field)
    return HeaderMatch(name.lower(), value.strip() if sep else None)


def _header_match(raw: Mapping[str, Any], field: str) -> HeaderMatch:
    if raw.get("secret") is not None:
        raise InvalidArgument(
            "header values from secrets are not supported", field=f"{field}.secret"
        )
    action = raw.get("mismatch")
    if action not in (None, "", "LOG"):
        raise InvalidArgument(
            f"mismatch {action} (header rewriting) is not supported: use LOG or leave it out",
            field=f"{field}.mismatch",
        )
    name = str(raw.get("name") or "").strip()
    if not name or any(c.isspace() for c in name):
        raise InvalidArgument("must be a header name", field=f"{field}.name")
    value = raw.get("value")
    return HeaderMatch(name.lower(), str(value) if value else None, log_only=action == "LOG")


def compile_rule(raw: Mapping[str, Any], field: str) -> HttpRule:
    """One ``rules.http[]`` entry; InvalidArgument names the field that does not compile."""
    headers = [_header(h, f"{field}.headers[{i}]") for i, h in enumerate(raw.get("headers") or [])]
    headers += [
        _header_match(m, f"{field}.headerMatches[{i}]")
        for i, m in enumerate(raw.get("headerMatches") or [])
    ]
    return HttpRule(
        method=_regex(raw.get("method"), f"{field}.method"),
        path=_regex(raw.get("path"), f"{field}.path"),
        host=_regex(raw.get("host"), f"{field}.host"),
        headers=tuple(headers),
    )


def compile_rules(raw: Sequence[Mapping[str, Any]], field: str) -> tuple[HttpRule, ...]:
    return tuple(compile_rule(rule, f"{field}[{i}]") for i, rule in enumerate(raw))
