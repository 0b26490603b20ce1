"""shared.fqdn: Cilium's matchName/matchPattern semantics and validation."""

from __future__ import annotations

import pytest

from shared import fqdn
from shared.errors import InvalidArgument


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*.cdn.example.com", "a.cdn.example.com", True),
        ("*.cdn.example.com", "a-b_c.cdn.example.com", True),
        ("*.cdn.example.com", "cdn.example.com", False),  # the dot before it is literal
        ("*.cdn.example.com", "a.b.cdn.example.com", False),  # '*' never crosses a dot
        ("*.cdn.example.com", "acdn.example.com", False),
        ("api.*.com", "api.example.com", True),
        ("api.*.com", "api.x.y.com", False),
        ("a*b.io", "ab.io", True),
        ("a*b.io", "axxb.io", True),
        ("*", "anything.at.all", True),
        ("*", "x", True),
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "apixexample.com", False),  # '.' is no regex wildcard
    ],
)
def test_pattern(pattern: str, name: str, matches: bool) -> None:
    rule = fqdn.NameMatch(match_pattern=fqdn.check_pattern(pattern, "f"))
    assert rule.matches(fqdn.normalize(name)) is matches


def test_names_compare_lowercase_without_the_root_dot() -> None:
    rule = fqdn.parse({"matchName": "API.example.com."}, "f")
    assert rule == fqdn.NameMatch(match_name="api.example.com")
    assert rule.matches(fqdn.normalize("api.EXAMPLE.com."))
    assert not rule.matches("evil.example.org")
    assert fqdn.parse({"matchPattern": "*.IO"}, "f").matches("x.io")


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"matchName": "a b.io"}, "f.matchName", "is not a DNS name"),
        ({"matchName": "*.io"}, "f.matchName", "is not a DNS name"),
        ({"matchPattern": "a/b"}, "f.matchPattern", "is not a DNS name pattern"),
        ({"matchPattern": "a..b"}, "f.matchPattern", "is not a DNS name pattern"),
        ({"matchPattern": ""}, "f", "needs exactly one"),
        ({}, "f", "needs exactly one"),
        ({"matchName": "a.io", "matchPattern": "*"}, "f", "needs exactly one"),
        ({"matchName": 5}, "f.matchName", "must be a string"),
        ({"matchNames": "a.io"}, "f.matchNames", "unknown field"),
        ("a.io", "f", "must be a mapping"),
        ({"matchName": "x" * 64}, "f.matchName", "longer than 63"),
        ({"matchName": ("abcdefgh." * 30) + "io"}, "f.matchName", "longer than 253"),
    ],
)
def test_bad_input_names_the_field(raw: object, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        fqdn.parse(raw, "f")
    assert info.value.field == field
    assert reason in str(info.value)
