"""The proxy's pool of idle HTTP/1.1 upstreams, with a real upstream on loopback: a client
making a new connection per request is served over one upstream connection; a client's
``Connection: close`` is kept from the pooled upstream and said in the answer; an upstream is
not handed on when it cannot serve another client (HTTP/1.0, an answer that closes, a view
that changed, idle too long), and one the server closed while idle is replaced for a request
that may be sent again, never for one that may not. Root: the proxy marks its upstream
socket (SO_MARK).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from services.proxy import exchange
from services.proxy import http as http_module
from services.proxy import pool as pool_module
from services.proxy.connection import Accepted
from services.proxy.http import HttpConnection, without_close
from services.proxy.pool import UpstreamPool
from services.proxy.view import View
from shared.messages import L7Info
from tests.integration.proxy_views import allow_all_but_secret, still_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on the upstream: root")

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass
class Server:
    """A keep-alive HTTP server: each connection numbered, each request's head recorded as
        (connection, head). ``/closing`` is answered with ``Connection: close`` and the end;
        ``/vanish`` on a connection's second request or later: the connection closed unanswered
        (a server that timed an idle connection out as the request came); ``/idle-close``: answered
    keep-alive, then the connection closed 50 ms later (its keep-alive timeout)."""

    port: int = 0
    heads: list[tuple[int, bytes]] = field(default_factory=list)
    connections: int = 0
    ended: int = 0  # connections the proxy closed

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, served = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append((number, head))
                served += 1
                if b"/vanish" in head.split(b"\r\n")[0] and served > 1:
                    break
                if b"Content-Length: " in head:
                    await reader.readexactly(int(head.split(b"Content-Length: ")[1].split()[0]))
                closing = b"/closing" in head.split(b"\r\n")[0]
                writer.write(CLOSING if closing else ANSWER)
                await writer.drain()
                if closing:
                    break
                if b"/idle-close" in head.split(b"\r\n")[0]:
                    await asyncio.sleep(0.05)
                    break
        except asyncio.IncompleteReadError:
            self.ended += 1
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    listening = await asyncio.start_server(s.serve, "127.0.0.1", 0)
    s.port = listening.sockets[0].getsockname()[1]
    yield s
    listening.close()


@dataclass
class Proxy:
    port: int
    pool: UpstreamPool
    view: View
    reported: list[L7Info]
    failures: list[BaseException]

    async def new_connection(self, request: bytes) -> bytes:
        """``request`` on a new connection; everything answered, to the proxy's end."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[Proxy]:
    """The listener's protocol as the service makes it, with a pool, pointed at the server."""
    view = allow_all_but_secret()
    upstreams = UpstreamPool()
    reported: list[L7Info] = []
    failures: list[BaseException] = []

    class Towards(Accepted):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.conn = dataclasses.replace(self.conn, dport=server.port)

    listening = await asyncio.get_running_loop().create_server(
        lambda: Towards(view, lambda _c, _v, l7: reported.append(l7), failures.append, upstreams),
        "127.0.0.1", 0,
    )  # fmt: skip
    yield Proxy(listening.sockets[0].getsockname()[1], upstreams, view, reported, failures)
    listening.close()
    upstreams.close()
    assert not failures


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: a", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_new_connections_share_one_upstream_and_close_is_kept_from_it(
    server: Server, proxy: Proxy
) -> None:
    for i in range(5):
        answer = await proxy.new_connection(get(f"/r{i}", "Connection: close"))
        # the client's close said in the answer (the upstream's keep-alive is not passed on)
        assert answer == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"), (
            answer
        )
    assert server.connections == 1 and proxy.pool.reused == 4
    assert [n for n, _ in server.heads] == [1] * 5
    assert not any(b"onnection" in head for _, head in server.heads), server.heads
    assert [(r.url, r.status) for r in proxy.reported] == [(f"/r{i}", 200) for i in range(5)]


async def test_a_client_that_ends_its_side_hands_the_upstream_on(
    server: Server, proxy: Proxy
) -> None:
    """No Connection header (curl, http.client): the client reads its answer and ends its
    side; the upstream goes back to the pool, its keep-alive answer passed on unchanged."""
    for i in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get(f"/r{i}"))
        assert await asyncio.wait_for(reader.readexactly(len(ANSWER)), 5) == ANSWER
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert server.connections == 1 and proxy.pool.reused == 2


async def test_other_options_of_the_connection_header_are_kept() -> None:
    assert without_close(b"close") == b""
    assert without_close(b"Close, X-Trace") == b"X-Trace"
    assert without_close(b"keep-alive , close,te") == b"keep-alive, te"


@pytest.mark.parametrize(
    "request_bytes",
    [get("/a", version="1.0"), get("/closing", "Connection: close"), get("/closing")],
    ids=["http/1.0", "close-requested-and-answered", "upstream-closes"],
)
async def test_an_upstream_that_cannot_serve_another_client_is_not_kept(
    server: Server, proxy: Proxy, request_bytes: bytes
) -> None:
    for _ in range(2):
        answer = await proxy.new_connection(request_bytes)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok"), answer
    assert server.connections == 2 and proxy.pool.reused == 0 and proxy.pool.size == 0


async def test_an_upstream_is_not_reused_once_the_view_changed(
    server: Server, proxy: Proxy
) -> None:
    """The datapath judged the upstream when it was opened and does not judge an established
    connection again: after any change of the view (policy, ipcache), a new one."""
    await proxy.new_connection(get("/a", "Connection: close"))
    proxy.view.set_resolved("999", None)  # any change moves the generation
    await proxy.new_connection(get("/b", "Connection: close"))
    await proxy.new_connection(get("/c", "Connection: close"))
    assert server.connections == 2 and proxy.pool.reused == 1


async def test_an_idle_upstream_is_closed_after_a_while(
    server: Server, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "IDLE_S", 0.1)
    await proxy.new_connection(get("/a", "Connection: close"))
    assert proxy.pool.size == 1
    for _ in range(50):
        if server.ended:
            break
        await asyncio.sleep(0.02)
    assert server.ended == 1 and proxy.pool.size == 0  # closed by the proxy, not reused
    await proxy.new_connection(get("/b", "Connection: close"))
    assert server.connections == 2 and proxy.pool.reused == 0


async def test_an_upstream_the_server_closed_while_idle_leaves_the_pool(
    server: Server, proxy: Proxy
) -> None:
    await proxy.new_connection(get("/idle-close", "Connection: close"))
    for _ in range(50):  # the server ends the idle connection (its keep-alive timeout)
        if proxy.pool.size == 0:
            break
        await asyncio.sleep(0.02)
    assert proxy.pool.size == 0
    await proxy.new_connection(get("/b", "Connection: close"))
    assert server.connections == 2 and proxy.pool.reused == 0


async def test_a_get_on_an_upstream_that_vanished_is_sent_again_a_post_is_not(
    server: Server, proxy: Proxy
) -> None:
    """The server closes a pooled connection as the next request comes (it had timed it out):
    a GET is sent once more on a new connection and answered; a POST, which may not be sent
    twice, is not: it is answered 503, as when any upstream fails before answering."""
    await proxy.new_connection(get("/first", "Connection: close"))
    answer = await proxy.new_connection(get("/vanish", "Connection: close"))
    assert answer.endswith(b"connection: close\r\n\r\nok"), answer
    assert [(n, h.split(b"\r\n")[0]) for n, h in server.heads] == [
        (1, b"GET /first HTTP/1.1"),
        (1, b"GET /vanish HTTP/1.1"),
        (2, b"GET /vanish HTTP/1.1"),
    ]
    post = b"POST /vanish HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    assert (await proxy.new_connection(post)).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert server.heads[-1][0] == 2 and server.connections == 2  # once, and not again


async def test_a_pooled_upstream_holds_no_handler(server: Server, proxy: Proxy) -> None:
    """The pool holds the transport and a small protocol of its own: the handler of the
    connection that handed the upstream back goes by reference counting, as without a pool."""
    gc.collect()
    gc.disable()
    try:
        for path in ("/a", "/secret", "/b"):
            await proxy.new_connection(get(path, "Connection: close"))
        assert not await still_alive(HttpConnection)
    finally:
        gc.enable()
    assert proxy.pool.reused == 1 and proxy.pool.size == 1


async def test_an_upstream_towards_another_node_is_not_pooled_and_close_passes(
    server: Server, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Towards a pod on another node the upstream carries the client's own address and port:
    never pooled, and the client's Connection: close goes to the server as before."""
    proxy.view.elsewhere.add(IPv4Address("127.0.0.1"))

    def plain(conn: exchange.Conn, identity: int, view: View) -> socket.socket:
        # (bound to the client's port, as on a node, it would clash with the client on loopback)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.connect_ex((conn.dst_ip, conn.dport))
        return sock

    monkeypatch.setattr(http_module, "open_upstream", plain)
    for _ in range(2):
        answer = await proxy.new_connection(get("/a", "Connection: close"))
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok"), answer
    assert server.connections == 2 and proxy.pool.reused == 0 and proxy.pool.size == 0
    assert all(b"Connection: close" in head for _, head in server.heads), server.heads
