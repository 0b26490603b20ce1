"""What the UI's JSON endpoints answer, from bus data: pure functions, no HTTP, no NATS.

- the service map: recorded flow groups (:mod:`shared.flow_groups`) as boxes (workloads) and
  edges (source -> destination, one per verdict, with counts and ports);
- flows for a clicked edge or box, as ``membrane observe -o json`` prints them;
- the filters of ``membrane observe`` from a query string (``verdict=DROPPED&to_port=80``, with
  ``not_`` in front of a field to negate it; ``from_workload``/``to_workload`` for an edge);
- the nodes view: the health matrix of ``membrane status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from shared import identities
from shared.flow_api import EnrichedFlow, FlowFilterTerm, FlowGroup
from shared.flow_filter import compile_filter
from shared.flow_groups import is_pod_identity, workload
from shared.messages import Node, NodeHealth

NEGATE = "not_"


def box_kind(identity: int) -> str:
    """pod, or the reserved identity's name (world, host, ...); CIDR identities are world."""
    if is_pod_identity(identity):
        return "pod"
    if identity >= identities.LOCAL_BASE:
        return "world"
    return identities.BY_ID.get(identity, "unknown")


def service_map(groups: Iterable[FlowGroup]) -> dict[str, Any]:
    boxes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    for g in groups:
        for name, number in ((g.source, g.src_identity), (g.destination, g.dst_identity)):
            boxes.setdefault(name, {"id": name, "kind": box_kind(number), "identities": []})
            if number not in boxes[name]["identities"]:
                boxes[name]["identities"].append(number)
        key = (g.source, g.destination, g.verdict)
        edge = edges.setdefault(
            key,
            {
                "source": g.source,
                "destination": g.destination,
                "verdict": g.verdict,
                "count": 0,
                "ports": [],
                "last": 0.0,
                "policy": "",
            },
        )
        edge["count"] += g.count
        port = f"{g.port}/{g.protocol}"
        if port not in edge["ports"]:
            edge["ports"].append(port)
        if g.last >= edge["last"]:
            edge["last"] = g.last
            edge["policy"] = g.policy or edge["policy"]
    return {
        "boxes": sorted(boxes.values(), key=lambda b: str(b["id"])),
        "edges": sorted(edges.values(), key=lambda e: (e["source"], e["destination"])),
    }


def filters(query: Mapping[str, str | Sequence[str]]) -> list[FlowFilterTerm]:
    """``observe``'s filter terms from a query string: ``to_pod=deathstar&not_verdict=DROPPED``
    (``not_`` negates; a repeated key matches either value)."""
    terms: list[FlowFilterTerm] = []
    for raw_key, raw in query.items():
        if raw_key in ("last", "since", "namespace_view"):
            continue
        negate = raw_key.startswith(NEGATE)
        key = raw_key[len(NEGATE) :] if negate else raw_key
        values = [raw] if isinstance(raw, str) else list(raw)
        terms.append(FlowFilterTerm(field=key, values=values, negate=negate))
    compile_filter(terms)  # a bad filter is an error naming it, before anything is asked
    return terms


def flow_rows(flows: Iterable[EnrichedFlow]) -> list[dict[str, Any]]:
    """Newest first, each as ``observe -o json`` prints it plus both workloads."""
    rows = []
    for flow in sorted(flows, key=lambda f: f.time, reverse=True):
        row: dict[str, Any] = msgspec.to_builtins(flow)
        row["source"]["workload"] = workload(flow.source)
        row["destination"]["workload"] = workload(flow.destination)
        rows.append(row)
    return rows


def health_matrix(nodes: Sequence[Node], reports: Sequence[NodeHealth]) -> dict[str, Any]:
    """From row to column: latency in ms, or unreachable; every pair of known nodes."""
    names = sorted(n.name for n in nodes)
    by_node = {r.node: r for r in reports}
    rows = []
    for name in names:
        report = by_node.get(name)
        peers = {p.node: p for p in report.peers} if report else {}
        cells = []
        for other in names:
            if other == name:
                cells.append({"to": other, "self": True})
                continue
            peer = peers.get(other)
            if peer is None:
                cells.append({"to": other, "state": "unknown"})
            elif not peer.reachable:
                cells.append({"to": other, "state": "unreachable", "failures": peer.failures})
            else:
                cells.append({"to": other, "state": "ok", "ms": peer.http_ms})
        rows.append({"from": name, "cells": cells, "reported": report.timestamp if report else 0})
    return {"nodes": names, "rows": rows}
