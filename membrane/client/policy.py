"""Requests to the policy service: apply, delete, list, get, explain."""

from __future__ import annotations

from typing import Any

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    Empty,
    ExplainReply,
    ExplainRequest,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyDeleteReply,
    PolicyDocument,
    PolicyListReply,
    PolicyRef,
    PolicySummary,
)

TIMEOUT = 30.0

# the datapath never allows an L7 port at L4 (shared/proxy.py)
L7_NOTE = "connections to those ports are dropped unless the node's L7 proxy takes them"


async def apply_documents(
    bus: Bus, documents: list[dict[str, Any]], source: str, *, audit: bool, dry_run: bool
) -> PolicyApplyReply:
    return await bus.request(
        subjects.POLICY_APPLY,
        PolicyApplyRequest(documents=documents, source=source, audit=audit, dry_run=dry_run),
        PolicyApplyReply,
        timeout=TIMEOUT,
    )


def refs_of(documents: list[dict[str, Any]]) -> list[PolicyRef]:
    """The policies that documents name (for a delete by file)."""
    refs = []
    for doc in documents:
        metadata = doc.get("metadata") or {}
        clusterwide = doc.get("kind") == "CiliumClusterwideNetworkPolicy"
        refs.append(
            PolicyRef(
                kind=str(doc.get("kind", "")),
                namespace="" if clusterwide else str(metadata.get("namespace") or "default"),
                name=str(metadata.get("name", "")),
            )
        )
    return refs


async def delete(bus: Bus, refs: list[PolicyRef]) -> list[str]:
    """Delete each policy; the keys deleted."""
    deleted: list[str] = []
    for ref in refs:
        reply = await bus.request(subjects.POLICY_DELETE, ref, PolicyDeleteReply)
        deleted.extend(reply.deleted)
    return deleted


async def list_policies(bus: Bus, timeout: float = 5.0) -> list[PolicySummary]:
    reply = await bus.request(subjects.POLICY_LIST, Empty(), PolicyListReply, timeout=timeout)
    return reply.policies


async def get(bus: Bus, namespace: str, name: str) -> dict[str, Any]:
    """The policy as applied (its document)."""
    reply = await bus.request(
        subjects.POLICY_GET, PolicyRef(name=name, namespace=namespace), PolicyDocument
    )
    return reply.document


async def explain(bus: Bus, request: ExplainRequest) -> ExplainReply:
    return await bus.request(subjects.POLICY_EXPLAIN, request, ExplainReply)
