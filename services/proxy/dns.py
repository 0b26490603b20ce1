"""The DNS proxy: queries the datapath steered here (UDP and TCP, egress DNS rules), checked
against the pod's ``rules.dns``, forwarded to the server the pod asked, answered as that server.

- UDP: one unconnected transparent socket on ``DNS_PROXY_PORT`` (the datapath assigns the
  datagrams to it, destination unchanged; ``IP_ORIGDSTADDR`` says which server was asked); the
  answer goes back from a transparent socket bound to the server's address and port.
- TCP: the transparent listener on the same port; queries in order, each length-prefixed.
- Allowed: forwarded with ``SO_MARK`` carrying the pod's identity (the datapath applies the
  L3/L4 policy to it, as to the HTTP proxy's upstream connections); the answer's addresses are
  learned (:class:`~services.proxy.fqdn_publish.FQDNPublisher`) *before* the answer goes to the
  pod (the node's agent has them in its maps; SERVFAIL when they do not get there in time).
  Denied: ``REFUSED`` (Cilium's default) and a DROPPED flow naming the query.
- Malformed (no DNS message, not exactly one question, a response instead of a query):
  dropped without an answer and counted; a TCP connection carrying one is closed. An answer
  from upstream that does not parse is dropped the same way; the pod's resolver retries.
- Sent to the proxy's own port (a pod addressing the node at ``DNS_PROXY_PORT`` itself, which
  the datapath did not redirect): dropped and counted (``source="direct"``), never forwarded --
  forwarding it would send the proxy its own query, again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address

import dns.exception
import dns.flags
import dns.message
from prometheus_client import Counter

from services.proxy import sockets
from services.proxy.dns_policy import (
    Learned,
    answers_of,
    learned,
    query_verdict,
    question,
    rcode_name,
    refused,
    servfail,
)
from services.proxy.exchange import connected
from services.proxy.view import Verdict, View
from shared import protocols
from shared.l7_wire import L7Record
from shared.messages import L7Info
from shared.proxy import from_proxy_mark

UPSTREAM_TIMEOUT_S = 2.0
MAX_INFLIGHT = 2048  # UDP queries being answered at once; more are dropped (the pod retries)
_CMSG_SPACE = socket.CMSG_SPACE(16)

QUERIES = Counter(
    "membrane_proxy_dns_queries_total",
    "DNS queries the proxy decided, by transport and verdict",
    ["transport", "verdict"],
)
MALFORMED = Counter(
    "membrane_proxy_dns_malformed_total",
    "DNS messages dropped: malformed from a pod or upstream, or sent to the proxy's port itself "
    "(direct)",
    ["source"],
)
UPSTREAM_ERRORS = Counter(
    "membrane_proxy_dns_upstream_errors_total",
    "Allowed queries the server asked did not answer in time (or refused the connection)",
)
OVERLOAD = Counter(
    "membrane_proxy_dns_overload_total",
    f"UDP queries dropped because {MAX_INFLIGHT} were already in flight",
)

Forward = Callable[[bytes, tuple[str, int], int], Awaitable[bytes]]
Learn = Callable[[str, int, Learned], Awaitable[bool]]


class DnsProxy:
    def __init__(
        self, view: View, node: str, report: Callable[[L7Record], None], learn: Learn
    ) -> None:
        self.view = view
        self.node = node
        self.report = report
        self.learn = learn
        self.port = 0
        self._udp: socket.socket | None = None
        self._tcp: asyncio.Server | None = None
        self._answering: dict[tuple[str, int], socket.socket] = {}
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.port = port
        self._udp = sockets.datagram_listener(port)
        loop.add_reader(self._udp.fileno(), self._readable)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=sockets.listener(port))

    def close(self) -> None:
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in self._inflight:
            task.cancel()
        for sock in self._answering.values():
            sock.close()

    # --- UDP ------------------------------------------------------------------------------------

    def _readable(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # then let the loop breathe
            try:
                data, ancillary, _, client = self._udp.recvmsg(65535, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            server = sockets.original_destination(ancillary)
            if server is None:
                continue
            if server[1] == self.port:  # not redirected: addressed to the proxy itself
                MALFORMED.labels("direct").inc()
                continue
            if len(self._inflight) >= MAX_INFLIGHT:
                OVERLOAD.inc()
                continue
            task = asyncio.get_running_loop().create_task(self._udp_query(data, client, server))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _udp_query(
        self, data: bytes, client: tuple[str, int], server: tuple[str, int]
    ) -> None:
        answer = await self._decide(data, client, server, "UDP", self._forward_udp)
        if answer is None:
            return
        with contextlib.suppress(OSError):
            self._answer_socket(server).sendto(answer, client)

    def _answer_socket(self, server: tuple[str, int]) -> socket.socket:
        sock = self._answering.get(server)
        if sock is None:
            sock = self._answering[server] = sockets.answering(*server)
        return sock

    @staticmethod
    async def _forward_udp(data: bytes, server: tuple[str, int], identity: int) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, from_proxy_mark(identity))
            sock.setblocking(False)
            # (not loop.sock_connect: under uvloop it sends the address through getaddrinfo on
            # libuv's thread pool, 13 us and an event-loop turn a query; a UDP connect only
            # sets the peer)
            sock.connect(server)
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                while True:
                    wire = await loop.sock_recv(sock, 65535)
                    if wire[:2] == data[:2]:  # the answer to this query (its id), nothing else
                        return wire
        finally:
            sock.close()

    # --- TCP ------------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[:2]
        server = writer.get_extra_info("sockname")[:2]  # the address the pod connected to
        if server[1] == self.port:  # not redirected: addressed to the proxy itself
            MALFORMED.labels("direct").inc()
            writer.close()
            return
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def forward(data: bytes, to: tuple[str, int], identity: int) -> bytes:
            if not upstream:
                upstream.append(await _connect_tcp(to, identity))
            up_reader, up_writer = upstream[0]
            up_writer.write(len(data).to_bytes(2, "big") + data)
            await up_writer.drain()
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                size = int.from_bytes(await up_reader.readexactly(2), "big")
                return await up_reader.readexactly(size)

        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                answer = await self._decide(data, client, server, "TCP", forward)
                if answer is None:
                    break
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            pass
        finally:
            for _, up_writer in upstream:
                up_writer.close()
            writer.close()

    # --- both -----------------------------------------------------------------------------------

    async def _decide(
        self,
        data: bytes,
        client: tuple[str, int],
        server: tuple[str, int],
        transport: str,
        forward: Forward,
    ) -> bytes | None:
        """The answer for the pod (None: none, the query is dropped)."""
        started = time.perf_counter()
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            MALFORMED.labels("pod").inc()
            return None
        asked = question(query)
        if asked is None or query.flags & dns.flags.QR:
            MALFORMED.labels("pod").inc()
            return None
        name, qtype = asked
        protocol = protocols.UDP if transport == "UDP" else protocols.TCP
        src, dst = IPv4Address(client[0]), IPv4Address(server[0])
        verdict = query_verdict(self.view, src, dst, server[1], protocol, name)
        info = L7Info(protocol="dns", query=name, qtype=qtype)
        if not verdict.allowed:
            QUERIES.labels(transport, "DROPPED").inc()
            info.rcode = "REFUSED"
            self._flow(verdict, client, server, transport, info, started)
            return refused(query)
        try:
            wire = await forward(data, server, verdict.src_identity)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            UPSTREAM_ERRORS.inc()
            return None
        try:
            answer = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            MALFORMED.labels("upstream").inc()
            return None
        names = learned(answer)
        if names and not await self.learn(client[0], verdict.src_identity, names):
            # fail closed: an answer whose addresses are not allowed yet would have its first
            # connection dropped; the pod's resolver asks again instead
            QUERIES.labels(transport, "SERVFAIL").inc()
            info.rcode = "SERVFAIL"
            self._flow(verdict, client, server, transport, info, started)
            return servfail(query)
        QUERIES.labels(transport, "FORWARDED").inc()
        info.rcode = rcode_name(answer)
        info.answers, info.ttl = answers_of(names)
        self._flow(verdict, client, server, transport, info, started)
        return wire

    def _flow(
        self,
        verdict: Verdict,
        client: tuple[str, int],
        server: tuple[str, int],
        transport: str,
        info: L7Info,
        started: float,
    ) -> None:
        info.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.report(
            L7Record(
                time.time(),
                "FORWARDED" if verdict.allowed else "DROPPED",
                "egress",
                transport,
                client[0],
                client[1],
                verdict.src_identity,
                server[0],
                server[1],
                verdict.dst_identity,
                verdict.rule_id,
                info,
            )
        )


async def _connect_tcp(
    server: tuple[str, int], identity: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, from_proxy_mark(identity))
        err = sock.connect_ex(server)  # (not loop.sock_connect: see _forward_udp)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
            await connected(sock)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)
