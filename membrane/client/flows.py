"""Requests to the monitor: flow history from every replica's ring and the history stream."""

from __future__ import annotations

import asyncio
from typing import Any

from shared import subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.flow_api import EnrichedFlow, FlowQuery, FlowQueryReply

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
