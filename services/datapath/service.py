"""``membrane run datapath --node NAME``: one agent per node.

Start-up order matters for "restart without disruption": the pinned maps are reopened and the
resolved-policy and ipcache snapshots applied *before* endpoints are adopted, so that adopting
never removes an entry that the bus still wants; the programs are swapped on each veth by
``tc filter replace``, so traffic always meets a program.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from prometheus_client import REGISTRY

from services.datapath import cni_conf, nodeport, routing, tunnel
from services.datapath.agent import Agent, Buckets
from services.datapath.flow_publisher import WIRES, FlowPublisher
from services.datapath.fqdn_fast import REQUESTS as FQDN_REQUESTS
from services.datapath.health import Health, health_address
from services.datapath.lb_sync import LBSync, open_tables
from services.datapath.loader import Datapath
from services.datapath.maps import IPCacheValue
from services.datapath.metrics_collector import DatapathCollector
from services.datapath.ringbuf import RingBuffer
from shared import __version__, agent_api, cni, identities, maglev, netns, startup, subjects
from shared.agent_api import CNIExec, CNIOutput
from shared.bus import Bus, KVEvent, redact
from shared.config import CommonSettings, env_name, setting
from shared.errors import InvalidArgument, MembraneError, NotFound, Unavailable
from shared.messages import (
    REREGISTER_EVERY,
    HeartbeatReply,
    HeartbeatRequest,
    Message,
    Node,
    NodeHeartbeat,
    PodCIDR,
    PodCIDRRequest,
)
from shared.runtime import TaskGroup, enter_netns, periodically

K8S_NODE_NAME = "K8S_NODE_NAME"


@dataclasses.dataclass(frozen=True)
class DatapathSettings(CommonSettings):
    node: str = setting("", "name of the node this agent runs (required)")
    netns: str = setting(
        "", "network namespace to enter at start (name under /run/netns, or a path)"
    )
    socket: str = setting("", "unix socket for the CNI plugin and CLI (default per node)")
    cni_conf_dir: str = setting(
        "", "write the CNI conflist here while the agent serves (/etc/cni/net.d on a node)"
    )
    underlay_device: str = setting("eth0", "interface whose IPv4 address is the node's")
    bpffs: str = setting("/sys/fs/bpf", "where bpffs is mounted")
    ct_size: int = setting(
        65536, "connection-tracking entries (LRU); also of each translation map (lb.h, nodeport.h)"
    )
    ct_endpoint_max: int = setting(
        0, "answered connections one endpoint may hold in conntrack (0: half of ct_size)"
    )
    events_bytes: int = setting(8 << 20, "ring buffer size for datapath events (power of 2)")
    flow_wire: str = setting(
        "binary",
        "how flows go to the monitors: binary (ring buffer records as they are) or json (the"
        " former FlowBatch, for monitors older than the binary batch)",
    )
    router_device: str = setting("mbr_host", "device holding the pods' gateway address")
    heartbeat_interval: float = setting(5.0, "seconds between node and lease heartbeats")
    identity_lease: float = setting(
        120.0, "seconds the identities of this node's pods outlive its last heartbeat"
    )
    ct_gc_interval: float = setting(30.0, "seconds between sweeps of expired conntrack entries")
    dump_program: bool = setting(False, "print the BPF C source the agent compiles, and exit")
    routing: str = setting("tunnel", "pod traffic between nodes: tunnel (VXLAN) or native")
    tunnel_device: str = setting("mbr_vxlan", "the node's VXLAN device (tunnel mode)")
    tunnel_port: int = setting(8472, "UDP port of the VXLAN overlay")
    masquerade: str = setting(
        "auto",
        "pods' TCP/UDP to addresses outside the cluster leave from the node's address: "
        "auto (in tunnel mode), always or never",
    )
    health_interval: float = setting(5.0, "seconds between health probes of every other node")
    health_timeout: float = setting(2.0, "seconds a health probe waits for its answer")
    leave_on_stop: bool = setting(
        False, "delete this node from the nodes bucket when stopped (a node taken out for good)"
    )

    def __post_init__(self) -> None:
        if not self.node and os.environ.get(K8S_NODE_NAME):
            # on a Kubernetes node: the DaemonSet passes spec.nodeName (the downward API) in
            # the variable Cilium's agent reads too
            object.__setattr__(self, "node", os.environ[K8S_NODE_NAME])
        if not self.node and not self.dump_program:
            raise InvalidArgument("the node name is required", field=env_name("node"))
        if self.events_bytes < 4096 or self.events_bytes & (self.events_bytes - 1):
            raise InvalidArgument("must be a power of two >= 4096", field=env_name("events_bytes"))
        if self.flow_wire not in WIRES:
            raise InvalidArgument(f"must be one of {', '.join(WIRES)}", field=env_name("flow_wire"))
        if not 0 <= self.ct_endpoint_max <= self.ct_size:
            raise InvalidArgument(
                "must be between 0 and ct_size", field=env_name("ct_endpoint_max")
            )
        if self.heartbeat_interval <= 0:
            raise InvalidArgument("must be positive", field=env_name("heartbeat_interval"))
        tunnel.check_mode(self.routing, env_name("routing"))
        if self.masquerade not in ("auto", "always", "never"):
            raise InvalidArgument(
                f"{self.masquerade!r}: auto, always or never", field=env_name("masquerade")
            )
        for name in ("health_interval", "health_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidArgument("must be positive", field=env_name(name))

    @property
    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket else agent_api.default_socket(self.node)


async def _pod_cidr(bus: Bus, node: str, underlay: str, logger: Any) -> PodCIDR:
    """The node's pod CIDR from cluster-pool IPAM; waits for the identity service."""
    delay = 0.2
    while True:
        try:
            return await bus.request(
                subjects.ipam_allocate(node),
                PodCIDRRequest(node=node, underlay_ip=underlay),
                PodCIDR,
                timeout=5,
            )
        except Unavailable as exc:
            logger.warning("waiting for cluster-pool IPAM", error=str(exc))
        except MembraneError as exc:
            if not getattr(exc, "retryable", False):
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def cni_handler(socket: Path) -> agent_api.Handler:
    """The compiled CNI plugin's requests: shared.cni runs them, as the Python plugin does,
    and calls this agent back on its socket (in a thread: the plugin's code is synchronous)."""

    async def handle(body: bytes) -> Message:
        request = agent_api.decode(body, CNIExec)
        env = {"MEMBRANE_AGENT_SOCKET": str(socket), **request.env}
        status, document = await asyncio.to_thread(cni.run, env, request.config.encode)
        output = json.dumps(document) + "\n" if document is not None else ""
        return CNIOutput(status=status, output=output)

    return handle


