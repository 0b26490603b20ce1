"""Recorded flows from every monitor replica and the history stream: as they are (``query``,
what ``membrane observe`` prints) or counted by connection kind (``recorded_groups``).

Each replica counts its own ring (``membrane.monitor.groups.<replica>``), so 100,000 flows cross
the bus as the few hundred groups they make; the DROPPED/AUDIT history stream is read only for
the time before the rings begin (``until``), so no flow is counted twice. Used by ``policy
diff``/``suggest`` (through ``membrane.client.recorded``) and by the UI's service map.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from shared import flow_groups, subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.flow_api import (
    EnrichedFlow,
    FlowFilterTerm,
    FlowGroup,
    FlowGroupsReply,
    FlowQuery,
    FlowQueryReply,
)

TIMEOUT_S = 20.0
QUERY_TIMEOUT_S = 10.0


def flow_key(flow: EnrichedFlow) -> tuple[Any, ...]:
    """What tells two copies of one flow (from a ring and from the history stream) apart."""
    s, d = flow.source, flow.destination
    return (flow.time, flow.node, flow.type, flow.observation_point, s.ip, s.port, d.ip, d.port)


async def query(bus: Bus, request: FlowQuery) -> list[EnrichedFlow]:
    """Every replica's matching flows, plus history when the rings fall short; oldest first."""
    replicas = await bus.discover(subjects.MONITOR_SERVICE)
    if not replicas:
        raise Unavailable("no monitor replica answers (is the cluster up? `membrane status`)")
    replies = await asyncio.gather(
        *(
            bus.request(
                subjects.monitor_query(info.id),
                request,
                FlowQueryReply,
                timeout=QUERY_TIMEOUT_S,
            )
            for info in replicas
        )
    )
    flows = [flow for reply in replies for flow in reply.flows]
    oldest = min((r.oldest for r in replies if r.oldest), default=0.0)
    short = (request.last and len(flows) < request.last) or not oldest
    if short or (request.since and request.since < oldest):
        history = await bus.request(
            subjects.MONITOR_HISTORY, request, FlowQueryReply, timeout=QUERY_TIMEOUT_S
        )
        flows.extend(history.flows)
    unique = {flow_key(flow): flow for flow in flows}
    ordered = sorted(unique.values(), key=lambda f: f.time)
    return ordered[-request.last :] if request.last else ordered


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
