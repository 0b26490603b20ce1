"""Pods, namespaces and Deployments in the local cluster; the apply path of manifests.

``apply``/``delete`` are what ``membrane apply -f``/``membrane delete -f`` run, and what any
other source of manifests (the Kubernetes bridge) feeds. The client plays kubelet and
controller here: it validates manifests, picks nodes, and asks each
node's agent (over its unix socket) to wire pods. What exists is read back from the buckets the
agents write, so there is no second source of truth.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import msgspec

from membrane import manifests
from membrane.client import lb, policy
from membrane.manifests import DeploymentDoc, NamespaceDoc, PodDoc, RoutedDoc
from shared import agent_api, subjects
from shared.agent_api import AddEndpoint, EndpointRef
from shared.bus import Bus
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.messages import Endpoint, NamespaceRecord, Node, PolicyRef

AGENT_TIMEOUT = 30.0


async def nodes(bus: Bus) -> dict[str, Node]:
    kv = await bus.kv(subjects.KV_NODES)
    return {
        name: msgspec.json.decode(raw, type=Node) for name, raw in (await Bus.snapshot(kv)).items()
    }


async def endpoints(bus: Bus) -> list[Endpoint]:
    kv = await bus.kv(subjects.KV_ENDPOINTS)
    found = [msgspec.json.decode(raw, type=Endpoint) for raw in (await Bus.snapshot(kv)).values()]
    return sorted(found, key=lambda e: (e.namespace, e.name))


async def find_pod(bus: Bus, namespace: str, name: str) -> Endpoint:
    kv = await bus.kv(subjects.KV_ENDPOINTS)
    try:
        entry = await kv.get(subjects.endpoint_key(namespace, name))
    except Exception:  # nats.js: KeyNotFoundError / KeyDeletedError
        entry = None
    if entry is None or entry.value is None:
        raise NotFound(f"pod {namespace}/{name} not found")
    return msgspec.json.decode(entry.value, type=Endpoint)


async def pick_node(bus: Bus, wanted: str, known: dict[str, Node] | None = None) -> str:
    """``wanted`` if it is a node; else the node with the fewest pods."""
    known = known if known is not None else await nodes(bus)
    if not known:
        raise Unavailable("no node has registered; is the cluster up (`membrane up`)?")
    if wanted:
        if wanted not in known:
            raise NotFound(f"no node {wanted!r}; nodes: {', '.join(sorted(known))}", field="node")
        return wanted
    load = Counter(e.node for e in await endpoints(bus))
    return min(sorted(known), key=lambda n: load[n])


async def create_pod(bus: Bus, pod: PodDoc, node: str = "") -> Endpoint:
    target = await pick_node(bus, node or pod.node_name)
    return await agent_api.call(
        agent_api.default_socket(target),
        "endpoint.add",
        AddEndpoint(
            namespace=pod.namespace,
            name=pod.name,
            labels=dict(pod.labels),
            service_account=pod.service_account,
            ports=list(pod.ports),
            owner=pod.owner,
        ),
        Endpoint,
        AGENT_TIMEOUT,
    )


async def delete_pod(bus: Bus, namespace: str, name: str) -> Endpoint:
    endpoint = await find_pod(bus, namespace, name)
    return await agent_api.call(
        agent_api.default_socket(endpoint.node),
        "endpoint.delete",
        EndpointRef(namespace=namespace, name=name),
        Endpoint,
        AGENT_TIMEOUT,
    )


async def put_namespace(bus: Bus, doc: NamespaceDoc) -> bool:
    """Store a namespace's labels; returns whether anything changed."""
    kv = await bus.kv(subjects.KV_NAMESPACES)
    record = NamespaceRecord(name=doc.name, labels=dict(doc.labels))
    try:
        entry = await kv.get(doc.name)
        if entry.value and msgspec.json.decode(entry.value, type=NamespaceRecord) == record:
            return False
    except Exception:  # not there yet
        pass
    await kv.put(doc.name, msgspec.json.encode(record))
    return True


async def delete_namespace(bus: Bus, name: str) -> None:
    pods = [e for e in await endpoints(bus) if e.namespace == name]
    for endpoint in pods:
        await delete_pod(bus, endpoint.namespace, endpoint.name)
    kv = await bus.kv(subjects.KV_NAMESPACES)
    await kv.delete(name)


async def apply(bus: Bus, docs: Sequence[manifests.Document], source: str = "-") -> list[str]:
    """Create or update what the documents describe; returns one line per change.

    Everything was validated before this runs; pods that already exist are left as they are
    (pods are immutable in Kubernetes too), Deployments are scaled to their replica count.
    """
    lines: list[str] = []
    existing = {(e.namespace, e.name): e for e in await endpoints(bus)}
    known_nodes = await nodes(bus)
    routed = [doc for doc in docs if isinstance(doc, RoutedDoc)]
    policies = [doc.body for doc in routed if doc.service == manifests.SERVICE_POLICY]
    services = [doc.body for doc in routed if doc.service == manifests.SERVICE_LB]
    if policies:  # the policy service validates them before anything here changes
        await policy.apply_documents(bus, policies, source, audit=False, dry_run=True)
    lb_lines: list[str] = []
    if services:  # the lb service checks all of them before it changes anything
        lb_lines = (await lb.apply_all_or_nothing(bus, services, source)).results
    for doc in docs:
        if isinstance(doc, NamespaceDoc):
            changed = await put_namespace(bus, doc)
            lines.append(f"namespace/{doc.name} {'configured' if changed else 'unchanged'}")
    for doc in docs:
        if isinstance(doc, PodDoc):
            if (doc.namespace, doc.name) in existing:
                lines.append(f"pod/{doc.name} unchanged")
                continue
            await create_pod(bus, doc)
            lines.append(f"pod/{doc.name} created")
        elif isinstance(doc, DeploymentDoc):
            lines.extend(await _scale(bus, doc, existing, known_nodes))
    lines.extend(lb_lines)
    if policies:
        reply = await policy.apply_documents(bus, policies, source, audit=False, dry_run=False)
        lines.extend(reply.results)
        lines.extend(f"note: {key} has L7 rules: {policy.L7_NOTE}" for key in reply.l7_at_l4)
    return lines


async def _scale(
    bus: Bus,
    doc: DeploymentDoc,
    existing: dict[tuple[str, str], Endpoint],
    known_nodes: dict[str, Node],
) -> list[str]:
    wanted = manifests.expand_deployment(doc, sorted(known_nodes))
    owner = f"Deployment/{doc.name}"
    wanted_names = {pod.name for pod in wanted}
    created = removed = 0
    for pod in wanted:
        if (pod.namespace, pod.name) not in existing:
            await create_pod(bus, pod)
            created += 1
    for (namespace, name), endpoint in existing.items():
        if namespace == doc.namespace and endpoint.owner == owner and name not in wanted_names:
            await delete_pod(bus, namespace, name)
            removed += 1
    state = "unchanged" if not (created or removed) else f"{created} created, {removed} deleted"
    return [f"deployment/{doc.name} {state} ({len(wanted)} replicas)"]


async def delete(bus: Bus, docs: Sequence[manifests.Document], source: str = "-") -> list[str]:
    lines: list[str] = []
    existing = await endpoints(bus)
    for doc in docs:
        if isinstance(doc, PodDoc):
            try:
                await delete_pod(bus, doc.namespace, doc.name)
                lines.append(f"pod/{doc.name} deleted")
            except NotFound:
                lines.append(f"pod/{doc.name} not found")
        elif isinstance(doc, DeploymentDoc):
            owner = f"Deployment/{doc.name}"
            pods = [e for e in existing if e.namespace == doc.namespace and e.owner == owner]
            for endpoint in pods:
                await delete_pod(bus, endpoint.namespace, endpoint.name)
            lines.append(f"deployment/{doc.name} deleted ({len(pods)} pods)")
        elif isinstance(doc, RoutedDoc) and doc.service == "policy":
            ref = PolicyRef(kind=doc.kind, namespace=doc.namespace, name=doc.name)
            lines.extend(f"{key} deleted" for key in await policy.delete(bus, [ref]))
        elif isinstance(doc, RoutedDoc):
            try:
                deleted = await lb.delete(bus, doc.namespace, doc.name, kind=doc.kind)
                lines.extend(f"{doc.kind.lower()}/{key} deleted" for key in deleted)
            except NotFound:
                lines.append(f"{doc.kind.lower()}/{doc.name} not found")
    for doc in docs:
        if isinstance(doc, NamespaceDoc):
            await delete_namespace(bus, doc.name)
            lines.append(f"namespace/{doc.name} deleted")
    return lines


def exec_in_pod(endpoint: Endpoint, command: Sequence[str]) -> None:
    """Replace this process with ``command`` inside the pod's network namespace."""
    if not command:
        raise InvalidArgument("give a command after --", field="command")
    if not endpoint.netns or not Path(endpoint.netns).exists():
        raise Unavailable(f"the network namespace of {endpoint.namespace}/{endpoint.name} is gone")
    os.execvp("nsenter", ["nsenter", f"--net={endpoint.netns}", "--", *command])
