"""``membrane bpf <table>``: the node's maps as rows, named the way the CLI prints them.

Reads only: the typed map views of the loaded datapath, the agent's endpoints (to name the
pod behind an ifindex) and its policy sync (to name the rule behind an entry). Runs in a
worker thread, since a dump walks whole maps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Protocol

from services.datapath.conntrack import Conntrack
from services.datapath.lb_sync import LBSync
from services.datapath.loader import Datapath
from services.datapath.maps import decode_nat, percpu_sum
from services.datapath.policy_sync import PolicySync
from shared import subjects
from shared.agent_api import DumpReply, DumpRequest
from shared.errors import InvalidArgument, NotFound
from shared.messages import Endpoint, Node
from shared.reasons import reason_name


class Agent(Protocol):
    """What a dump reads of the agent (services/datapath/agent.py), which imports this."""

    node: Node
    datapath: Datapath
    endpoints: dict[str, Endpoint]
    policy: PolicySync
    conntrack: Conntrack
    lb: LBSync | None


def dump(agent: Agent, req: DumpRequest) -> DumpReply:
    rows: list[dict[str, Any]]
    if req.table == "endpoints":
        rows = _endpoints(agent)
    elif req.table == "ipcache":
        rows = [
            {"cidr": str(net), "identity": v.identity, "tunnel_endpoint": str(v.tunnel_endpoint)}
            for net, v in sorted(agent.datapath.ipcache.items())
        ]
    elif req.table == "policy":
        rows = _policy(agent, req)
    elif req.table == "ct":
        rows = [dataclasses.asdict(e) for e in agent.conntrack.entries()]
    elif req.table == "nat":
        rows = _nat(agent)
    elif req.table == "metrics":
        rows = _metrics(agent)
    elif req.table == "lb" and agent.lb is not None:
        rows = agent.lb.dump()
    else:
        raise InvalidArgument(
            f"unknown table {req.table!r}: endpoints, ipcache, policy, ct, nat, metrics or lb",
            field="table",
        )
    return DumpReply(table=req.table, node=agent.node.name, rows=rows)


def _nat(agent: Agent) -> list[dict[str, Any]]:
    """The forward records of the translation maps, answered and not yet."""
    d = agent.datapath
    now = time.monotonic_ns()
    rows = []
    for kind, answered, table in (
        ("service", True, d.lb_nat),
        ("service", False, d.lb_nat_new),
        ("nodeport", True, d.np_nat),
        ("nodeport", False, d.np_nat_new),
    ):
        for key, value in table.items():
            record = decode_nat(kind, answered, bytes(key), bytes(value), now)
            rows.append(dataclasses.asdict(record))
    return rows


def _endpoints(agent: Agent) -> list[dict[str, Any]]:
    by_ifindex: Mapping[int, Endpoint] = {e.host_ifindex: e for e in agent.endpoints.values()}
    rows = []
    for ifindex, info in sorted(agent.datapath.endpoints.items()):
        endpoint = by_ifindex.get(ifindex)
        rows.append(
            {
                "ifindex": ifindex,
                "pod": f"{endpoint.namespace}/{endpoint.name}" if endpoint else "",
                "ip": str(info.ip),
                "identity": info.identity,
                "ingress_enforced": bool(info.flags & 0x1),
                "egress_enforced": bool(info.flags & 0x2),
                "policy_failed": bool(info.flags & 0x4),
                "policy_pending": bool(info.flags & 0x20),
            }
        )
    return rows


def _policy(agent: Agent, req: DumpRequest) -> list[dict[str, Any]]:
    endpoint = agent.endpoints.get(subjects.pod_key(req.namespace or "default", req.pod))
    if endpoint is None:
        raise NotFound(f"no pod {req.namespace or 'default'}/{req.pod} on node {agent.node.name}")
    resolved = agent.policy.resolved.get(endpoint.identity)
    rules = resolved.rules if resolved else {}
    installed = agent.policy.installed.get(endpoint.host_ifindex, {})
    return [
        {
            "direction": "ingress" if key.direction == 1 else "egress",
            "identity": key.identity,
            "protocol": key.protocol,
            "port": key.port,
            "prefixlen": key.prefixlen,
            "action": "deny" if value.deny else "allow",
            "rule_id": value.rule_id,
            "rule": rules.get(value.rule_id, ""),
        }
        for key, value in sorted(installed.items())
    ]


def _metrics(agent: Agent) -> list[dict[str, Any]]:
    rows = []
    table = agent.datapath.metrics
    for index, values in table.items():
        packets, nbytes = percpu_sum(values, ("packets", "bytes"))
        if not packets:
            continue
        reason, direction = divmod(int(index.value), 4)
        rows.append(
            {
                "reason": reason,
                "reason_name": "Forwarded" if reason == 0 else reason_name(reason),
                "direction": "ingress" if direction == 1 else "egress",
                "packets": packets,
                "bytes": nbytes,
            }
        )
    rows.sort(key=lambda r: (r["reason"], r["direction"]))
    rows.append(
        {
            "reason": -1,
            "reason_name": "Lost events",
            "direction": "",
            "packets": agent.datapath.lost_event_count(),
            "bytes": 0,
        }
    )
    return rows
