"""Requests to the lb service: Services and EndpointSlices applied, listed, deleted."""

from __future__ import annotations

from typing import Any

import msgspec

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    Empty,
    LBApplyReply,
    LBApplyRequest,
    LBCreateRequest,
    LBDeleteReply,
    LBListReply,
    LBService,
    LBServiceRef,
)

TIMEOUT = 60.0  # a bulk apply of tens of thousands of services takes seconds
# requests stay below NATS's max_payload (32 MB here): 20,000 Services with their
# EndpointSlices are about 10 MB of JSON, one request, checked and applied in one pass
CHUNK_BYTES = 24 << 20


def chunks(documents: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Documents split into requests of at most CHUNK_BYTES of JSON each."""
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for doc in documents:
        n = len(msgspec.json.encode(doc))
        if out[-1] and size + n > CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(doc)
        size += n
    return out


async def apply_documents(
    bus: Bus, documents: list[dict[str, Any]], source: str, *, dry_run: bool
) -> LBApplyReply:
    """One request per chunk; ``dry_run`` first (as ``membrane apply`` does) checks them all
    before any chunk is applied."""
    results: list[str] = []
    for chunk in chunks(documents):
        reply = await bus.request(
            subjects.LB_APPLY,
            LBApplyRequest(documents=chunk, source=source, dry_run=dry_run),
            LBApplyReply,
            timeout=TIMEOUT,
        )
        results.extend(reply.results)
    return LBApplyReply(results=results)


async def apply_all_or_nothing(
    bus: Bus, documents: list[dict[str, Any]], source: str
) -> LBApplyReply:
    """Apply, changing nothing on any invalid document.

    One request (the usual case) is validated completely by the service before it changes
    anything, so it needs no separate check; several requests are all checked with a dry run
    first, so that an error in the last cannot leave the first applied.
    """
    if len(chunks(documents)) > 1:
        await apply_documents(bus, documents, source, dry_run=True)
    return await apply_documents(bus, documents, source, dry_run=False)


async def create(bus: Bus, request: LBCreateRequest) -> LBService:
    return await bus.request(subjects.LB_CREATE, request, LBService, timeout=TIMEOUT)


async def list_services(bus: Bus) -> list[LBService]:
    return (await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=TIMEOUT)).services


async def get(bus: Bus, namespace: str, name: str) -> LBService:
    return await bus.request(
        subjects.LB_GET, LBServiceRef(name=name, namespace=namespace), LBService
    )


async def delete(bus: Bus, namespace: str, name: str, *, kind: str = "Service") -> list[str]:
    """Delete a Service (or, ``kind="EndpointSlice"``, a slice); the keys deleted."""
    subject = subjects.LB_DELETE if kind == "Service" else subjects.LB_DELETE_SLICE
    reply = await bus.request(subject, LBServiceRef(name=name, namespace=namespace), LBDeleteReply)
    return reply.deleted
