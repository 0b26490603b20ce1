"""docs/asyncapi.yaml is what the msgspec types say, and holds together as a document."""

from __future__ import annotations

from typing import Any

import yaml

from membrane import asyncapi
from shared import subjects


def test_the_committed_document_matches_the_types() -> None:
    committed = asyncapi.DOCUMENT.read_text()
    assert committed == asyncapi.render(), (
        "docs/asyncapi.yaml is out of date: run `python -m membrane.asyncapi`"
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves_and_every_public_subject_is_a_channel() -> None:
    document = yaml.safe_load(asyncapi.DOCUMENT.read_text())
    assert document["asyncapi"].startswith("3.")
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, ref
            node = node[part]
    addresses = [c["address"] or "" for c in document["channels"].values()]
    for prefix in (
        subjects.EVENTS_FLOWS_PREFIX,
        subjects.EVENTS_FLOW_BATCHES_PREFIX,
        subjects.FLOWS_PREFIX,
        subjects.MONITOR_QUERY_PREFIX,
        subjects.MONITOR_STATUS_PREFIX,
        subjects.MONITOR_HISTORY,
    ):
        assert any(a.startswith(prefix) for a in addresses), prefix
    flow = document["components"]["schemas"]["EnrichedFlow"]
    assert {"source", "destination", "policy", "drop_reason_desc"} <= set(flow["properties"])
