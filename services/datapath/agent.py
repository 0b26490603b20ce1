"""The node agent: owns the node's BPF maps, keeps them equal to the bus, and serves the
local socket.

Its parts: the endpoint lifecycle (lifecycle.py: wiring, adopting, re-identifying and removing
pods, behind one lock), conntrack cleanup (conntrack.py) and the map dumps (introspection.py).
What stays here is the KV watches turned into map updates, which are not behind the endpoint
lock (each is a handful of map writes), and the socket API's handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter

from services.datapath import introspection
from services.datapath.conntrack import Conntrack
from services.datapath.declared_ports import DeclaredPorts
from services.datapath.fqdn_fast import REQUESTS, FQDNFast
from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.lb_sync import LBSync
from services.datapath.lifecycle import BAD_MESSAGES, EndpointLifecycle
from services.datapath.loader import Datapath
from services.datapath.local_ipam import NodeIPAM
from services.datapath.metrics_collector import POLICY_IMPLEMENTATION
from services.datapath.policy_sync import PolicySync
from shared import agent_api, kv_watch, log, subjects
from shared.agent_api import AddEndpoint, DumpRequest, EndpointList, EndpointRef, FQDNLearn
from shared.bus import Bus, KVEvent
from shared.errors import MembraneError
from shared.fqdn import NameMatch
from shared.fqdn import parse as parse_match
from shared.ipcache_guard import IPCacheGuard
from shared.messages import (
    Endpoint,
    IPCacheEntry,
    Message,
    Node,
    PeerSet,
    ResolvedPolicy,
)

KV_TO_MAP = Counter(
    "membrane_datapath_kv_events_total", "KV changes turned into map updates", ["bucket"]
)


@dataclass
class Buckets:
    nodes: KeyValue
    liveness: KeyValue  # the failure detector's verdicts (the identity service writes them)
    endpoints: KeyValue
    ipcache: KeyValue
    pod_cidrs: KeyValue  # the identity service's: what each node's ipcache entries may name
    resolved: KeyValue
    selectors: KeyValue
    namespaces: KeyValue
    pods: KeyValue  # the pods' labels from the Kubernetes API (the k8s bridge writes it)

    @classmethod
    async def open(cls, bus: Bus, replicas: int) -> Buckets:
        async def kv(name: str, description: str) -> KeyValue:
            return await bus.kv(name, description=description, replicas=replicas)

        return cls(
            nodes=await kv(subjects.KV_NODES, "node -> underlay address, pod CIDR"),
            liveness=await kv(subjects.KV_LIVENESS, "node -> alive or dead (identity's verdict)"),
            endpoints=await kv(subjects.KV_ENDPOINTS, "node.namespace.pod -> endpoint"),
            ipcache=await kv(subjects.KV_IPCACHE, "owner.address -> identity, node"),
            pod_cidrs=await kv(
                subjects.KV_POD_CIDRS, "node -> its pod CIDR (cluster-pool IPAM; identity writes)"
            ),
            resolved=await kv(subjects.KV_RESOLVED, "identity -> resolved policy"),
            selectors=await kv(subjects.KV_SELECTORS, "peer set id -> identities it selects"),
            namespaces=await kv(subjects.KV_NAMESPACES, "namespace -> labels"),
            pods=await kv(subjects.KV_PODS, "namespace.pod -> labels from the Kubernetes API"),
        )


def deny_all(identity: int) -> ResolvedPolicy:
    """What an identity gets when its resolved policy cannot be read: nothing."""
    return ResolvedPolicy(
        identity=identity, revision=0, ingress_enforced=True, egress_enforced=True
    )


class Agent:
    def __init__(
        self,
        bus: Bus,
        buckets: Buckets,
        datapath: Datapath,
        node: Node,
        *,
        identity_lease: float,
        pod_netns_prefix: str,
    ) -> None:
        self.bus = bus
        self.kv = buckets
        self.datapath = datapath
        self.node = node
        self.router = IPv4Address(node.router_ip)
        self.ipam = NodeIPAM(IPv4Network(node.pod_cidr))
        self.policy = PolicySync(datapath.policy, datapath.endpoints)
        self.ipcache = IPCacheSync(datapath.ipcache, datapath.prefixes)
        # a node's entries reach the map only inside the pod CIDR the identity service gave it
        self.ipcache_guard = IPCacheGuard("datapath", self._install_ipcache)
        self.fqdn = FQDNFast(self.policy, self.ipcache)
        self.conntrack = Conntrack(
            (datapath.ct, datapath.ct_new),
            self.ipam.cidr,
            datapath.ct_quota,
            datapath.translations,
            ((datapath.lb_nat, datapath.np_nat), datapath.lb_quota),
        )
        self.lifecycle = EndpointLifecycle(
            bus,
            node,
            datapath,
            ipam=self.ipam,
            policy=self.policy,
            ipcache=self.ipcache,
            conntrack=self.conntrack,
            endpoints_kv=buckets.endpoints,
            ipcache_kv=buckets.ipcache,
            namespaces_kv=buckets.namespaces,
            identity_lease=identity_lease,
            pod_netns_prefix=pod_netns_prefix,
        )
        # the same dict: the conntrack sweep, dumps and the health endpoint read it
        self.endpoints = self.lifecycle.endpoints
        self.synced = {
            name: asyncio.Event()
            for name in (
                "resolved",
                "selectors",
                "ipcache",
                "pod-cidrs",  # before it, the guard holds every node's entries back
                "nodes",
                "liveness",  # before it, a dead peer would be routed as alive
                "namespaces",
                "endpoints",
                "pods",
            )
        }
        self.watched: dict[str, set[str]] = {}  # bucket -> keys with a value, as applied
        self.declared_ports = DeclaredPorts()  # egress named ports, from every node's pods
        self.lb: LBSync | None = None  # set at start-up, once the lb maps are open
        self.log = log.get("datapath.agent", node=node.name)

    # --- KV watches -> maps ------------------------------------------------------------------

    def on_resolved(self, event: KVEvent) -> None:
        try:
            identity = int(event.key)
        except ValueError:
            BAD_MESSAGES.labels(subjects.KV_RESOLVED).inc()
            return
        policy: ResolvedPolicy | None = None
        if event.value is not None:
            try:
                policy = msgspec.json.decode(event.value, type=ResolvedPolicy)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                BAD_MESSAGES.labels(subjects.KV_RESOLVED).inc()
                self.log.error(
                    "unreadable resolved policy; denying", identity=identity, error=str(exc)
                )
                policy = deny_all(identity)
        with POLICY_IMPLEMENTATION.time():
            self.policy.set_resolved(identity, policy)
        KV_TO_MAP.labels(subjects.KV_RESOLVED).inc()

    def on_endpoint(self, event: KVEvent) -> None:
        """Container ports by identity, from every node's pods: an egress rule naming a port
        resolves it against the destination's declaration."""
        endpoint: Endpoint | None = None
        if event.value is not None:
            try:
                endpoint = msgspec.json.decode(event.value, type=Endpoint)
            except (msgspec.ValidationError, msgspec.DecodeError):
                BAD_MESSAGES.labels(subjects.KV_ENDPOINTS).inc()
        for identity, ports in self.declared_ports.update(event.key, endpoint).items():
            self.policy.set_peer_ports(identity, ports)

    def on_selector(self, event: KVEvent) -> None:
        try:
            set_id = int(event.key)
        except ValueError:
            BAD_MESSAGES.labels(subjects.KV_SELECTORS).inc()
            return
        members: list[int] | None = None
        selector: NameMatch | None = None
        if event.value is not None:
            try:
                peer_set = msgspec.json.decode(event.value, type=PeerSet)
                members = peer_set.identities
                if peer_set.fqdn is not None:
                    selector = parse_match(peer_set.fqdn, "fqdn")
            except (msgspec.ValidationError, msgspec.DecodeError, MembraneError) as exc:
                BAD_MESSAGES.labels(subjects.KV_SELECTORS).inc()
                self.log.error(
                    "unreadable peer set; endpoints naming it deny", key=event.key, error=str(exc)
                )
                self.policy.set_peer_set(set_id, None, unreadable=True)
                self.fqdn.on_peer_set(set_id, None, frozenset())
                return
        self.policy.set_peer_set(set_id, members)
        self.fqdn.on_peer_set(set_id, selector, frozenset(members or ()))
        KV_TO_MAP.labels(subjects.KV_SELECTORS).inc()

    def on_ipcache(self, event: KVEvent) -> None:
        self.ipcache_guard.on_ipcache(event.key, event.value)

    def on_pod_cidr(self, event: KVEvent) -> None:
        self.ipcache_guard.on_pod_cidr(event.key, event.value)

    def _install_ipcache(self, key: str, value: bytes | None) -> None:
        """What the guard believes of ``key`` (shared/ipcache_guard.py) into the maps."""
        entry: IPCacheEntry | None = None
        if value is not None:
            try:
                entry = msgspec.json.decode(value, type=IPCacheEntry)
                IPv4Network(entry.cidr)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                # an address nobody can vouch for is treated as unknown (world), not as before
                BAD_MESSAGES.labels(subjects.KV_IPCACHE).inc()
                entry = None
        # connections of an address whose holder changed go; a policy prefix (the policy
        # service's key) changes no holder: neither when it names an owned address, nor when
        # it goes (a toFQDNs address past its TTL: its open connections keep working)
        old = self.ipcache.value_of(key)
        before = self.ipcache.chosen(old[0]) if old is not None else None
        self.ipcache.apply(key, entry)
        for net in {old[0] if old is not None else None, self.ipcache.keys.get(key)}:
            if net is not None:
                self.fqdn.on_ipcache(net)
        holder = subjects.ipcache_key_owner(key) != subjects.POLICY_IPCACHE_OWNER
        if holder and old is not None and self.ipcache.chosen(old[0]) != before:
            self.conntrack.stale.add(str(old[0].network_address))
        KV_TO_MAP.labels(subjects.KV_IPCACHE).inc()

    async def follow(self, name: str, kv: KeyValue, handle: Callable[[KVEvent], None]) -> None:
        """Apply a bucket's snapshot, signal that it is in, then apply every change."""
        known = self.watched.setdefault(name, set())  # outlives a restarted watch
        await kv_watch.follow(kv, handle, self.synced[name].set, known)

    async def expire_fqdn(self) -> None:
        """What the DNS fast path added and the cluster path never confirmed, past its TTL."""
        self.fqdn.expire(time.time())

    def fqdn_handlers(self) -> dict[str, agent_api.Handler]:
        """The fqdn socket's: ``fqdn.learn`` only (the node's DNS proxy; fqdn_fast.py)."""

        async def learn(body: bytes) -> Message:
            request = agent_api.decode(body, FQDNLearn)
            with POLICY_IMPLEMENTATION.time():
                reply = self.fqdn.learn(request, self.endpoints, time.time())
            REQUESTS.labels("ok").inc()
            return reply

        return {"fqdn.learn": learn}

    async def sweep_ct(self) -> None:
        """Conntrack entries that expired or whose pod is gone (periodic; conntrack.py)."""
        await self.conntrack.sweep(e.ip for e in self.endpoints.values())

    # --- the socket API ----------------------------------------------------------------------

    def handlers(self) -> dict[str, agent_api.Handler]:
        def typed(
            request_type: type[Any], handler: Callable[[Any], Awaitable[Message]]
        ) -> agent_api.Handler:
            async def handle(body: bytes) -> Message:
                return await handler(agent_api.decode(body, request_type))

            return handle

        async def get(ref: EndpointRef) -> Message:
            return self.lifecycle.get_endpoint(ref)

        async def listing(_: Message) -> Message:
            return EndpointList(endpoints=sorted(self.endpoints.values(), key=_sort_key))

        async def dump(req: DumpRequest) -> Message:
            return await asyncio.to_thread(introspection.dump, self, req)

        return {
            "endpoint.add": typed(AddEndpoint, self.lifecycle.add_endpoint),
            "endpoint.delete": typed(EndpointRef, self.lifecycle.delete_endpoint),
            "endpoint.get": typed(EndpointRef, get),
            "endpoint.list": typed(Message, listing),
            "dump": typed(DumpRequest, dump),
        }


def _sort_key(endpoint: Endpoint) -> tuple[str, str]:
    return (endpoint.namespace, endpoint.name)
