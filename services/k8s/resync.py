"""What membrane holds from Kubernetes that the API server no longer has.

A reflector deletes what vanishes while it watches, or between two of its lists. Objects
deleted while no bridge ran are in no list at all: this compares what membrane holds (policies,
services from Kubernetes manifests, namespaces, pods) with the leader's first lists and deletes
the rest, through the same delete path. In a cluster the API server is the source of truth, so
a policy or Service applied by hand with ``membrane apply`` is deleted too (as Cilium's agent
does with state the API server does not know); API-driven services (``membrane service
create``) are not Kubernetes objects and stay.
"""

from __future__ import annotations

import contextlib

import msgspec

from shared import apply, log, subjects
from shared.bus import Bus
from shared.errors import NotFound
from shared.messages import Empty, LBListReply, PodRecord, PolicyListReply, PolicyRef

_POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


async def forget_vanished(bus: Bus, known: dict[str, set[str]]) -> int:
    """Delete what membrane holds of ``known``'s kinds but ``known`` lacks; the count."""
    logger = log.get("k8s")
    gone: list[str] = []
    listed = await bus.request(subjects.POLICY_LIST, Empty(), PolicyListReply, timeout=30)
    for summary in listed.policies:
        kind = summary.kind
        if kind in _POLICY_KINDS and kind in known:
            if _key(summary.namespace, summary.name) in known[kind]:
                continue
            ref = PolicyRef(kind=kind, namespace=summary.namespace, name=summary.name)
            gone.extend(await apply.delete_policies(bus, [ref]))
    if "Service" in known:
        services = await bus.request(subjects.LB_LIST, Empty(), LBListReply, timeout=60)
        for service in services.services:
            key = _key(service.namespace, service.name)
            if service.source == "kubernetes" and key not in known["Service"]:
                with contextlib.suppress(NotFound):  # deleted meanwhile
                    gone.extend(await apply.delete_service(bus, service.namespace, service.name))
    if "Namespace" in known:
        for name in await Bus.snapshot(await bus.kv(subjects.KV_NAMESPACES)):
            if name not in known["Namespace"]:
                await apply.delete_namespace_record(bus, name)
                gone.append(f"namespace/{name}")
    if "Pod" in known:
        kv = await bus.kv(subjects.KV_PODS)
        for key, raw in (await Bus.snapshot(kv)).items():
            record = msgspec.json.decode(raw, type=PodRecord)
            if _key(record.namespace, record.name) not in known["Pod"]:
                await kv.delete(key)
                gone.append(f"pod/{record.namespace}/{record.name}")
    if gone:
        logger.info("deleted what vanished while no bridge watched", objects=gone)
    return len(gone)
