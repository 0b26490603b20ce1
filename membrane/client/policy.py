"""Requests to the policy service: list, get, explain.

Applying and deleting policies is ``shared.apply`` (the one apply path).
"""

from __future__ import annotations

from typing import Any

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    Empty,
    ExplainReply,
    ExplainRequest,
    PolicyDocument,
    PolicyListReply,
    PolicyRef,
    PolicySummary,
)

TIMEOUT = 30.0


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
