"""The nodes part of ``membrane status``: a node table and the node-to-node latency matrix.

Both come from the bus: the ``nodes`` bucket (membership), the ``liveness`` bucket (the failure
detector's verdicts, services/identity/nodes.py) and the ``health`` bucket
(each node's latest round of probes of every other node, see services/datapath/health.py).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from membrane import output
from membrane.client import workloads
from shared import subjects
from shared.bus import Bus
from shared.messages import Node, NodeHealth, NodeLiveness

UNREACHABLE = "UNREACHABLE"


class NodesView(msgspec.Struct):
    nodes: list[Node]
    health: list[NodeHealth]
    # node -> the failure detector's verdict; a node without one is alive (not judged yet)
    liveness: dict[str, NodeLiveness] = msgspec.field(default_factory=dict)

    def alive(self, node: str) -> bool:
        verdict = self.liveness.get(node)
        return verdict is None or verdict.alive


async def fetch(bus: Bus) -> NodesView:
    nodes: list[Node] = []
    health: list[NodeHealth] = []
    for bucket, kind, into in (
        (subjects.KV_NODES, Node, nodes),
        (subjects.KV_HEALTH, NodeHealth, health),
    ):
        kv = await bus.kv(bucket)
        for raw in (await Bus.snapshot(kv)).values():
            try:
                into.append(msgspec.json.decode(raw, type=kind))  # type: ignore[arg-type]
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue  # status shows what it can read
    nodes.sort(key=lambda n: n.name)
    health.sort(key=lambda h: h.node)
    return NodesView(nodes=nodes, health=health, liveness=await workloads.liveness(bus))


def as_json(view: NodesView, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "nodes": [{**msgspec.to_builtins(n), "alive": view.alive(n.name)} for n in view.nodes],
        "health": msgspec.to_builtins(view.health),
        "matrix": matrix(view),
    }


def matrix(view: NodesView) -> dict[str, dict[str, float | None]]:
    """from -> to -> HTTP round trip in ms, None where the probe got no answer."""
    return {
        report.node: {p.node: p.http_ms if p.reachable else None for p in report.peers}
        for report in view.health
    }


def render(view: NodesView, now: float | None = None) -> str:
    now = time.time() if now is None else now
    reports = {h.node: h for h in view.health}
    names = [n.name for n in view.nodes]
    rows = []
    for node in view.nodes:
        verdict = view.liveness.get(node.name)
        seen_by = [p.reachable for h in view.health for p in h.peers if p.node == node.name]
        rows.append(
            [
                node.name,
                "alive" if view.alive(node.name) else "DEAD",
                node.underlay_ip,
                node.pod_cidr,
                node.health_ip or "-",
                node.routing or "-",
                f"{now - verdict.since:.0f}s" if verdict else "-",
                f"{sum(seen_by)}/{len(seen_by)}" if seen_by else "-",
            ]
        )
    parts = [
        output.table(
            [
                "NODE",
                "STATUS",
                "UNDERLAY",
                "POD CIDR",
                "HEALTH IP",
                "ROUTING",
                "SINCE",
                "REACHABLE FROM",
            ],
            rows,
        )
    ]
    if names:
        cells = []
        for source in names:
            report = reports.get(source)
            # a node that stopped reporting: its last word is no longer news
            stale = report is not None and now - report.timestamp > 3 * report.interval
            by_peer = {p.node: p for p in report.peers} if report else {}
            row: list[Any] = [source]
            for target in names:
                probe = by_peer.get(target)
                if target == source:
                    row.append("-")
                elif stale:
                    row.append("stale")
                elif probe is None:
                    row.append("?")
                elif not probe.reachable:
                    row.append(UNREACHABLE)
                else:
                    row.append(f"{probe.http_ms:.2f}ms")
            cells.append(row)
        parts.append(
            "node-to-node latency (HTTP between health endpoints; from row to column):\n"
            + output.table(["FROM \\ TO", *names], cells)
        )
    return "\n\n".join(parts)
