"""Recorded flows counted by connection kind (every monitor replica and the history stream), and
what the policy service makes of them (``membrane.policy.diff``).

Each replica counts its own ring (``membrane.monitor.groups.<replica>``), so 100,000 flows cross
the bus as the few hundred groups they make; the DROPPED/AUDIT history stream is read only for
the time before the rings begin (``until``), so no flow is counted twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from membrane.client import workloads
from shared import flow_groups, subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.flow_api import (
    FlowFilterTerm,
    FlowGroup,
    FlowGroupsReply,
    FlowQuery,
    PolicyDiffReply,
    PolicyDiffRequest,
)
from shared.messages import ContainerPort

TIMEOUT_S = 20.0
DIFF_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Recorded:
    groups: list[FlowGroup]
    flows: int


async def recorded_groups(
    bus: Bus, *, since: float, filters: list[FlowFilterTerm] | None = None
) -> Recorded:
    replicas = await bus.discover(subjects.MONITOR_SERVICE)
    if not replicas:
        raise Unavailable("no monitor replica answers (is the cluster up? `membrane status`)")
    query = FlowQuery(filters=filters or [], since=since)
    replies = list(
        await asyncio.gather(
            *(
                bus.request(
                    subjects.monitor_groups(info.id), query, FlowGroupsReply, timeout=TIMEOUT_S
                )
                for info in replicas
            )
        )
    )
    begins = max((r.oldest for r in replies if r.oldest), default=0.0)
    if not begins or since < begins:
        history = FlowQuery(filters=query.filters, since=since, until=begins)
        replies.append(
            await bus.request(
                subjects.MONITOR_HISTORY_GROUPS, history, FlowGroupsReply, timeout=TIMEOUT_S
            )
        )
    groups = flow_groups.merge(g for reply in replies for g in reply.groups)
    return Recorded(groups=groups, flows=sum(r.flows for r in replies))


async def container_ports(bus: Bus) -> dict[int, list[ContainerPort]]:
    """The container ports of each pod identity (its pods share them), for named ports."""
    found: dict[int, list[ContainerPort]] = {}
    for endpoint in await workloads.endpoints(bus):
        known = found.setdefault(endpoint.identity, [])
        known.extend(p for p in endpoint.ports if p not in known)
    return found


async def diff(
    bus: Bus, documents: list[dict[str, Any]], source: str, groups: list[FlowGroup]
) -> PolicyDiffReply:
    """The groups whose verdict ``documents`` would change, decided by the policy service."""
    request = PolicyDiffRequest(
        documents=documents, source=source, groups=groups, ports=await container_ports(bus)
    )
    return await bus.request(subjects.POLICY_DIFF, request, PolicyDiffReply, timeout=DIFF_TIMEOUT_S)
