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

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from shared import kube_yaml, manifests, subjects
from shared.bus import Bus, send_pending
from shared.errors import InvalidArgument, NotFound
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
    part_digest,
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


# a text at least this large is read a piece at a time, its Services and EndpointSlices sent
# ahead (ServiceParts); the pieces: about 4,000 documents of bench/lb.py's bulk each
STREAM_MIN_CHARS = 2 << 20
PIECE_CHARS = 1 << 20


class ServiceParts:
    """The Services and EndpointSlices of a large file, sent ahead a part at a time while the
    file is read: the lb service checks each part (a dry run: nothing changes) while the next
    piece is read, and keeps its parse. :meth:`apply` then names every part by its digest
    (SHA-256) in one request, and the replica that checked them takes their parses; a replica
    that does not keep one of them (another replica checked it, or it restarted) changes
    nothing and says so, and the parts' bytes are sent in the same request again, checked
    there as any other. Nothing changes before that request, so a document found invalid
    anywhere in the file, by the CLI or by the lb service, still changes nothing."""

    def __init__(self, bus: Bus, source: str) -> None:
        self.bus = bus
        self.source = source
        self.parts: list[bytes] = []
        self.digests: list[str] = []
        self.counts: list[int] = []
        self.checks: list[asyncio.Future[LBApplyReply]] = []

    def send(self, documents: list[dict[str, Any]]) -> bool:
        """Check these documents (the next ones) in the background; whether there were any."""
        if not documents:
            return False
        part = msgspec.json.encode(documents)
        request = LBApplyRequest(
            documents=[],
            parts=[msgspec.Raw(part)],
            source=self.source,
            dry_run=True,
            first=1 + sum(self.counts),
        )
        self.parts.append(part)
        self.digests.append(part_digest(part))
        self.counts.append(len(documents))
        self.checks.append(
            asyncio.ensure_future(
                self.bus.request(subjects.LB_APPLY, request, LBApplyReply, timeout=LB_TIMEOUT)
            )
        )
        return True

    async def cancel(self) -> None:
        for check in self.checks:
            check.cancel()
        for check in self.checks:
            with contextlib.suppress(BaseException):
                await check

    async def apply(self) -> LBApplyReply:
        """Every part applied, once every check has passed (the first error in document order
        raises); in one request unless they are over CHUNK_BYTES together."""
        try:
            for check in self.checks:
                await check
        except BaseException:
            await self.cancel()
            raise
        results: list[str] = []
        first = 1
        for group in self._requests():
            try:  # the parts by their digests: the replica that checked them kept their parse
                reply = await self._apply(first, part_digests=[self.digests[i] for i in group])
            except NotFound as exc:  # another replica, or one restarted: nothing changed
                if exc.field != "part_digests":
                    raise
                reply = await self._apply(first, parts=[msgspec.Raw(self.parts[i]) for i in group])
            results.extend(reply.results)
            first += sum(self.counts[i] for i in group)
        return LBApplyReply(results=results)

    async def _apply(self, first: int, **parts: Any) -> LBApplyReply:
        """One applying request for some of the parts (``parts`` or ``part_digests``)."""
        request = LBApplyRequest(documents=[], source=self.source, first=first, **parts)
        return await self.bus.request(subjects.LB_APPLY, request, LBApplyReply, timeout=LB_TIMEOUT)

    def _requests(self) -> list[list[int]]:
        out: list[list[int]] = []
        size = 0
        for i, part in enumerate(self.parts):
            if not out or (out[-1] and size + len(part) > CHUNK_BYTES):
                out.append([])
                size = 0
            out[-1].append(i)
            size += len(part)
        return out


async def read_sending_services(
    bus: Bus, text: str, source: str
) -> tuple[list[manifests.Document], ServiceParts | None]:
    """:func:`shared.manifests.load` of a large ``text`` a piece at a time, its Services and
    EndpointSlices sent ahead as each piece is validated (:class:`ServiceParts`); raises what
    ``load`` raises. A piece that does not read as YAML (its error's line would be the
    piece's) has the whole text read as ``load`` reads it: its error, or its documents and
    ``None`` (nothing sent ahead)."""
    reader = manifests.Reader(source)
    sent = ServiceParts(bus, source)
    documents: list[manifests.Document] = []
    try:
        for piece in manifests.pieces(text, PIECE_CHARS):
            try:
                raws = kube_yaml.load_all(piece, source, manifests.ManifestError, bulk=True)
            except InvalidArgument:
                await sent.cancel()
                return manifests.load(text, source), None
            new = reader.feed(raws)
            documents.extend(new)
            if sent.send([d.body for d in _routed(new, manifests.SERVICE_LB)]):
                # on its way before the next piece is read: the request's task puts the part
                # in the client's buffer, which otherwise waits for the flusher task, a turn
                # of the loop that comes only after the next piece
                await asyncio.sleep(0)
                await send_pending(bus.nc)
    except BaseException:
        await sent.cancel()
        raise
    return documents, sent


def _routed(docs: Sequence[manifests.Document], service: str) -> list[RoutedDoc]:
    return [d for d in docs if isinstance(d, RoutedDoc) and d.service == service]


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
    services_sent: ServiceParts | None = None,
) -> list[str]:
    """Apply the documents; one line per change.

    Everything was validated by :func:`shared.manifests.load`; the services check their own
    documents before anything changes (a policy dry run, the lb service's all-or-nothing).
    ``workloads`` (the CLI's pods and Deployments) runs after the namespaces and before the
    policies are stored. Pods and Deployments are otherwise left alone here. With
    ``services_sent`` (:func:`read_sending_services`), the Services and EndpointSlices are
    those parts, not ``docs``'.
    """
    policies = [doc.body for doc in _routed(docs, manifests.SERVICE_POLICY)]
    services = [doc.body for doc in _routed(docs, manifests.SERVICE_LB)]
    try:
        if policies:  # the policy service validates them before anything here changes
            await apply_policies(bus, policies, source, audit=False, dry_run=True)
    except BaseException:
        if services_sent is not None:
            await services_sent.cancel()
        raise
    lb_lines: list[str] = []
    if services_sent is not None:  # checked while the file was read; applied all at once
        lb_lines = (await services_sent.apply()).results
    elif services:  # the lb service checks all of them before it changes anything
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
