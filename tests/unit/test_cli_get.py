"""``get``/``describe`` and the listings: selection, shapes and kubectl's selectors, on plain
data."""

from __future__ import annotations

import json

import pytest
import yaml

from membrane import cli_get, resources
from membrane.cli import build_parser
from membrane.cliutil import parse_selector
from shared.errors import InvalidArgument
from shared.messages import Endpoint, Identity


def pod(namespace: str, name: str, **labels: str) -> Endpoint:
    return Endpoint(
        namespace=namespace, name=name, node="n1", ip="10.0.0.1", identity=300, labels=labels
    )


PODS = [
    pod("default", "web-1", app="web"),
    pod("default", "db", app="db"),
    pod("prod", "web-2", app="web"),
]


def chosen(*argv: str) -> list[str]:
    args = build_parser(run_flags=False).parse_args(["pod", "list", *argv])
    return [f"{p.namespace}/{p.name}" for p in cli_get.select(resources.PODS, PODS, args)]


def test_lists_default_to_the_default_namespace() -> None:
    assert chosen() == ["default/web-1", "default/db"]
    assert chosen("-n", "prod") == ["prod/web-2"]
    assert chosen("-A") == ["default/web-1", "default/db", "prod/web-2"]
    assert chosen("-A", "-l", "app=web") == ["default/web-1", "prod/web-2"]
    assert chosen("-l", "app!=web") == ["default/db"]
    assert chosen("db", "web-1") == ["default/web-1", "default/db"]


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "db"}, False),
        ("app!=web", {}, True),
        ("app in (web,db),tier", {"app": "db", "tier": "x"}, True),
        ("app notin (web, db)", {"app": "db"}, False),
        ("!tier", {"app": "db"}, True),
        ("", {"app": "db"}, True),
    ],
)
def test_kubectl_selectors(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.parametrize("text", ["a b", "=x", "!"])
def test_bad_selectors(text: str) -> None:
    with pytest.raises(InvalidArgument, match="selector"):
        parse_selector(text)


def test_one_object_is_an_object_and_a_list_has_items() -> None:
    one = json.loads(cli_get.render(resources.PODS, PODS[:1], "json", one=True, everywhere=False))
    assert one["name"] == "web-1"
    many = yaml.safe_load(cli_get.render(resources.PODS, PODS, "yaml", one=False, everywhere=True))
    assert [p["name"] for p in many["items"]] == ["web-1", "db", "web-2"]
    empty = json.loads(cli_get.render(resources.PODS, [], "json", one=False, everywhere=False))
    assert empty == {"items": []}


def test_tables_wide_and_namespaces() -> None:
    table = cli_get.render(resources.PODS, PODS[:1], "table", one=False, everywhere=False)
    assert table.splitlines()[0].split() == ["NAME", "NODE", "IP", "IDENTITY", "LABELS"]
    wide = cli_get.render(resources.PODS, PODS[:1], "wide", one=False, everywhere=True)
    assert wide.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert "OWNER" in wide and "PORTS" in wide


def test_identity_labels_select_without_their_source() -> None:
    identity = Identity(id=300, labels=["k8s:app=web", "k8s:tier=front"], kind="cluster")
    assert resources.identity_labels(identity) == {"app": "web", "tier": "front"}


def test_kinds_by_kubectl_names() -> None:
    assert cli_get.kind_of("po") is resources.PODS and cli_get.kind_of("svc") is resources.SERVICES
    assert cli_get.kind_of("Nodes") is resources.NODES
    with pytest.raises(InvalidArgument, match="unknown kind"):
        cli_get.kind_of("jobs")


def test_describe_names_every_field() -> None:
    text = cli_get.describe(resources.PODS, PODS[0])
    assert text.splitlines()[0] == "Namespace:  default"
    assert "Name:  web-1" in text and "  ip: 10.0.0.1" in text