@dataclasses.dataclass
class _Node:
    """What start-up has brought up, for the tasks and the stop."""

    started: startup.Started
    buckets: Buckets
    node: Node
    underlay: IPv4Address
    datapath: Datapath
    agent: Agent
    peers: routing.Peers
    health: Health


async def run(settings: DatapathSettings) -> None:
    """The agent from start to a graceful stop: bring the node up (:func:`_bring_up`), follow
    the bus and serve (:func:`_start_tasks`, :func:`_serve`), stop leaving pods forwarding."""
    if settings.dump_program:
        from services.datapath.loader import program_text

        print(program_text())
        return
    if settings.netns:
        enter_netns(settings.netns)
    started = await startup.start(
        settings,
        "datapath",
        replica=settings.node,
        connection=f"membrane-datapath-{settings.node}",
        node=settings.node,
    )
    up = await _bring_up(settings, started)
    tasks, publisher = await _start_tasks(settings, up)
    server = await agent_api.serve(
        settings.socket_path, {**up.agent.handlers(), "cni": cni_handler(settings.socket_path)}
    )
    # the DNS proxy's own socket: fqdn.learn only, never the CNI's operations
    fqdn_server = await agent_api.serve(
        agent_api.fqdn_socket(settings.socket_path),
        up.agent.fqdn_handlers(),
        lambda code: FQDN_REQUESTS.labels(code).inc(),
    )
    collector = DatapathCollector(up.datapath)
    REGISTRY.register(collector)
    micro = await started.bus.add_service(
        subjects.DATAPATH_SERVICE,
        __version__,
        "node agent: endpoints, BPF maps, flows",
        {
            **started.metadata,
            "node": settings.node,
            "underlay": str(up.underlay),
            "pod_cidr": up.node.pod_cidr,
        },
    )
    if settings.cni_conf_dir:  # the node's runtime may call the plugin from now on
        await asyncio.to_thread(cni_conf.write, Path(settings.cni_conf_dir), settings.socket_path)
    started.log.info(
        "datapath agent ready",
        nats=redact(settings.nats_url),
        socket=str(settings.socket_path),
        underlay=str(up.underlay),
        pod_cidr=up.node.pod_cidr,
        endpoints=len(up.agent.endpoints),
        # the Python fallback gives the same tables several times slower: worth seeing
        maglev_compiled=maglev.COMPILED,
    )
    # a graceful stop leaves pods, programs and maps in place: the next agent adopts them
    await started.until_signalled("shutting down; endpoints keep forwarding")
    if settings.cni_conf_dir:  # new pods wait for the next agent rather than fail
        await asyncio.to_thread(cni_conf.remove, Path(settings.cni_conf_dir))
    server.close()
    fqdn_server.close()
    await up.health.close()
    await micro.stop()
    await tasks.close()
    if settings.leave_on_stop:
        await _leave(up)
    with contextlib.suppress(Exception):
        await publisher.flush()
    await started.bus.close()
    REGISTRY.unregister(collector)
    up.datapath.close()


