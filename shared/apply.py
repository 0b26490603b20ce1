"""The one path of manifests into membrane: ``membrane apply -f`` and the Kubernetes bridge.

Documents read by :mod:`shared.manifests` go out here: policies to the policy service, Services
and EndpointSlices to the lb service, namespace labels to the ``namespaces`` bucket. The CLI's
``membrane.client.workloads`` adds what only the local cluster does (creating pods,
scaling Deployments: the kubelet's and the controllers' work); the k8s bridge, whose pods the
kubelet wires, adds pod records. Both call :func:`apply_documents` and :func:`delete_routed`,
so a manifest means the same whichever way it came. (It lives in ``shared`` because services
may not import the CLI.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from shared import manifests, subjects
from shared.bus import Bus
from shared.errors import NotFound
from shared.manifests import NamespaceDoc, RoutedDoc
from shared.messages import (
    LBApplyReply,
    LBApplyRequest,
    LBDeleteReply,
    LBServiceRef,
    NamespaceRecord,
    PolicyApplyReply,
    PolicyApplyRequest,
    PolicyDeleteReply,
    PolicyRef,
)

POLICY_TIMEOUT = 30.0
LB_TIMEOUT = 60.0  # a bulk apply of tens of thousands of services takes seconds
# requests stay below NATS's max_payload (32 MB here): 20,000 Services with their
# EndpointSlices are about 10 MB of JSON, one request, checked and applied in one pass
CHUNK_BYTES = 24 << 20

# the datapath never allows an L7 port at L4 (shared/proxy.py)
L7_NOTE = (
    "HTTP, gRPC and Kafka requests and DNS queries on those ports are checked by the node's"
    " proxy (docs/l7.md)"
)


# --- policies ---------------------------------------------------------------------------------


async def apply_policies(
    bus: Bus, documents: list[dict[str, Any]], source: str, *, audit: bool, dry_run: bool
) -> PolicyApplyReply:
    return await bus.request(
        subjects.POLICY_APPLY,
        PolicyApplyRequest(documents=documents, source=source, audit=audit, dry_run=dry_run),
        PolicyApplyReply,
        timeout=POLICY_TIMEOUT,
    )


async def delete_policies(bus: Bus, refs: list[PolicyRef]) -> list[str]:
    """Delete each policy; the keys deleted."""
    deleted: list[str] = []
    for ref in refs:
        reply = await bus.request(subjects.POLICY_DELETE, ref, PolicyDeleteReply)
        deleted.extend(reply.deleted)
    return deleted


# --- services ---------------------------------------------------------------------------------


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


async def apply_services(
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
            timeout=LB_TIMEOUT,
        )
        results.extend(reply.results)
    return LBApplyReply(results=results)


async def apply_services_all_or_nothing(
    bus: Bus, documents: list[dict[str, Any]], source: str
) -> LBApplyReply:
    """Apply, changing nothing on any invalid document.

    One request (the usual case) is validated completely by the service before it changes
    anything, so it needs no separate check; several requests are all checked with a dry run
    first, so that an error in the last cannot leave the first applied.
    """
    if len(chunks(documents)) > 1:
        await apply_services(bus, documents, source, dry_run=True)
    return await apply_services(bus, documents, source, dry_run=False)


async def delete_service(
    bus: Bus, namespace: str, name: str, *, kind: str = "Service"
) -> list[str]:
    """Delete a Service (or, ``kind="EndpointSlice"``, a slice); the keys deleted."""
    subject = subjects.LB_DELETE if kind == "Service" else subjects.LB_DELETE_SLICE
    reply = await bus.request(subject, LBServiceRef(name=name, namespace=namespace), LBDeleteReply)
    return reply.deleted


# --- namespaces -------------------------------------------------------------------------------


async def put_namespace(bus: Bus, doc: NamespaceDoc) -> str:
    """Store a namespace's labels; returns kubectl's word for it: created, configured or
    unchanged."""
    kv = await bus.kv(subjects.KV_NAMESPACES)
    record = NamespaceRecord(name=doc.name, labels=dict(doc.labels))
    state = "created"
    try:
        entry = await kv.get(doc.name)
        if entry.value:
            if msgspec.json.decode(entry.value, type=NamespaceRecord) == record:
                return "unchanged"
            state = "configured"
    except Exception:  # not there yet
        pass
    await kv.put(doc.name, msgspec.json.encode(record))
    return state


async def delete_namespace_record(bus: Bus, name: str) -> None:
    """Forget a namespace's labels (its pods are whoever made them to delete)."""
    kv = await bus.kv(subjects.KV_NAMESPACES)
    await kv.delete(name)


# --- documents --------------------------------------------------------------------------------


async def apply_documents(
    bus: Bus,
    docs: Sequence[manifests.Document],
    source: str,
    workloads: Callable[[], Awaitable[list[str]]] | None = None,
) -> list[str]:
    """Apply the documents; one line per change.

    Everything was validated by :func:`shared.manifests.load`; the services check their own
    documents before anything changes (a policy dry run, the lb service's all-or-nothing).
    ``workloads`` (the CLI's pods and Deployments) runs after the namespaces and before the
    policies are stored. Pods and Deployments are otherwise left alone here.
    """
    routed = [doc for doc in docs if isinstance(doc, RoutedDoc)]
    policies = [doc.body for doc in routed if doc.service == manifests.SERVICE_POLICY]
    services = [doc.body for doc in routed if doc.service == manifests.SERVICE_LB]
    if policies:  # the policy service validates them before anything here changes
        await apply_policies(bus, policies, source, audit=False, dry_run=True)
    lb_lines: list[str] = []
    if services:  # the lb service checks all of them before it changes anything
        lb_lines = (await apply_services_all_or_nothing(bus, services, source)).results
    lines: list[str] = []
    for doc in docs:
        if isinstance(doc, NamespaceDoc):
            lines.append(f"namespace/{doc.name} {await put_namespace(bus, doc)}")
    if workloads is not None:
        lines.extend(await workloads())
    lines.extend(lb_lines)
    if policies:
        reply = await apply_policies(bus, policies, source, audit=False, dry_run=False)
        lines.extend(reply.results)
        lines.extend(f"note: {key} has L7 rules: {L7_NOTE}" for key in reply.l7_at_l4)
    return lines


async def delete_routed(bus: Bus, doc: RoutedDoc) -> list[str]:
    """Delete a policy, Service or EndpointSlice; one line per key (or "not found")."""
    if doc.service == manifests.SERVICE_POLICY:
        ref = PolicyRef(kind=doc.kind, namespace=doc.namespace, name=doc.name)
        return [f"{key} deleted" for key in await delete_policies(bus, [ref])]
    try:
        deleted = await delete_service(bus, doc.namespace, doc.name, kind=doc.kind)
    except NotFound:
        return [f"{doc.kind.lower()}/{doc.name} not found"]
    return [f"{doc.kind.lower()}/{key} deleted" for key in deleted]
