"""Requests to the lb service: API-driven services created, services listed and read.

Applying and deleting Services and EndpointSlices is ``shared.apply`` (the one apply path).
"""

from __future__ import annotations

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    Empty,
    LBCreateRequest,
    LBListReply,
    LBService,
    LBServiceRef,
)

TIMEOUT = 60.0  # a bulk apply of tens of thousands of services takes seconds


async def create(bus: Bus, request: LBCreateRequest) -> LBService:
    return await bus.request(subjects.LB_CREATE, request, LBService, timeout=TIMEOUT)


async def list_services(bus: Bus) -> list[LBService]:
    return (await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=TIMEOUT)).services


async def get(bus: Bus, namespace: str, name: str) -> LBService:
    return await bus.request(
        subjects.LB_GET, LBServiceRef(name=name, namespace=namespace), LBService
    )
