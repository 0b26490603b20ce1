"""Node health: a health endpoint per node, and probes of every other node.

The health endpoint is a pod-like namespace (``<node>_health``) behind a veth with the reserved
identity ``health`` and the second address of the node's pod CIDR; the agent answers HTTP on
it (port 4240, as Cilium's). Every ``interval`` the agent probes each other node twice:

- ICMP echo to the node's underlay address, from the node itself: is the node there at all;
- HTTP GET from this node's health endpoint to the peer's: the path pods take, through both
  datapaths and the overlay (or the native routes).

Each round is published on ``membrane.health.<node>`` and stored in the ``health`` bucket, from
which ``membrane status`` draws its latency matrix; the latencies are also metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from prometheus_client import Gauge

from services.datapath.maps import EndpointInfo, IPCacheValue, LxcInfo
from services.datapath.policy_sync import LocalEndpoint
from shared import identities, log, netns, subjects
from shared.bus import Bus
from shared.messages import IPCacheEntry, Node, NodeHealth, PeerHealth

if TYPE_CHECKING:
    from services.datapath.agent import Agent
    from services.datapath.routing import Peers

HEALTH_PORT: Final = 4240
HEALTH_IFNAME: Final = "lxc_health"
ICMP_ECHO: Final = 8
ICMP_ECHOREPLY: Final = 0
# a peer that never answered is probed again this soon, for this many rounds (start-up)
STARTUP_RETRY_S: Final = 1.0
STARTUP_RETRIES: Final = 5

PEER_REACHABLE = Gauge(
    "membrane_node_connectivity_status",
    "1 when the peer's health endpoint answered the last HTTP probe, else 0",
    ["peer", "type"],
)
PEER_LATENCY = Gauge(
    "membrane_node_connectivity_latency_seconds",
    "Round trip of the last successful probe of a peer node",
    ["peer", "type"],
)


def health_address(pod_cidr: str) -> IPv4Address:
    """The health endpoint's address: the pod CIDR's second host (the first is the router)."""
    hosts = IPv4Network(pod_cidr).hosts()
    next(hosts)
    return next(hosts)


def netns_name(node: str) -> str:
    return f"{node}_health"


class Health:
    def __init__(
        self,
        agent: Agent,
        peers: Peers,
        bus: Bus,
        kv_health: Any,
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self.agent = agent
        self.peers = peers
        self.bus = bus
        self.kv_health = kv_health
        self.interval = interval
        self.timeout = timeout
        self.node: Node = agent.node
        self.ip = health_address(self.node.pod_cidr)
        self.netns: Path | None = None
        self.server: asyncio.AbstractServer | None = None
        self.results: dict[str, PeerHealth] = {}
        self.reached: set[str] = set()  # peers that answered at least once
        self.log = log.get("datapath.health", node=self.node.name)

    # --- the endpoint ---------------------------------------------------------------------

    def claim_address(self) -> None:
        """Before any pod is adopted or created: the address is never a pod's."""
        self.agent.ipam.reserve(self.ip)
        self.agent.conntrack.keep.add(str(self.ip))

    async def start(self) -> None:
        """Wire the health endpoint (idempotent: an agent restart re-installs it), serve HTTP
        on it and publish its ipcache entry. After ``adopt``, which prunes what it does not
        know."""
        agent, datapath = self.agent, self.agent.datapath
        if await asyncio.to_thread(netns.link_index, HEALTH_IFNAME) is None:
            # a namespace left from before this node's own namespace was recreated holds the
            # other end of a veth that no longer exists: start afresh
            await asyncio.to_thread(netns.delete_netns, netns_name(self.node.name))
        self.netns = await asyncio.to_thread(netns.ensure_netns, netns_name(self.node.name))
        wired = await asyncio.to_thread(
            netns.wire_endpoint, self.netns, "eth0", HEALTH_IFNAME, self.ip, agent.router
        )
        ifindex = wired.host_ifindex
        current = datapath.endpoints.get(ifindex)
        datapath.endpoints[ifindex] = EndpointInfo(
            identities.HEALTH, self.ip, current.flags if current else 0
        )
        agent.policy.upsert_endpoint(LocalEndpoint(ifindex, identities.HEALTH, ()))
        await asyncio.to_thread(datapath.attach, ifindex)
        datapath.lxc[self.ip] = LxcInfo(ifindex, wired.pod_mac, wired.host_mac)
        agent.ipcache.set_local(
            IPv4Network(f"{self.ip}/32"),
            IPCacheValue(identities.HEALTH, IPv4Address(self.node.underlay_ip)),
        )
        await agent.kv.ipcache.put(
            subjects.ipcache_key(IPv4Address(self.ip), self.node.name),
            msgspec.json.encode(
                IPCacheEntry(
                    cidr=f"{self.ip}/32",
                    identity=identities.HEALTH,
                    node=self.node.name,
                    host_ip=self.node.underlay_ip,
                )
            ),
        )
        listener = await asyncio.to_thread(netns.in_netns, self.netns, _listener, HEALTH_PORT)
        self.server = await asyncio.start_server(self._answer, sock=listener)
        # ping sockets for root (ICMP echo without a raw socket); net.* sysctls are per netns
        await asyncio.to_thread(_allow_ping_sockets)
        self.log.info("health endpoint ready", ip=str(self.ip), ifindex=ifindex)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            body = self.node.name.encode()
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    # --- probes ---------------------------------------------------------------------------

    async def probe_round(self) -> NodeHealth:
        now = time.time()
        peers = dict(self.peers.nodes)
        results = await asyncio.gather(
            *(self._probe(peer, self.peers.alive(name)) for name, peer in peers.items())
        )
        for gone in set(self.results) - set(peers):
            self.results.pop(gone, None)
            for kind in ("icmp", "http"):
                with contextlib.suppress(KeyError):
                    PEER_REACHABLE.remove(gone, kind)
                with contextlib.suppress(KeyError):
                    PEER_LATENCY.remove(gone, kind)
        report = NodeHealth(
            node=self.node.name,
            timestamp=now,
            interval=self.interval,
            peers=sorted(results, key=lambda r: r.node),
        )
        payload = msgspec.json.encode(report)
        try:
            await self.bus.nc.publish(subjects.health(self.node.name), payload)
            await self.kv_health.put(self.node.name, payload)
        except Exception as exc:  # NATS away: the next round publishes again
            self.log.warning("cannot publish health", error=str(exc))
        return report

    async def _probe(self, peer: Node, alive: bool) -> PeerHealth:
        icmp, http = await asyncio.gather(
            self._ping(IPv4Address(peer.underlay_ip)),
            self._http(IPv4Address(peer.health_ip)) if peer.health_ip else _none(),
        )
        previous = self.results.get(peer.name)
        failures = 0 if http is not None else (previous.failures + 1 if previous else 1)
        result = PeerHealth(
            node=peer.name,
            icmp_ms=None if icmp is None else round(icmp * 1000, 3),
            http_ms=None if http is None else round(http * 1000, 3),
            reachable=http is not None,
            alive=alive,
            failures=failures,
        )
        if previous is None or previous.reachable != result.reachable:
            self.log.info(
                "peer node reachable" if result.reachable else "peer node unreachable",
                peer=peer.name,
            )
        self.results[peer.name] = result
        if result.reachable:
            self.reached.add(peer.name)
        for kind, seconds in (("icmp", icmp), ("http", http)):
            PEER_REACHABLE.labels(peer.name, kind).set(0 if seconds is None else 1)
            if seconds is not None:
                PEER_LATENCY.labels(peer.name, kind).set(seconds)
        return result

    async def _ping(self, address: IPv4Address) -> float | None:
        """One ICMP echo from the node; its round trip in seconds, or None."""
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        except OSError as exc:
            self.log.warning("cannot open a ping socket", error=str(exc))
            return None
        with sock:
            sock.setblocking(False)
            seq = int(time.monotonic() * 1000) & 0xFFFF
            header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, 0, seq)  # the kernel sets id, csum
            payload = os.urandom(8)
            started = time.perf_counter()
            try:
                # connected, so that a plain send works (uvloop has no sock_sendto); a datagram
                # this small never blocks
                sock.connect((str(address), 0))
                sock.send(header + payload)
                deadline = started + self.timeout
                while (left := deadline - time.perf_counter()) > 0:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 1024), left)
                    if len(data) >= 16 and data[0] == ICMP_ECHOREPLY and data[8:16] == payload:
                        return time.perf_counter() - started
            except (TimeoutError, OSError):
                return None
        return None

    async def _http(self, address: IPv4Address) -> float | None:
        """GET / from this node's health endpoint to ``address``; the round trip, or None."""
        if self.netns is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.to_thread(netns.in_netns, self.netns, _client_socket)
        except OSError as exc:
            self.log.warning("cannot open a socket in the health endpoint", error=str(exc))
            return None
        with sock:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.sock_connect(sock, (str(address), HEALTH_PORT))
                    await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
                    data = await loop.sock_recv(sock, 1024)
            except (TimeoutError, OSError):
                return None
            if not data.startswith(b"HTTP/1.0 200"):
                return None
            return time.perf_counter() - started

    def next_round_in(self) -> float:
        """The interval; a second while a peer that never answered fails (its first few
        rounds): nodes start together, and a peer's endpoint a moment late would otherwise
        read UNREACHABLE for a whole interval (`membrane status` right after `up`)."""
        starting = any(
            not r.reachable and name not in self.reached and r.failures <= STARTUP_RETRIES
            for name, r in self.results.items()
        )
        return min(self.interval, STARTUP_RETRY_S) if starting else self.interval

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_round()
            except Exception as exc:  # a round must never end the probing
                self.log.error("health round failed", error=repr(exc), exc_info=True)
            await asyncio.sleep(max(0.0, self.next_round_in() - (time.monotonic() - started)))


def _allow_ping_sockets() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 0")


async def _none() -> None:
    return None


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock
