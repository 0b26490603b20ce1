"""Pods, namespaces and Deployments in the local cluster; the apply path of manifests.

``apply``/``delete`` are what ``membrane apply -f``/``membrane delete -f`` run: the one apply
path of ``shared.apply`` (which the Kubernetes bridge feeds too) plus what only the local
cluster does with pods and Deployments. The client plays kubelet and controller here: it picks
nodes and asks each node's agent (over its unix socket) to wire pods. What exists is read back
from the buckets the agents write, so there is no second source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import msgspec

from membrane.client import lb
from shared import agent_api, manifests, subjects
from shared import apply as apply_path
from shared.agent_api import AddEndpoint, EndpointRef
from shared.bus import Bus
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.manifests import DeploymentDoc, NamespaceDoc, PodDoc, RoutedDoc
from shared.messages import Endpoint, Node, NodeLiveness, PodRecord

AGENT_TIMEOUT = 30.0


async def nodes(bus: Bus) -> dict[str, Node]:
    kv = await bus.kv(subjects.KV_NODES)
    return {
        name: msgspec.json.decode(raw, type=Node) for name, raw in (await Bus.snapshot(kv)).items()
    }


async def liveness(bus: Bus) -> dict[str, NodeLiveness]:
    """node -> the failure detector's verdict; a node without one has not been judged yet
    (it joined a moment ago) and counts as alive."""
    kv = await bus.kv(subjects.KV_LIVENESS)
    found = {}
    for raw in (await Bus.snapshot(kv)).values():
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            verdict = msgspec.json.decode(raw, type=NodeLiveness)
            found[verdict.node] = verdict
    return found


async def endpoints(bus: Bus) -> list[Endpoint]:
    kv = await bus.kv(subjects.KV_ENDPOINTS)
    found = [msgspec.json.decode(raw, type=Endpoint) for raw in (await Bus.snapshot(kv)).values()]
    return sorted(found, key=lambda e: (e.namespace, e.name))


async def find_pod(bus: Bus, namespace: str, name: str) -> Endpoint:
    kv = await bus.kv(subjects.KV_ENDPOINTS)
    found = await Bus.snapshot(kv, subjects.pod_endpoint_keys(namespace, name))
    if not found:
        raise NotFound(f"pod {namespace}/{name} not found")
    return msgspec.json.decode(min(found.items())[1], type=Endpoint)


# the kinds a workload reference may name, in kubectl's spellings
POD_KINDS = frozenset({"pod", "pods", "po"})
DEPLOYMENT_KINDS = frozenset({"deploy", "deployment", "deployments"})
SERVICE_KINDS = frozenset({"svc", "service", "services"})


def parse_ref(text: str, namespace: str = "default") -> tuple[str, str, str]:
    """A workload reference -> (namespace, kind, name); kind is "" for a bare name.

    ``NAME``, ``NS/NAME``, ``KIND/NAME`` or ``NS/KIND/NAME``, KIND being ``pod``, ``deploy``
    or ``svc`` (kubectl's spellings): a first part that is a kind is one, else a namespace.
    """
    parts = text.split("/")
    if len(parts) == 3 or (
        len(parts) == 2 and parts[0] in POD_KINDS | DEPLOYMENT_KINDS | SERVICE_KINDS
    ):
        namespace, kind, name = parts if len(parts) == 3 else [namespace, *parts]
    elif len(parts) == 2:
        namespace, name = parts
        kind = ""
    elif len(parts) == 1:
        kind, name = "", parts[0]
    else:
        raise InvalidArgument(f"{text!r} is not [NS/][KIND/]NAME", field="workload")
    if kind and kind not in POD_KINDS | DEPLOYMENT_KINDS | SERVICE_KINDS:
        raise InvalidArgument(
            f"unknown kind {kind!r} in {text!r}: pod, deploy, svc", field="workload"
        )
    if not name or not namespace:
        raise InvalidArgument(f"{text!r} is not [NS/][KIND/]NAME", field="workload")
    return namespace, kind, name


async def resolve(bus: Bus, text: str, namespace: str = "default") -> list[Endpoint]:
    """The pods a workload reference names (see :func:`parse_ref`), at least one.

    A bare name is a pod, else the pods of the Deployment of that name (as ``kubectl exec``
    takes ``deploy/NAME``); ``svc/NAME`` is the pods behind the service's frontends.
    """
    namespace, kind, name = parse_ref(text, namespace)
    if not kind or kind in POD_KINDS:
        try:
            return [await find_pod(bus, namespace, name)]  # one read: the usual case
        except NotFound:
            if kind:
                raise
    everything = await endpoints(bus)
    pods = [e for e in everything if e.namespace == namespace]
    if not kind:
        found, what = _owned(pods, name), f"no pod or deployment {namespace}/{name}"
    elif kind in DEPLOYMENT_KINDS:
        found, what = _owned(pods, name), f"deployment {namespace}/{name} has no pods"
    else:
        service = await lb.get(bus, namespace, name)
        backends = {b.ip for f in service.frontends for b in f.backends if not b.terminating}
        found = [e for e in everything if e.ip in backends]
        what = f"service {namespace}/{name} has no pod behind it"
    if not found:
        raise NotFound(what, field="workload")
    return found


def _owned(pods: list[Endpoint], deployment: str) -> list[Endpoint]:
    return [e for e in pods if e.owner == f"Deployment/{deployment}"]


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
    deleted = await agent_api.call(
        agent_api.default_socket(endpoint.node),
        "endpoint.delete",
        EndpointRef(namespace=namespace, name=name),
        Endpoint,
        AGENT_TIMEOUT,
    )
    # labels given by `pod label` go with the pod (a pod created later under this name would be
    # identified by them); a record from the Kubernetes API (it has the pod's uid) is the
    # bridge's to delete
    kv = await bus.kv(subjects.KV_PODS)
    key = subjects.pod_key(namespace, name)
    raw = (await Bus.snapshot(kv, key)).get(key)
    if raw is not None and not msgspec.json.decode(raw, type=PodRecord).uid:
        await kv.delete(key)
    return deleted


async def label_pod(bus: Bus, namespace: str, name: str, labels: dict[str, str]) -> Endpoint:
    """Give a pod new labels the way the Kubernetes bridge does: its record in the ``pods``
    bucket, from which the node's agent re-identifies it (identity, ipcache, policy). Returns
    the endpoint once the agent has published it with these labels."""
    endpoint = await find_pod(bus, namespace, name)
    record = PodRecord(
        namespace=namespace,
        name=name,
        labels=dict(labels),
        service_account=endpoint.service_account,
        node=endpoint.node,
    )
    kv = await bus.kv(subjects.KV_PODS)
    await kv.put(subjects.pod_key(namespace, name), msgspec.json.encode(record))
    deadline = time.monotonic() + AGENT_TIMEOUT
    while endpoint.labels != labels:
        if time.monotonic() > deadline:
            raise Unavailable(
                f"pod {namespace}/{name}: node {endpoint.node} did not re-identify it "
                f"within {AGENT_TIMEOUT:.0f} s"
            )
        await asyncio.sleep(0.1)
        endpoint = await find_pod(bus, namespace, name)
    return endpoint


async def delete_namespace(bus: Bus, name: str) -> None:
    pods = [e for e in await endpoints(bus) if e.namespace == name]
    for endpoint in pods:
        await delete_pod(bus, endpoint.namespace, endpoint.name)
    await apply_path.delete_namespace_record(bus, name)


async def apply(
    bus: Bus,
    docs: Sequence[manifests.Document],
    source: str = "-",
    services_sent: apply_path.ServiceParts | None = None,
) -> list[str]:
    """Create or update what the documents describe; returns one line per change.

    ``shared.apply`` sends policies, services and namespaces; this adds the local cluster's
    kubelet and controller: pods that already exist are left as they are (pods are immutable
    in Kubernetes too), Deployments are scaled to their replica count.
    """

    async def pods_and_deployments() -> list[str]:
        lines: list[str] = []
        existing = {(e.namespace, e.name): e for e in await endpoints(bus)}
        known_nodes = await nodes(bus)
        for doc in docs:
            if isinstance(doc, PodDoc):
                if (doc.namespace, doc.name) in existing:
                    lines.append(f"pod/{doc.name} unchanged")
                    continue
                await create_pod(bus, doc)
                lines.append(f"pod/{doc.name} created")
            elif isinstance(doc, DeploymentDoc):
                lines.extend(await _scale(bus, doc, existing, known_nodes))
        return lines

    return await apply_path.apply_documents(
        bus, docs, source, pods_and_deployments, services_sent=services_sent
    )


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
        elif isinstance(doc, RoutedDoc):
            lines.extend(await apply_path.delete_routed(bus, doc))
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
