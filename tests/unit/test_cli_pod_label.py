"""``membrane pod label``'s arguments, kubectl's form: ``KEY=VALUE``, ``KEY-``, ``--overwrite``."""

from __future__ import annotations

import pytest

from membrane.cli import build_parser
from membrane.cli_pod_label import parse_changes, relabel
from shared.errors import InvalidArgument


def test_the_command_line_reads_as_kubectl_label() -> None:
    args = build_parser().parse_args(
        ["pod", "label", "web", "-n", "prod", "tier=front", "old-", "--overwrite"]
    )
    assert (args.name, args.namespace, args.overwrite) == ("web", "prod", True)
    assert parse_changes(args.labels) == ({"tier": "front"}, ["old"])
    args = build_parser().parse_args(["pod", "label", "web", "app=web"])
    assert (args.namespace, args.overwrite) == ("default", False)


def test_set_remove_and_empty_values() -> None:
    assert parse_changes(["a=1", "b=", "example.com/c-", "d-"]) == (
        {"a": "1", "b": ""},
        ["example.com/c", "d"],
    )


@pytest.mark.parametrize(
    ("tokens", "field", "reason"),
    [
        (["app"], "labels[0]", "neither KEY=VALUE nor KEY-"),
        (["-"], "labels[0]", "neither KEY=VALUE nor KEY-"),
        (["a=1", "a=2"], "labels[1]", "given twice"),
        (["a=1", "a-"], "labels", "both set and removed"),
        (["=x"], "labels[0]", "must not be empty"),
        (["a=has space"], "labels[0]", ""),
        (["bad key=1"], "labels[0]", ""),
    ],
)
def test_bad_arguments_name_the_field(tokens: list[str], field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_changes(tokens)
    assert raised.value.field == field
    assert reason in str(raised.value)


@pytest.mark.parametrize(
    "key", ["io.kubernetes.pod.namespace", "io.cilium.k8s.namespace.labels.team"]
)
def test_platform_reserved_labels_are_refused_as_apply_refuses_them(key: str) -> None:
    with pytest.raises(InvalidArgument, match="a pod cannot carry them") as raised:
        parse_changes(["app=web", f"{key}=x"])
    assert raised.value.field == f"labels[{key!r}]"


def test_a_label_with_a_value_changes_only_with_overwrite() -> None:
    current = {"app": "web", "tier": "front"}
    with pytest.raises(InvalidArgument, match="already has a value \\(web\\)") as raised:
        relabel(current, {"app": "api"}, [], overwrite=False)
    assert raised.value.field == "labels['app']"
    with pytest.raises(InvalidArgument, match="--overwrite is false"):
        relabel(current, {"app": "web"}, [], overwrite=False)  # kubectl: even the same value
    assert relabel(current, {"app": "api"}, [], overwrite=True) == (
        {"app": "api", "tier": "front"},
        [],
    )
    assert current == {"app": "web", "tier": "front"}  # not changed in place


def test_new_labels_and_removals_need_no_overwrite() -> None:
    labels, missing = relabel(
        {"app": "web", "tier": "front"}, {"new": "1"}, ["tier", "gone"], False
    )
    assert labels == {"app": "web", "new": "1"}
    assert missing == ["gone"]  # reported, not an error (kubectl: label "gone" not found)