async def _bring_up(settings: DatapathSettings, started: startup.Started) -> _Node:
    """The node's address, pod CIDR and router, the compiled programs over the pinned maps,
    the overlay or native routing, node ports, and the agent, peers and health on top."""
    bus, logger = started.bus, started.log
    buckets = await Buckets.open(bus, settings.kv_replicas)
    underlay = await asyncio.to_thread(netns.interface_address, settings.underlay_device)
    if underlay is None:
        raise Unavailable(f"the underlay device {settings.underlay_device} has no IPv4 address")
    # the identity service records the address with the CIDR (refusing one a live peer
    # holds): peers route and tunnel to its record, not to this node's own
    cidr = await _pod_cidr(bus, settings.node, str(underlay), logger)
    router = next(IPv4Network(cidr.cidr).hosts())
    await asyncio.to_thread(netns.ensure_router, settings.router_device, router)
    await asyncio.to_thread(netns.ensure_proxy_route)
    node = Node(
        name=settings.node,
        underlay_ip=str(underlay),
        pod_cidr=cidr.cidr,
        router_ip=str(router),
        heartbeat=time.time(),
        version=__version__,
        routing=settings.routing,
        health_ip=str(health_address(cidr.cidr)),
    )
    begun = time.perf_counter()
    datapath = await asyncio.to_thread(
        Datapath,
        Path(settings.bpffs),
        settings.node,
        ct_size=settings.ct_size,
        events_bytes=settings.events_bytes,
        ct_endpoint_max=settings.ct_endpoint_max,
    )
    logger.info(
        "datapath compiled",
        seconds=round(time.perf_counter() - begun, 2),
        maps_reused=datapath.adopted,
    )
    agent = Agent(
        bus,
        buckets,
        datapath,
        node,
        identity_lease=settings.identity_lease,
        pod_netns_prefix=f"{settings.node}_",
    )
    for own in (underlay, router):
        agent.ipcache.set_local(IPv4Network(f"{own}/32"), IPCacheValue(identities.HOST))
    vxlan_ifindex = await _route(settings, datapath, underlay)
    peers = routing.Peers(
        node,
        settings.routing,
        agent.ipcache,
        datapath.tunnel_peers,
        pod_cidrs=agent.ipcache_guard.pod_cidrs,
        underlays=agent.ipcache_guard.underlays,
        overlay_ifindex=vxlan_ifindex,
    )
    health = Health(
        agent,
        peers,
        bus,
        await started.kv(
            subjects.KV_HEALTH, "node -> its latest health probes of every other node"
        ),
        interval=settings.health_interval,
        timeout=settings.health_timeout,
    )
    health.claim_address()
    return _Node(started, buckets, node, underlay, datapath, agent, peers, health)


async def _route(settings: DatapathSettings, datapath: Datapath, underlay: IPv4Address) -> int:
    """The VXLAN device, the overlay configuration map, and node ports for clients outside
    the pod network (bpf/nodeport.h); the device's ifindex. Native routing has the device
    too: a node-port client forwarded to a backend on another node travels in it with its own
    identity, which the routing table would lose (the backend's node would see this node)."""
    mtu = await asyncio.to_thread(tunnel.link_mtu, settings.underlay_device)
    vxlan_ifindex = await asyncio.to_thread(
        tunnel.ensure_vxlan, settings.tunnel_device, settings.tunnel_port, underlay, mtu
    )
    await asyncio.to_thread(datapath.attach_overlay, vxlan_ifindex)
    tunnel.write_config(
        datapath.overlay_config,
        tunnel.OverlayConfig(
            underlay,
            vxlan_ifindex,
            tunnel.ROUTING_TUNNEL if settings.routing == "tunnel" else tunnel.ROUTING_NATIVE,
            settings.tunnel_port,
        ),
    )
    masquerade = settings.masquerade == "always" or (
        settings.masquerade == "auto" and settings.routing == "tunnel"
    )
    await asyncio.to_thread(
        nodeport.enable, datapath, settings.underlay_device, underlay, masquerade
    )
    return vxlan_ifindex


