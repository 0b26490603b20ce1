"""The endpoint lifecycle of one node: pods wired, adopted, re-identified and removed.

An endpoint is a veth into a pod's namespace, an address from the node's IPAM, an identity
from the identity service, its map entries and programs, and its records in the ``endpoints``
and ``ipcache`` buckets. Operations (from the CNI plugin or the CLI, over the local socket) are
serialised by one lock: they are rare and each touches the kernel, the identity service and
three buckets. A failure part-way undoes exactly what was made (``_forget``).

The agent (agent.py) holds one of these beside its KV-to-map watches, and shares with it the
node's map views, policy and ipcache sync and conntrack.
"""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from services.datapath.conntrack import Conntrack
from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.loader import Datapath
from services.datapath.local_ipam import NodeIPAM
from services.datapath.maps import EndpointInfo, IPCacheValue, LxcInfo
from services.datapath.policy_sync import LocalEndpoint, PolicySync
from shared import log, netns, subjects
from shared.agent_api import AddEndpoint, EndpointRef
from shared.bus import Bus, KVEvent
from shared.errors import AlreadyExists, InvalidArgument, MembraneError, NotFound
from shared.labels import pod_identity_labels
from shared.messages import (
    AllocateReply,
    AllocateRequest,
    Endpoint,
    IPCacheEntry,
    NamespaceRecord,
    Node,
    PodRecord,
    ReleaseReply,
    ReleaseRequest,
)
from shared.names import validate_dns_label, validate_dns_subdomain

METADATA_NAME_LABEL = "kubernetes.io/metadata.name"

