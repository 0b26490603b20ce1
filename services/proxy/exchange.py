"""What every protocol handler of the proxy shares: the connection's addresses and the report
of one request (or call) it decided, which the service turns into an ``l7`` flow and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
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
_TCP_SYN_SENT = 2  # include/net/tcp_states.h
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
    def of(cls, writer: asyncio.StreamWriter | asyncio.BaseTransport) -> Conn:
        src_ip, sport = writer.get_extra_info("peername")[:2]
        # the datapath assigned the packet to this socket unchanged: the local address of the
        # accepted connection is the one the client connected to
        dst_ip, dport = writer.get_extra_info("sockname")[:2]
        # (from the packed form: a tenth of the time parsing the text takes)
        conn = cls(_address(src_ip), sport, _address(dst_ip), dport)
        conn.__dict__.update(src_ip=src_ip, dst_ip=dst_ip)  # the cached properties, known
        return conn


def _address(text: str) -> IPv4Address:
    return IPv4Address(socket.inet_aton(text))


# called once per request, when its answer is complete (or the proxy made it)
Report = Callable[[Conn, Verdict, L7Info], None]


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), as flows carry them."""
    return round((time.perf_counter() - started) * 1000, 3)


def open_upstream(conn: Conn, identity: int, view: View) -> socket.socket:
    """The proxy's own connection to the original destination, on behalf of ``identity``:
    non-blocking, its connect started (``connect_ex``, not ``loop.sock_connect``, which sends
    every address through ``getaddrinfo`` on libuv's thread pool under uvloop: two thread
    hand-offs and an event-loop turn per connection). To a pod on this machine the handshake
    is done when the call returns (the SYN, the peer's SYN-ACK and the ACK run in this
    syscall's softirq), so what is written at once goes out at once; :func:`connecting`
    tells. A failure the kernel knows at once raises ``OSError``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        # the datapath lets this connection through on the L3/L4 policy, as the client
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, from_proxy_mark(identity))
        if conn.dst in view.elsewhere:
            # a pod on another node: the upstream leaves as the client itself, its address and
            # port (a transparent socket), so that the far node judges the client's identity
            # and answers the client's address; this node's datapath hands those answers to
            # this socket, since the client's own connection is the proxy's (bpf/overlay.h
            # from_overlay, bpf/nodeport.h native_to_proxy). SO_REUSEADDR: the client may use
            # one port towards several servers.
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((conn.src_ip, conn.sport))
        err = sock.connect_ex((conn.dst_ip, conn.dport))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def connecting(sock: socket.socket) -> bool:
    """Whether the handshake is still under way (``TCP_INFO``'s state: false once connected,
    and once failed too, which ``SO_ERROR`` and the next read or write tell)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_SYN_SENT


async def upstream_socket(conn: Conn, identity: int, view: View) -> socket.socket:
    """:func:`open_upstream`, connected (within ``CONNECT_TIMEOUT_S``)."""
    sock = open_upstream(conn, identity, view)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):  # no task, as wait_for makes
            await connected(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def connected(sock: socket.socket) -> None:
    """The end of a non-blocking TCP connect started with ``connect_ex``: at once when the
    handshake is over, else when the socket is writable; ``OSError`` when it failed."""
    if connecting(sock):
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not writable.done():
                writable.set_result(None)

        loop.add_writer(sock, ready)
        try:
            await writable
        finally:
            loop.remove_writer(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


# what a client is answered (503, gRPC UNAVAILABLE) when the proxy cannot reach its upstream
UNREACHABLE = "upstream connect error"


def upstream_failure(exc: OSError) -> str:
    """Why an upstream could not be reached, as a flow shows it: ``upstream connect error:
    Connection refused``."""
    if isinstance(exc, TimeoutError) and not exc.strerror:
        return f"{UNREACHABLE}: timed out"
    return f"{UNREACHABLE}: {exc.strerror or exc or type(exc).__name__}"


async def connect_upstream(
    conn: Conn, identity: int, view: View
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`upstream_socket` as streams."""
    sock = await upstream_socket(conn, identity, view)
    return await asyncio.open_connection(sock=sock, limit=READ_SIZE)


class Judged:
    """What every protocol's connection handler holds: the connection, the view its requests
    are judged by, and where its reports go."""

    def __init__(self, view: View, conn: Conn, report: Report) -> None:
        self.view = view
        self.conn = conn
        self.report = report
        self._found: Lookup | None = None

    def _lookup(self) -> Lookup:
        """What restricts this connection, kept while the view has not changed: each request
        is still judged on its own, against the view as it is when the request came."""
        found = self._found
        if found is None or found.generation != self.view.generation:
            conn = self.conn
            found = self._found = self.view.lookup(conn.src, conn.dst, conn.dport)
        return found


class Handler(Judged):
    """A handler reading streams: the client's side, its upstream (once a request was
    allowed)."""

    def __init__(
        self,
        view: View,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        report: Report,
    ) -> None:
        super().__init__(view, Conn.of(writer), report)
        self.reader = reader
        self.writer = writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None

    def close_both(self) -> None:
        for writer in (self.writer, self.up_writer):
            if writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()
