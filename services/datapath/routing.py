"""The other nodes, as this node's agent sees them: routes, tunnel endpoints, node addresses.

The ``nodes`` bucket is the membership: a node joins by writing its entry (again only when it
changes) and leaves gracefully by deleting it. Liveness is the ``liveness`` bucket: the
failure detector's verdicts (services/identity/nodes.py), written when they change, from the
heartbeats only it follows; a member without a verdict yet is alive. For every other node the
kernel gets:

- alive, native routing: a route for its pod CIDR via its underlay address, and its underlay
  address in ``tunnel_peers`` (only node-port clients it forwards use the tunnel);
- alive, tunnel mode: its underlay address in the ``tunnel_peers`` map (from_container
  tunnels to it; the ipcache says which pod sits behind which node);
- dead: an unreachable route for its pod CIDR and no tunnel entry, so that traffic to its pods
  fails at once with an ICMP error instead of vanishing into the underlay;
- its underlay address in the ipcache as ``remote-node`` while it is known.

A node's pod CIDR and underlay address are taken from the ``pod-cidrs`` bucket (what
cluster-pool IPAM gave it and the address it recorded then, refusing one a live peer held: the
identity service's word), not from its own record: a node claiming a peer's CIDR there would
otherwise have the peer's pods routed to it (native routing), and one claiming a peer's
address would move the peer's tunnel endpoint and ``remote-node`` entry. A record that
disagrees is counted and logged; a node whose CIDR and address the identity service has not
published gets nothing yet.

A dead node's pods (their ipcache and endpoints entries) are released by the identity
service (services/identity/nodes.py): an agent may write only its own node's keys.
All kernel work is a diff against what was applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.lifecycle import BAD_MESSAGES
from services.datapath.maps import IPCacheValue
from shared import identities, log, subjects
from shared.bus import KVEvent
from shared.ipcache_guard import PodRange
from shared.messages import Node, NodeLiveness

NODES_ALIVE = Gauge("membrane_datapath_peer_nodes", "Other nodes by state", ["state"])
CIDR_MISMATCHES = Counter(
    "membrane_datapath_peer_pod_cidr_mismatches_total",
    "nodes records claiming a pod CIDR other than the one the identity service gave the node "
    "(routes follow the identity service's)",
)
UNDERLAY_MISMATCHES = Counter(
    "membrane_datapath_peer_underlay_mismatches_total",
    "nodes records claiming an underlay address other than the one the identity service "
    "recorded for the node (routes, tunnels and the ipcache follow the identity service's)",
)
ROUTE_PROTO = 109  # marks routes this module owns (a number iproute2 names no protocol for)


@dataclass(frozen=True)
class PeerState:
    """What the kernel holds for one other node."""

    pod_cidr: str
    underlay_ip: str
    alive: bool


class Peers:
    def __init__(
        self,
        node: Node,
        mode: str,
        ipcache: IPCacheSync,
        tunnel_peers: Any,  # MutableMapping[IPv4Address, int], the BPF map
        *,
        pod_cidrs: Mapping[str, PodRange],
        underlays: Mapping[str, str],
        overlay_ifindex: int = 0,
    ) -> None:
        self.node = node
        # node token -> the pod CIDR the identity service gave it (the agent's ipcache guard
        # keeps it current; the agent sets ``changed`` when it moves)
        self.pod_cidrs = pod_cidrs
        self.underlays = underlays  # node token -> its underlay address, the same way
        self.mismatched: dict[str, str] = {}  # node -> the CIDR its record claims, if not its own
        self.mismatched_underlay: dict[str, str] = {}  # the same for its underlay address
        # tunnel mode: what the node itself sends to another node's pods (the L7 proxy's
        # answers, as the server pod) is routed into the VXLAN device, whose egress program
        # sets the tunnel key (bpf/overlay.h overlay_egress)
        self.overlay_ifindex = overlay_ifindex
        self.mode = mode
        self.ipcache = ipcache
        self.tunnel_peers = tunnel_peers
        self.nodes: dict[str, Node] = {}  # the bucket's view, this node excluded
        # node -> the failure detector's verdict (``liveness``); a member it has not judged
        # yet is alive (it joined a moment ago, or no detector runs)
        self.liveness: dict[str, NodeLiveness] = {}
        self.applied: dict[str, PeerState] = {}
        self.changed = asyncio.Event()
        self.log = log.get("datapath.routing", node=node.name)

    # --- the bucket -----------------------------------------------------------------------

    def on_node(self, event: KVEvent) -> None:
        if event.key == self.node.name:
            return
        if event.value is None:
            if self.nodes.pop(event.key, None) is not None:
                self.log.info("node left", peer=event.key)
        else:
            try:
                peer = msgspec.json.decode(event.value, type=Node)
                IPv4Network(peer.pod_cidr)
                IPv4Address(peer.underlay_ip)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                BAD_MESSAGES.labels(subjects.KV_NODES).inc()
                return
            if event.key not in self.nodes:
                self.log.info("node joined", peer=event.key, underlay=peer.underlay_ip)
            self.nodes[event.key] = peer
        self.changed.set()

    def on_liveness(self, event: KVEvent) -> None:
        name = subjects.node_of_token(event.key)
        if event.value is None:
            self.liveness.pop(name, None)
        else:
            try:
                self.liveness[name] = msgspec.json.decode(event.value, type=NodeLiveness)
            except (msgspec.ValidationError, msgspec.DecodeError):
                BAD_MESSAGES.labels(subjects.KV_LIVENESS).inc()
                return
        if name in self.nodes:
            self.changed.set()

    def alive(self, name: str) -> bool:
        verdict = self.liveness.get(name)
        return verdict is None or verdict.alive

    def desired(self) -> dict[str, PeerState]:
        states = {}
        for name, peer in self.nodes.items():
            token = subjects.pod_cidr_key(name)
            given = self.pod_cidrs.get(token)
            underlay = self.underlays.get(token)
            if given is None or not underlay:  # not published yet: nothing for the record
                continue
            cidr = str(given.network)
            self._check_claim(name, peer.pod_cidr, cidr)
            self._check_underlay(name, peer.underlay_ip, underlay)
            states[name] = PeerState(cidr, underlay, self.alive(name))
        return states

    def _check_underlay(self, name: str, claimed: str, given: str) -> None:
        self._check(self.mismatched_underlay, UNDERLAY_MISMATCHES, "underlay", name, claimed, given)

    def _check_claim(self, name: str, claimed: str, given: str) -> None:
        self._check(self.mismatched, CIDR_MISMATCHES, "pod_cidr", name, claimed, given)

    def _check(
        self,
        seen: dict[str, str],
        counter: Counter,
        field: str,
        name: str,
        claimed: str,
        given: str,
    ) -> None:
        """Count and log a record's ``field`` that is not the node's own (the identity
        service's word), once per claim; the node's own is what is routed."""
        if claimed == given:
            seen.pop(name, None)
        elif seen.get(name) != claimed:
            seen[name] = claimed
            counter.inc()
            what = "an underlay address" if field == "underlay" else "a pod CIDR"
            self.log.warning(
                f"node record claims {what} not its own; using its own",
                peer=name,
                claimed=claimed,
                **{field: given},
            )

    # --- the kernel -----------------------------------------------------------------------

    async def run(self, tick: float = 1.0) -> None:
        """Apply membership and liveness changes as they come (and once a ``tick``)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), tick)
            self.changed.clear()
            await self.reconcile()

    async def reconcile(self) -> None:
        desired = self.desired()
        if desired != self.applied:
            await asyncio.to_thread(self._apply, desired)
        NODES_ALIVE.labels("alive").set(sum(1 for s in desired.values() if s.alive))
        NODES_ALIVE.labels("dead").set(sum(1 for s in desired.values() if not s.alive))

    def _apply(self, desired: dict[str, PeerState]) -> None:
        """Diff ``desired`` against what was applied; runs in a thread."""
        with IPRoute() as ipr:
            for name in [n for n in self.applied if n not in desired]:
                self._remove(ipr, name, self.applied.pop(name))
            for name, state in desired.items():
                old = self.applied.get(name)
                if old == state:
                    continue
                if old is not None and (old.pod_cidr, old.underlay_ip) != (
                    state.pod_cidr,
                    state.underlay_ip,
                ):
                    self._remove(ipr, name, old)
                self._install(ipr, state)
                self.applied[name] = state
                self.log.info(
                    "peer node updated",
                    peer=name,
                    alive=state.alive,
                    pod_cidr=state.pod_cidr,
                    underlay=state.underlay_ip,
                    routing=self.mode,
                )

    def _install(self, ipr: Any, state: PeerState) -> None:
        address = IPv4Address(state.underlay_ip)
        node_net = IPv4Network(f"{address}/32")
        if node_net not in self.ipcache.local:
            self.ipcache.set_local(node_net, IPCacheValue(identities.REMOTE_NODE, address))
        if not state.alive:
            self.tunnel_peers.pop(address, None)
            _route(ipr, "replace", dst=state.pod_cidr, type="unreachable")
        elif self.mode == "native":
            # a peer even so: node-port clients forwarded to its backends travel in the VXLAN
            # device with their identity (bpf/nodeport.h np_deliver), and it accepts them
            self.tunnel_peers[address] = 1
            _route(ipr, "replace", dst=state.pod_cidr, gateway=state.underlay_ip)
        else:
            self.tunnel_peers[address] = 1
            if self.overlay_ifindex:
                _route(ipr, "replace", dst=state.pod_cidr, oif=self.overlay_ifindex, scope=253)
            else:
                _route(ipr, "del", dst=state.pod_cidr)

    def _remove(self, ipr: Any, name: str, state: PeerState) -> None:
        address = IPv4Address(state.underlay_ip)
        self.tunnel_peers.pop(address, None)
        self.ipcache.remove_local(IPv4Network(f"{address}/32"))
        _route(ipr, "del", dst=state.pod_cidr)
        self.log.info("peer node removed", peer=name)

    def table(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "node": name,
                "underlay_ip": peer.underlay_ip,
                "pod_cidr": peer.pod_cidr,
                "health_ip": peer.health_ip,
                "alive": self.alive(name),
                "verdict_age": round(now - verdict.since, 1) if verdict else None,
            }
            for name, peer in sorted(self.nodes.items())
            for verdict in [self.liveness.get(name)]
        ]


def _route(ipr: Any, command: str, **spec: Any) -> None:
    """One route of ours (proto ROUTE_PROTO); a missing one on delete is fine. A delete
    removes the prefix whatever its type (a route via a node, or unreachable)."""
    if command != "del":
        ipr.route(command, proto=ROUTE_PROTO, **spec)
        return
    for kind in ("unicast", "unreachable"):
        try:
            ipr.route("del", proto=ROUTE_PROTO, type=kind, **spec)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise
