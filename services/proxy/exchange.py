"""What every protocol handler of the proxy shares: the connection's addresses and the report
of one request (or call) it decided, which the service turns into an ``l7`` flow and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from services.proxy.sockets import IP_TRANSPARENT
from services.proxy.view import Lookup, Verdict, View
from shared.messages import L7Info
from shared.proxy import from_proxy_mark

CONNECT_TIMEOUT_S = 5.0
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Conn:
    """A connection the datapath steered here: the client and the destination it asked for."""

    src: IPv4Address
    sport: int
    dst: IPv4Address
    dport: int

    # the addresses as text, made once per connection (each of its flows carries them)
    @functools.cached_property
    def src_ip(self) -> str:
        return str(self.src)

    @functools.cached_property
    def dst_ip(self) -> str:
        return str(self.dst)

    @classmethod
    def of(cls, writer: asyncio.StreamWriter) -> Conn:
        src_ip, sport = writer.get_extra_info("peername")[:2]
        # the datapath assigned the packet to this socket unchanged: the local address of the
        # accepted connection is the one the client connected to
        dst_ip, dport = writer.get_extra_info("sockname")[:2]
        return cls(IPv4Address(src_ip), sport, IPv4Address(dst_ip), dport)


# called once per request, when its answer is complete (or the proxy made it)
Report = Callable[[Conn, Verdict, L7Info], None]


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), as flows carry them."""
    return round((time.perf_counter() - started) * 1000, 3)


async def upstream_socket(conn: Conn, identity: int, view: View) -> socket.socket:
    """The proxy's own connection to the original destination, on behalf of ``identity``:
    connected, non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # the datapath lets this connection through on the L3/L4 policy, as the client
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, from_proxy_mark(identity))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.dst in view.elsewhere:
            # a pod on another node: the upstream leaves as the client itself, its address and
            # port (a transparent socket), so that the far node judges the client's identity
            # and answers the client's address; this node's datapath hands those answers to
            # this socket, since the client's own connection is the proxy's (bpf/overlay.h
            # from_overlay, bpf/nodeport.h native_to_proxy). SO_REUSEADDR: the client may use
            # one port towards several servers.
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(conn.src), conn.sport))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        address = (str(conn.dst), conn.dport)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):  # no task of its own, as wait_for makes
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_upstream(
    conn: Conn, identity: int, view: View
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`upstream_socket` as streams."""
    sock = await upstream_socket(conn, identity, view)
    return await asyncio.open_connection(sock=sock, limit=READ_SIZE)


class Handler:
    """What every protocol's connection handler holds: the client's side, its upstream (once
    a request was allowed), and where its reports go."""

    def __init__(
        self,
        view: View,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        report: Report,
    ) -> None:
        self.view = view
        self.reader = reader
        self.writer = writer
        self.report = report
        self.conn = Conn.of(writer)
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self._found: Lookup | None = None

    def _lookup(self) -> Lookup:
        """What restricts this connection, kept while the view has not changed: each request
        is still judged on its own, against the view as it is when the request came."""
        found = self._found
        if found is None or found.generation != self.view.generation:
            conn = self.conn
            found = self._found = self.view.lookup(conn.src, conn.dst, conn.dport)
        return found

    def close_both(self) -> None:
        for writer in (self.writer, self.up_writer):
            if writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()