ENDPOINTS = Gauge("membrane_datapath_endpoints", "Endpoints wired on this node")
# how long an endpoint add (or a re-identification) waits for its identity's resolved policy:
# the endpoint drops new connections until it is in (pending); past the bound the call returns
# and the endpoint goes on denying until it arrives
POLICY_WAIT_S = 10.0
POLICY_WAIT = Histogram(
    "membrane_datapath_endpoint_policy_wait_seconds",
    "From an endpoint wired (or given a new identity) to its identity's resolved policy installed",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BAD_MESSAGES = Counter(
    "membrane_datapath_bad_messages_total",
    "KV entries that did not decode (a bad resolved policy denies its identity)",
    ["bucket"],
)


class EndpointLifecycle:
    """The node's endpoints, by ``subjects.pod_key``, and the operations on them."""

    def __init__(
        self,
        bus: Bus,
        node: Node,
        datapath: Datapath,
        *,
        ipam: NodeIPAM,
        policy: PolicySync,
        ipcache: IPCacheSync,
        conntrack: Conntrack,
        endpoints_kv: KeyValue,
        ipcache_kv: KeyValue,
        namespaces_kv: KeyValue,
        identity_lease: float,
        pod_netns_prefix: str,
    ) -> None:
        self.bus = bus
        self.node = node
        self.datapath = datapath
        self.ipam = ipam
        self.policy = policy
        self.ipcache = ipcache
        self.conntrack = conntrack
        self.endpoints_kv = endpoints_kv
        self.ipcache_kv = ipcache_kv
        self.namespaces_kv = namespaces_kv
        self.identity_lease = identity_lease
        self.pod_netns_prefix = pod_netns_prefix
        self.router = IPv4Address(node.router_ip)
        self.endpoints: dict[str, Endpoint] = {}  # by subjects.pod_key
        self.lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.namespace_labels: dict[str, dict[str, str]] = {}  # as last seen in the bucket
        # pods as the Kubernetes API has them (``pods`` bucket): their labels win over the CNI
        # call's, which kubelet cannot fill
        self.pod_records: dict[str, PodRecord] = {}
        self.log = log.get("datapath.agent", node=node.name)  # the name operators grep for

    async def adopt(self) -> None:
        """Take over the endpoints of this node recorded in the bucket whose veth still exists;
        forget the rest. Runs after the resolved and ipcache snapshots are in."""
        adopted_entries = self.policy.adopt()
        stored = await Bus.snapshot(self.endpoints_kv, subjects.node_keys(self.node.name))
        for key, raw in stored.items():
            try:
                endpoint = msgspec.json.decode(raw, type=Endpoint)
            except msgspec.ValidationError:
                BAD_MESSAGES.labels(subjects.KV_ENDPOINTS).inc()
                continue
            if endpoint.node != self.node.name:
                continue
            ifindex = await asyncio.to_thread(netns.link_index, endpoint.host_ifname)
            if ifindex is None:
                self.log.info("endpoint vanished while no agent ran; removing", endpoint=key)
                # its namespace, if this node made it, holds a dead veth end: it goes too, so
                # that the pod can be created again (the node itself died and came back)
                owned = endpoint.netns.startswith(f"{netns.NETNS_DIR}/{self.pod_netns_prefix}")
                await self._forget(endpoint, delete_netns=owned)
                continue
            if ifindex != endpoint.host_ifindex or not endpoint.host_mac:
                host_mac = await asyncio.to_thread(netns.link_mac, endpoint.host_ifname)
                endpoint = msgspec.structs.replace(
                    endpoint, host_ifindex=ifindex, host_mac=host_mac or ""
                )
            self.ipam.claim(IPv4Address(endpoint.ip))
            await self._install(endpoint)
        known = {e.host_ifindex for e in self.endpoints.values()}
        for ifindex in [i for i in self.datapath.endpoints if i not in known]:
            self.datapath.endpoints.pop(ifindex, None)
        local = {IPv4Address(e.ip) for e in self.endpoints.values()}
        for address in [a for a in self.datapath.lxc if a not in local]:
            self.datapath.lxc.pop(address, None)
        strays = self.policy.forget_strays()
        stale_addresses = self.ipcache.prune()
        ENDPOINTS.set(len(self.endpoints))
        self.log.info(
            "adopted node state",
            endpoints=len(self.endpoints),
            policy_entries=adopted_entries,
            stray_endpoints=strays,
            stale_ipcache_entries=stale_addresses,
            maps_reused=self.datapath.adopted,
        )

    async def _install(self, endpoint: Endpoint) -> None:
        """Map entries and programs for a wired endpoint (idempotent)."""
        ifindex = endpoint.host_ifindex
        current = self.datapath.endpoints.get(ifindex)
        flags = current.flags if current else 0
        info = EndpointInfo(endpoint.identity, IPv4Address(endpoint.ip), flags)
        if current != info:
            self.datapath.endpoints[ifindex] = info
        self.policy.upsert_endpoint(
            LocalEndpoint(ifindex, endpoint.identity, tuple(endpoint.ports))
        )
        await asyncio.to_thread(self.datapath.attach, ifindex)
        # only now, with to_container attached, may packets be delivered straight to the veth
        lxc = LxcInfo(ifindex, endpoint.mac, endpoint.host_mac)
        if self.datapath.lxc.get(IPv4Address(endpoint.ip)) != lxc:
            self.datapath.lxc[IPv4Address(endpoint.ip)] = lxc
        self.ipcache.set_local(
            IPv4Network(f"{endpoint.ip}/32"),
            IPCacheValue(endpoint.identity, IPv4Address(self.node.underlay_ip)),
        )
        self.endpoints[subjects.pod_key(endpoint.namespace, endpoint.name)] = endpoint

    async def add_endpoint(self, req: AddEndpoint) -> Endpoint:
        validate_dns_label(req.namespace, "namespace")
        validate_dns_subdomain(req.name, "name")
        key = subjects.pod_key(req.namespace, req.name)
        async with self.lock:
            existing = self.endpoints.get(key)
            if existing is not None:
                if req.container_id and existing.container_id == req.container_id:
                    return existing  # a CNI ADD retried by the runtime
                raise AlreadyExists(
                    f"pod {req.namespace}/{req.name} already exists on node {self.node.name}",
                    field="name",
                )
            elsewhere = await self._stored_endpoint(req.namespace, req.name)
            if elsewhere is not None:
                raise AlreadyExists(
                    f"pod {req.namespace}/{req.name} already exists on node {elsewhere.node}",
                    field="name",
                )
            return await self._create(req)

    async def _allocate_identity(
        self, namespace: str, name: str, labels: dict[str, str], service_account: str
    ) -> int:
        namespace_labels = await self._namespace_labels(namespace)
        reply = await self.bus.request(
            subjects.for_node(subjects.IDENTITY_ALLOCATE, self.node.name),
            AllocateRequest(
                labels=pod_identity_labels(namespace, labels, namespace_labels, service_account),
                owner=self.node.name,
                lease_seconds=self.identity_lease,
                request_id=f"{self.node.name}/{namespace}/{name}/{time.time_ns()}",
            ),
            AllocateReply,
        )
        return reply.identity.id

    async def reclaim_identities(self) -> None:
        """Take every local pod's identity reference again (after the lease lapsed). A pod
        whose labels now map to another number moves to it: maps, policy, ipcache, bucket."""
        async with self.lock:
            for endpoint in list(self.endpoints.values()):
                await self._reidentify(endpoint, release_old=False)

    async def relabel_namespace(self, namespace: str) -> None:
        """A namespace's labels changed: its pods' identities follow (they include them)."""
        async with self.lock:
            for endpoint in list(self.endpoints.values()):
                if endpoint.namespace == namespace:
                    await self._reidentify(endpoint, release_old=True)

    async def _reidentify(
        self, endpoint: Endpoint, *, release_old: bool, publish: bool = False
    ) -> None:
        """Allocate the endpoint's identity again; move it if the number changed (``publish``:
        write the endpoint out even if not, its labels being new)."""
        identity = await self._allocate_identity(
            endpoint.namespace, endpoint.name, endpoint.labels, endpoint.service_account
        )
        if identity == endpoint.identity:
            if release_old:  # the allocation above took a second reference to it
                await self._release_identity(endpoint.identity, f"{endpoint.name}/same")
            if publish:
                self.endpoints[subjects.pod_key(endpoint.namespace, endpoint.name)] = endpoint
                await self._publish(endpoint)
            return
        self.log.info(
            "pod identity changed",
            endpoint=f"{endpoint.namespace}/{endpoint.name}",
            old=endpoint.identity,
            new=identity,
        )
        moved = msgspec.structs.replace(endpoint, identity=identity)
        await self._install(moved)
        await self._publish(moved)
        await self._policy_in_force(moved)
        if release_old:
            await self._release_identity(endpoint.identity, f"{endpoint.name}/{identity}")

    def on_namespace(self, event: KVEvent) -> None:
        """Namespace labels feed identities: when they change, re-identify that namespace's
        local pods. The first sight of a namespace (the snapshot, or one just created) only
        records its labels."""
        labels: dict[str, str] | None = None
        if event.value is not None:
            try:
                labels = msgspec.json.decode(event.value, type=NamespaceRecord).labels
            except (msgspec.ValidationError, msgspec.DecodeError):
                BAD_MESSAGES.labels(subjects.KV_NAMESPACES).inc()
                return
        previous = self.namespace_labels.get(event.key)
        if labels is None:
            self.namespace_labels.pop(event.key, None)
            return
        self.namespace_labels[event.key] = labels
        in_use = any(e.namespace == event.key for e in self.endpoints.values())
        if previous is None and in_use:  # its pods were identified before it was declared
            previous = implicit_namespace_labels(event.key)
        if previous is None or previous == labels:
            return
        if in_use:
            task = asyncio.create_task(self.relabel_namespace(event.key))
            self._background.add(task)
            task.add_done_callback(self._relabel_done)

    def on_pod(self, event: KVEvent) -> None:
        """A pod's labels from the API: a local endpoint whose labels differ is re-identified
        (the CNI ADD may have come before the bridge wrote the pod)."""
        if event.value is None:
            self.pod_records.pop(event.key, None)
            return
        try:
            record = msgspec.json.decode(event.value, type=PodRecord)
        except (msgspec.ValidationError, msgspec.DecodeError):
            BAD_MESSAGES.labels(subjects.KV_PODS).inc()
            return
        self.pod_records[event.key] = record
        endpoint = self.endpoints.get(event.key)
        if endpoint is None or (endpoint.labels, endpoint.service_account) == (
            record.labels,
            record.service_account,
        ):
            return
        task = asyncio.create_task(self.relabel_pod(event.key, record))
        self._background.add(task)
        task.add_done_callback(self._relabel_done)

    async def relabel_pod(self, key: str, record: PodRecord) -> None:
        async with self.lock:
            endpoint = self.endpoints.get(key)
            if endpoint is None:
                return
            relabelled = msgspec.structs.replace(
                endpoint, labels=dict(record.labels), service_account=record.service_account
            )
            await self._reidentify(relabelled, release_old=True, publish=True)

    def _relabel_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("re-identifying pods failed", error=str(task.exception()))

    async def _publish(self, endpoint: Endpoint) -> None:
        """The endpoint's ipcache and endpoints entries on the bus."""
        await self.ipcache_kv.put(
            subjects.ipcache_key(IPv4Address(endpoint.ip), self.node.name),
            msgspec.json.encode(
                IPCacheEntry(
                    cidr=f"{endpoint.ip}/32",
                    identity=endpoint.identity,
                    node=self.node.name,
                    host_ip=self.node.underlay_ip,
                )
            ),
        )
        await self.endpoints_kv.put(
            subjects.endpoint_key(self.node.name, endpoint.namespace, endpoint.name),
            msgspec.json.encode(endpoint),
        )

    async def _create(self, req: AddEndpoint) -> Endpoint:
        record = self.pod_records.get(subjects.pod_key(req.namespace, req.name))
        if record is not None:
            req = msgspec.structs.replace(
                req, labels=dict(record.labels), service_account=record.service_account
            )
        identity = await self._allocate_identity(
            req.namespace, req.name, req.labels, req.service_account
        )
        created_netns = not req.netns
        # what exists so far, so that a failure undoes exactly that
        endpoint = Endpoint(
            namespace=req.namespace,
            name=req.name,
            node=self.node.name,
            ip="",
            identity=identity,
            labels=dict(req.labels),
            service_account=req.service_account,
            ports=list(req.ports),
            ifname=req.ifname,
            container_id=req.container_id,
            owner=req.owner,
            created=time.time(),
        )
        try:
            ip = self.ipam.allocate()
            endpoint = msgspec.structs.replace(endpoint, ip=str(ip))
            pod_netns = await asyncio.to_thread(
                netns.ensure_netns if created_netns else netns.resolve_netns,
                f"{self.pod_netns_prefix}{req.namespace}_{req.name}"
                if created_netns
                else req.netns,
            )
            host_ifname = netns.host_ifname_for(f"{req.namespace}/{req.name}")
            endpoint = msgspec.structs.replace(
                endpoint, netns=str(pod_netns), host_ifname=host_ifname
            )
            wired = await asyncio.to_thread(
                netns.wire_endpoint, pod_netns, req.ifname, host_ifname, ip, self.router
            )
            endpoint = msgspec.structs.replace(
                endpoint,
                host_ifindex=wired.host_ifindex,
                mac=wired.pod_mac,
                host_mac=wired.host_mac,
            )
            await self._install(endpoint)
            await self._publish(endpoint)
            waited = await self._policy_in_force(endpoint)
        except BaseException:
            # nothing half-made stays behind: not the veth, not the address, not the identity
            await self._forget(endpoint, delete_netns=created_netns)
            raise
        ENDPOINTS.set(len(self.endpoints))
        self.log.info(
            "endpoint created",
            endpoint=f"{req.namespace}/{req.name}",
            ip=str(ip),
            identity=identity,
            ifindex=endpoint.host_ifindex,
            policy_wait_ms=round(waited * 1000, 1),
        )
        return endpoint

    async def _policy_in_force(self, endpoint: Endpoint) -> float:
        """Wait (at most POLICY_WAIT_S) until the endpoint's identity has its resolved policy,
        so that the caller -- the CNI ADD, a relabel -- returns with it enforced rather than
        with an endpoint that still drops (pending). Returns the seconds waited."""
        started = time.monotonic()
        while not self.policy.has_policy(endpoint.identity):
            if time.monotonic() - started > POLICY_WAIT_S:
                self.log.warning(
                    "no resolved policy yet; the endpoint drops new connections until it arrives",
                    endpoint=f"{endpoint.namespace}/{endpoint.name}",
                    identity=endpoint.identity,
                )
                break
            await asyncio.sleep(0.002)
        waited = time.monotonic() - started
        POLICY_WAIT.observe(waited)
        return waited

    async def delete_endpoint(self, ref: EndpointRef) -> Endpoint:
        async with self.lock:
            endpoint = self._find(ref)
            if endpoint is None:
                raise NotFound(f"no pod {_describe(ref)} on node {self.node.name}")
            owned_netns = endpoint.netns.startswith(f"{netns.NETNS_DIR}/{self.pod_netns_prefix}")
            await self._forget(endpoint, delete_netns=owned_netns)
        ENDPOINTS.set(len(self.endpoints))
        self.log.info("endpoint deleted", endpoint=f"{endpoint.namespace}/{endpoint.name}")
        return endpoint

    async def _forget(self, endpoint: Endpoint, *, delete_netns: bool = False) -> None:
        """Undo whatever exists of an endpoint; every step tolerates the thing being gone."""
        key = subjects.pod_key(endpoint.namespace, endpoint.name)
        self.endpoints.pop(key, None)
        # the kernel side first: it must go even when NATS is away
        if endpoint.ip:
            self.datapath.lxc.pop(IPv4Address(endpoint.ip), None)
        if endpoint.host_ifindex:
            self.policy.remove_endpoint(endpoint.host_ifindex)
            self.datapath.endpoints.pop(endpoint.host_ifindex, None)
        if endpoint.host_ifname:
            await asyncio.to_thread(netns.unwire_endpoint, endpoint.host_ifname)
        if delete_netns and endpoint.netns:
            await asyncio.to_thread(netns.delete_netns, endpoint.netns.rsplit("/", 1)[-1])
        if endpoint.ip:
            ip = IPv4Address(endpoint.ip)
            # the bucket's delete event may arrive before or after this, either is fine
            self.ipcache.remove_local(IPv4Network(f"{ip}/32"))
            # connections of the old pod must not carry over to the next holder of its address
            await asyncio.to_thread(self.conntrack.purge, {endpoint.ip})
            self.ipam.release(ip)
        for kv, kv_key in (
            (
                self.endpoints_kv,
                subjects.endpoint_key(self.node.name, endpoint.namespace, endpoint.name),
            ),
            (
                self.ipcache_kv,
                subjects.ipcache_key(IPv4Address(endpoint.ip), self.node.name)
                if endpoint.ip
                else "",
            ),
        ):
            if not kv_key:
                continue
            try:
                await kv.delete(kv_key)
            except Exception as exc:  # NATS away: the entry is rewritten or purged on resync
                self.log.warning("cannot delete from the bus", key=kv_key, error=str(exc))
        if endpoint.identity:
            await self._release_identity(endpoint.identity, f"{key}/{endpoint.created}")

    async def _release_identity(self, identity: int, request: str) -> None:
        try:
            await self.bus.request(
                subjects.for_node(subjects.IDENTITY_RELEASE, self.node.name),
                ReleaseRequest(
                    id=identity, owner=self.node.name, request_id=f"{self.node.name}/{request}"
                ),
                ReleaseReply,
            )
        except MembraneError as exc:
            # the lease lapses on its own if this node stops renewing it
            self.log.warning("identity release failed", identity=identity, error=str(exc))

    def get_endpoint(self, ref: EndpointRef) -> Endpoint:
        endpoint = self._find(ref)
        if endpoint is None:
            raise NotFound(f"no pod {_describe(ref)} on node {self.node.name}")
        return endpoint

    def _find(self, ref: EndpointRef) -> Endpoint | None:
        if ref.name:
            return self.endpoints.get(subjects.pod_key(ref.namespace or "default", ref.name))
        if ref.container_id:
            for endpoint in self.endpoints.values():
                if endpoint.container_id == ref.container_id:
                    return endpoint
            return None
        raise InvalidArgument("name a pod, or a container id", field="name")

    async def _stored_endpoint(self, namespace: str, name: str) -> Endpoint | None:
        """The pod's ``endpoints`` entry, on whichever node holds it."""
        found = await Bus.snapshot(self.endpoints_kv, subjects.pod_endpoint_keys(namespace, name))
        for raw in found.values():
            try:
                return msgspec.json.decode(raw, type=Endpoint)
            except (msgspec.ValidationError, msgspec.DecodeError):
                BAD_MESSAGES.labels(subjects.KV_ENDPOINTS).inc()
        return None

    async def _namespace_labels(self, namespace: str) -> dict[str, str]:
        """Labels of a namespace; one used before it was declared has only its name label
        (no record is written: agents write only their own node's keys; labels declared later
        re-identify its pods, ``on_namespace``)."""
        try:
            entry = await self.namespaces_kv.get(namespace)
            if entry.value:
                return msgspec.json.decode(entry.value, type=NamespaceRecord).labels
        except (msgspec.ValidationError, msgspec.DecodeError):
            BAD_MESSAGES.labels(subjects.KV_NAMESPACES).inc()
        except Exception:  # not found
            pass
        return implicit_namespace_labels(namespace)


def implicit_namespace_labels(namespace: str) -> dict[str, str]:
    return {METADATA_NAME_LABEL: namespace}


def _describe(ref: EndpointRef) -> str:
    if ref.name:
        return f"{ref.namespace or 'default'}/{ref.name}"
    return f"with container id {ref.container_id}"
