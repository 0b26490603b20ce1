"""Recorded flows counted by connection kind (:mod:`shared.recorded_flows`, which the UI service
uses too), the pods' container ports, and what the policy service makes of the flows
(``membrane.policy.diff``).
"""

from __future__ import annotations

from typing import Any

from membrane.client import workloads
from shared import subjects
from shared.bus import Bus
from shared.flow_api import (
    FlowGroup,
    PolicyDiffReply,
    PolicyDiffRequest,
)
from shared.messages import ContainerPort
from shared.recorded_flows import Recorded as Recorded
from shared.recorded_flows import recorded_groups as recorded_groups

DIFF_TIMEOUT_S = 60.0


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
