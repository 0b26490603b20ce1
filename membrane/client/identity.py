"""Requests to the identity service."""

from __future__ import annotations

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    Empty,
    GetRequest,
    Identity,
    ListReply,
    ReleaseReply,
    ReleaseRequest,
)


async def list_identities(bus: Bus) -> list[Identity]:
    return (await bus.request(subjects.IDENTITY_LIST, Empty(), ListReply)).identities


async def get(bus: Bus, number: int) -> Identity:
    return await bus.request(subjects.IDENTITY_GET, GetRequest(id=number), Identity)


async def allocate(bus: Bus, labels: list[str], owner: str) -> AllocateReply:
    return await bus.request(
        subjects.IDENTITY_ALLOCATE, AllocateRequest(labels=labels, owner=owner), AllocateReply
    )


async def release(bus: Bus, number: int, owner: str) -> ReleaseReply:
    return await bus.request(
        subjects.IDENTITY_RELEASE, ReleaseRequest(id=number, owner=owner), ReleaseReply
    )
