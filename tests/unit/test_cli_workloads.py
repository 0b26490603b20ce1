"""Workload references and ``policy explain``'s naming, on plain data."""

from __future__ import annotations

import pytest

from membrane.cli_policy import explain_lines
from membrane.client.workloads import parse_ref
from shared.errors import InvalidArgument
from shared.messages import Endpoint, ExplainReply


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api", ("default", "", "api")),
        ("prod/api", ("prod", "", "api")),
        ("deploy/api", ("default", "deploy", "api")),
        ("svc/api", ("default", "svc", "api")),
        ("pod/api-1", ("default", "pod", "api-1")),
        ("prod/deployment/api", ("prod", "deployment", "api")),
    ],
)
def test_workload_references(text: str, expected: tuple[str, str, str]) -> None:
    assert parse_ref(text) == expected


def test_the_namespace_flag_is_the_default() -> None:
    assert parse_ref("deploy/api", "prod") == ("prod", "deploy", "api")
    assert parse_ref("other/api", "prod") == ("other", "", "api")


@pytest.mark.parametrize("text", ["", "a/b/c/d", "prod/job/x", "deploy/"])
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_ref(text)


def pod(name: str, identity: int, owner: str = "", **labels: str) -> Endpoint:
    return Endpoint(
        namespace="default", name=name, node="n1", ip="10.0.0.1", identity=identity,
        labels=labels, owner=owner,
    )  # fmt: skip


def test_explain_names_workloads_and_labels() -> None:
    src = pod("tiefighter", 300, org="empire")
    dst = pod("deathstar-abc", 301, "Deployment/deathstar", org="empire", app="ds")
    reply = ExplainReply(
        allowed=False,
        lines=["identity 300 -> identity 301 on 80/TCP: DROPPED", "  ingress of identity 301"],
    )
    lines = explain_lines(src, dst, reply)
    assert lines[0] == "from default/tiefighter: identity 300, labels org=empire"
    assert lines[1] == (
        "to   default/deathstar-abc (deploy/deathstar): identity 301, labels app=ds,org=empire"
    )
    assert lines[2] == (
        "identity 300 (tiefighter) -> identity 301 (deploy/deathstar) on 80/TCP: DROPPED"
    )
    assert lines[3] == "  ingress of identity 301 (deploy/deathstar)"
