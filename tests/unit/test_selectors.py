"""Kubernetes label selectors: matching semantics and field-precise parse errors."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import InvalidArgument
from shared.selectors import LabelSelector, Requirement

PATH = "spec.endpointSelector"

WEB = {"app": "web", "tier": "frontend"}
DB = {"app": "db", "tier": "backend", "pci": ""}
BARE: dict[str, str] = {}


def parse(doc: Any) -> LabelSelector:
    return LabelSelector.parse(doc, PATH)


def selected(doc: Any, *candidates: dict[str, str]) -> list[bool]:
    selector = parse(doc)
    return [selector.matches(labels) for labels in candidates]


# --- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [None, {}, {"matchLabels": {}}, {"matchExpressions": []}])
def test_empty_selector_matches_everything(doc: Any) -> None:
    selector = parse(doc)
    assert selector.is_empty
    assert selector.keys() == frozenset()
    assert selected(doc, WEB, DB, BARE) == [True, True, True]


def test_match_labels() -> None:
    assert selected({"matchLabels": {"app": "web"}}, WEB, DB, BARE) == [True, False, False]


def test_match_labels_are_anded() -> None:
    doc = {"matchLabels": {"app": "web", "tier": "backend"}}
    assert selected(doc, WEB, DB, {"app": "web", "tier": "backend"}) == [False, False, True]


def test_match_labels_empty_value_needs_the_key() -> None:
    for value in ("", None):
        assert selected({"matchLabels": {"pci": value}}, WEB, DB) == [False, True]


def test_match_labels_compares_exactly() -> None:
    doc = {"matchLabels": {"app": "web"}}
    assert selected(doc, {"app": "Web"}, {"app": "web2"}, {"App": "web"}) == [False] * 3


def test_in() -> None:
    doc = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}
    assert selected(doc, WEB, DB, {"app": "api"}, BARE) == [True, False, True, False]


def test_not_in_matches_when_the_key_is_absent() -> None:
    doc = {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web", "api"]}]}
    assert selected(doc, WEB, DB, {"app": "api"}, BARE) == [False, True, False, True]


def test_exists() -> None:
    doc = {"matchExpressions": [{"key": "pci", "operator": "Exists"}]}
    assert selected(doc, WEB, DB, BARE) == [False, True, False]


def test_does_not_exist() -> None:
    doc = {"matchExpressions": [{"key": "pci", "operator": "DoesNotExist"}]}
    assert selected(doc, WEB, DB, BARE) == [True, False, True]


def test_labels_and_expressions_are_anded() -> None:
    doc = {
        "matchLabels": {"tier": "backend"},
        "matchExpressions": [
            {"key": "app", "operator": "In", "values": ["db", "cache"]},
            {"key": "pci", "operator": "DoesNotExist"},
        ],
    }
    cache = {"app": "cache", "tier": "backend"}
    assert selected(doc, WEB, DB, cache, BARE) == [False, False, True, False]


def test_contradiction_matches_nothing() -> None:
    doc = {
        "matchExpressions": [
            {"key": "app", "operator": "Exists"},
            {"key": "app", "operator": "DoesNotExist"},
        ]
    }
    assert selected(doc, WEB, DB, BARE) == [False, False, False]


@pytest.mark.parametrize("prefix", ["k8s:", "any:"])
def test_source_prefixes_are_stripped(prefix: str) -> None:
    doc = {
        "matchLabels": {f"{prefix}app": "web"},
        "matchExpressions": [{"key": f"{prefix}tier", "operator": "Exists"}],
    }
    selector = parse(doc)
    assert selector.keys() == frozenset({"app", "tier"})
    plain = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [{"key": "tier", "operator": "Exists"}],
    }
    assert selector == parse(plain)
    assert [selector.matches(x) for x in (WEB, DB)] == [True, False]


def test_only_a_leading_prefix_is_stripped() -> None:
    selector = parse({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "prod"}})
    assert selector.keys() == frozenset({"io.kubernetes.pod.namespace"})
    with pytest.raises(InvalidArgument):
        parse({"matchLabels": {"reserved:host": ""}})


@pytest.mark.parametrize("value", [2, True, 1.5])
def test_matchlabel_values_must_be_strings_as_in_kubernetes(value: object) -> None:
    with pytest.raises(InvalidArgument, match="must be a string") as err:
        LabelSelector.parse({"matchLabels": {"version": value}}, "spec.podSelector")
    assert err.value.field == "spec.podSelector.matchLabels['version']"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"matchLabels": []}, "sel.matchLabels"),
        ({"matchLabels": ""}, "sel.matchLabels"),
        ({"matchExpressions": {}}, "sel.matchExpressions"),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "value": ["x"]}]},
            "sel.matchExpressions[0]",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": [True]}]},
            "sel.matchExpressions[0].values[0]",
        ),
    ],
)
def test_malformed_selectors_never_become_match_everything(doc: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        LabelSelector.parse(doc, "sel")
    assert err.value.field == field


def test_parse_is_order_independent() -> None:
    one = parse(
        {
            "matchLabels": {"b": "1", "a": "2"},
            "matchExpressions": [
                {"key": "c", "operator": "In", "values": ["x", "y"]},
                {"key": "a", "operator": "Exists"},
            ],
        }
    )
    two = parse(
        {
            "matchExpressions": [
                {"key": "a", "operator": "Exists"},
                {"key": "c", "operator": "In", "values": ["y", "x", "y"]},
            ],
            "matchLabels": {"a": "2", "b": "1"},
        }
    )
    assert one == two
    assert hash(one) == hash(two)
    assert one.keys() == frozenset({"a", "b", "c"})


def test_parsed_requirements() -> None:
    selector = parse(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev", "test"]}],
        }
    )
    assert selector.requirements == (
        Requirement("app", "In", frozenset({"web"})),
        Requirement("env", "NotIn", frozenset({"dev", "test"})),
    )


def test_default_path() -> None:
    with pytest.raises(InvalidArgument) as info:
        LabelSelector.parse({"matchLabels": {"app": "-"}})
    assert info.value.field == "selector.matchLabels['app']"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ("app=web", PATH, "must be a mapping"),
        (["app"], PATH, "must be a mapping"),
        ({"matchLabel": {"app": "web"}}, PATH, "unknown field(s) matchLabel"),
        ({"matchLabels": {}, "foo": 1, "bar": 2}, PATH, "unknown field(s) bar, foo"),
        ({"matchLabels": ["app"]}, f"{PATH}.matchLabels", "must be a mapping"),
        ({"matchLabels": "app=web"}, f"{PATH}.matchLabels", "must be a mapping"),
        ({"matchLabels": {"bad key": "x"}}, f"{PATH}.matchLabels['bad key']", "label key"),
        ({"matchLabels": {"app": "-web"}}, f"{PATH}.matchLabels['app']", "label value"),
        ({"matchLabels": {"k8s:app": "a" * 64}}, f"{PATH}.matchLabels['k8s:app']", "63"),
        ({"matchExpressions": "app"}, f"{PATH}.matchExpressions", "must be a list"),
        ({"matchExpressions": {"key": "a"}}, f"{PATH}.matchExpressions", "must be a list"),
        ({"matchExpressions": ["app"]}, f"{PATH}.matchExpressions[0]", "must be a mapping"),
        (
            {"matchExpressions": [{"operator": "Exists"}]},
            f"{PATH}.matchExpressions[0].key",
            "key is required",
        ),
        (
            {"matchExpressions": [{"key": 5, "operator": "Exists"}]},
            f"{PATH}.matchExpressions[0].key",
            "key is required",
        ),
        (
            {"matchExpressions": [{"key": "Bad Key", "operator": "Exists"}]},
            f"{PATH}.matchExpressions[0].key",
            "label key",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["x"]}]},
            f"{PATH}.matchExpressions[0].operator",
            "'Equals' is not one of In, NotIn, Exists, DoesNotExist",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "in", "values": ["x"]}]},
            f"{PATH}.matchExpressions[0].operator",
            "not one of",
        ),
        (
            {"matchExpressions": [{"key": "app"}]},
            f"{PATH}.matchExpressions[0].operator",
            "None is not one of",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In"}]},
            f"{PATH}.matchExpressions[0].values",
            "operator In needs at least one value",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]},
            f"{PATH}.matchExpressions[0].values",
            "operator NotIn needs at least one value",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
            f"{PATH}.matchExpressions[0].values",
            "operator Exists takes no values",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]},
            f"{PATH}.matchExpressions[0].values",
            "operator DoesNotExist takes no values",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": "web"}]},
            f"{PATH}.matchExpressions[0].values",
            "must be a list",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": {"web": 1}}]},
            f"{PATH}.matchExpressions[0].values",
            "must be a list",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", "no way"]}]},
            f"{PATH}.matchExpressions[0].values[1]",
            "label value",
        ),
        (
            {
                "matchExpressions": [
                    {"key": "app", "operator": "Exists"},
                    {"key": "tier", "operator": "Exist"},
                ]
            },
            f"{PATH}.matchExpressions[1].operator",
            "not one of",
        ),
    ],
)
def test_errors_name_the_field(doc: Any, field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(doc)
    assert info.value.field == field
    assert message in info.value.message
    assert str(info.value) == f"{field}: {info.value.message}"