async def _start_tasks(settings: DatapathSettings, up: _Node) -> tuple[TaskGroup, FlowPublisher]:
    """Follow the buckets until every snapshot is in, adopt what a previous agent left, then
    the peers, health, flows, heartbeat and conntrack tasks."""
    agent, buckets, logger = up.agent, up.buckets, up.started.log
    tasks = TaskGroup()

    def on_pod_cidr(event: KVEvent) -> None:
        agent.on_pod_cidr(event)
        up.peers.changed.set()  # routes follow the pod CIDRs the identity service gave
        if agent.lb is not None:
            agent.lb.on_underlays()  # and node-port frontends their underlay addresses

    for name, kv, handle in (
        ("resolved", buckets.resolved, agent.on_resolved),
        ("selectors", buckets.selectors, agent.on_selector),
        ("endpoints", buckets.endpoints, agent.on_endpoint),
        ("pod-cidrs", buckets.pod_cidrs, on_pod_cidr),
        ("ipcache", buckets.ipcache, agent.on_ipcache),
        ("nodes", buckets.nodes, up.peers.on_node),
        ("liveness", buckets.liveness, up.peers.on_liveness),
        ("namespaces", buckets.namespaces, agent.lifecycle.on_namespace),
        ("pods", buckets.pods, agent.lifecycle.on_pod),
    ):
        tasks.spawn(f"watch-{name}", functools.partial(agent.follow, name, kv, handle))
    # service load balancing: the services bucket into the lb maps (bpf/lb.h)
    lb = agent.lb = LBSync(open_tables(up.datapath.bpf), agent.ipcache_guard.underlays)
    services_kv = await up.started.kv(
        subjects.KV_SERVICES, "namespace.name -> frontends, backends, revision"
    )
    tasks.spawn("watch-services", lambda: lb.run(services_kv, buckets.nodes))
    for name, event in agent.synced.items():
        await event.wait()
        logger.debug("snapshot applied", bucket=name)
    await agent.lifecycle.adopt()
    tasks.spawn("peers", up.peers.run)
    await up.health.start()
    tasks.spawn("health", up.health.run)
    publisher = FlowPublisher(
        up.started.bus,
        settings.node,
        RingBuffer(up.datapath.events_fd(), settings.events_bytes),
        up.datapath.lost_event_count,
        wire=settings.flow_wire,
    )
    tasks.spawn("flows", publisher.run)
    await up.buckets.nodes.put(settings.node, msgspec.json.encode(up.node))
    heartbeat = functools.partial(_heartbeat, settings, up, itertools.count())
    await heartbeat()
    tasks.spawn("heartbeat", lambda: periodically(settings.heartbeat_interval, heartbeat))
    tasks.spawn("policy-retry", lambda: periodically(5.0, _on_loop(agent.policy.retry_failed)))
    tasks.spawn("fqdn-expiry", lambda: periodically(1.0, agent.expire_fqdn))
    tasks.spawn("ct-purge", lambda: periodically(1.0, agent.conntrack.purge_stale))
    tasks.spawn("ct-gc", lambda: periodically(settings.ct_gc_interval, agent.sweep_ct))
    return tasks, publisher


async def _heartbeat(settings: DatapathSettings, up: _Node, beats: Iterator[int]) -> None:
    """The node's heartbeat (to the failure detector, not the ``nodes`` bucket every agent
    follows) and the lease on its pods' identities. Once in a while the node's entry is put
    back if it is gone (deleted by hand, a NATS store lost): a create, which the stream
    refuses while the entry is there, so no watcher sees anything."""
    await up.started.bus.publish(
        subjects.node_heartbeat(settings.node),
        NodeHeartbeat(node=settings.node, time=time.time()),
    )
    if next(beats) % REREGISTER_EVERY == REREGISTER_EVERY - 1:
        with contextlib.suppress(KeyWrongLastSequenceError):
            await up.buckets.nodes.create(settings.node, msgspec.json.encode(up.node))
    if not up.agent.endpoints:
        return  # the lease covers this node's pods' identities; without pods there is none
    try:
        await up.started.bus.request(
            subjects.for_node(subjects.IDENTITY_HEARTBEAT, settings.node),
            HeartbeatRequest(owner=settings.node, ttl_seconds=settings.identity_lease),
            HeartbeatReply,
        )
    except NotFound:
        # the lease lapsed (this node was away too long) and its references are gone: take
        # them again, or the numbers could be handed to other label sets
        up.started.log.warning("identity lease lapsed; allocating the pods' identities again")
        await up.agent.lifecycle.reclaim_identities()
    except MembraneError as exc:
        up.started.log.warning("identity lease not renewed", error=str(exc))


async def _leave(up: _Node) -> None:
    """A graceful leave: the other nodes drop this node's routes and tunnel endpoint at once."""
    try:
        await up.buckets.nodes.delete(up.node.name)
        up.started.log.info("left the cluster")
    except Exception as exc:
        up.started.log.warning("could not leave the cluster", error=str(exc))


def _on_loop(action: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        action()

    return call
