"""The proxy with a real upstream on loopback: what the upstream answers comes back whole and in
order (HTTP/1.1), an upstream that refuses, never answers or resets is answered 503 (HTTP/1.1)
or per stream (HTTP/2). Root: the proxy marks its upstream socket (SO_MARK).

The connection handler is pointed at the upstream by its ``conn`` (on a node it is the address
the client asked for, which on loopback would be the proxy's own listener).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import pytest

from services.proxy import http
from services.proxy.connection import Accepted
from services.proxy.http import HttpConnection
from shared.messages import L7Info
from tests.integration.proxy_views import allow_all_but_secret, still_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on the upstream: root")

HEAD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
CHUNKED_ANSWER = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
    b"5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n"
)
PLAIN_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG_BODY = bytes(range(256)) * (16 << 10)  # 4 MiB: far over every socket and write buffer
BIG_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY) + BIG_BODY


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP server of canned answers: HEAD /x, POST /chunked, GET /big, anything else. It
    records what reached it (the requests' bytes); it closes only after the proxy did."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while data := await reader.read(65536):
            buffer += data
            seen.append(data)
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                if head.startswith(b"POST /chunked"):
                    end = rest.find(b"\r\n0\r\n")
                    tail = rest.find(b"\r\n\r\n", end + 5) if end >= 0 else -1
                    if tail < 0:
                        break  # the body is not whole yet
                    buffer = rest[tail + 4 :]
                    writer.write(CHUNKED_ANSWER)
                elif head.startswith(b"GET /big"):
                    buffer = rest
                    writer.write(BIG_ANSWER)
                else:
                    buffer = rest
                    writer.write(HEAD_ANSWER if head.startswith(b"HEAD") else PLAIN_ANSWER)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()
    await server.wait_closed()


async def through_proxy(
    port: int, data: bytes, until: Callable[[bytes], bool]
) -> tuple[bytes, list[L7Info]]:
    reported: list[L7Info] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = HttpConnection.of_streams(
            allow_all_but_secret(), reader, writer, lambda _c, _v, l7: reported.append(l7)
        )
        handler.conn = dataclasses.replace(handler.conn, dport=port)
        await handler.run()

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(data)
    answer = b""
    while not until(answer):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, answer
        answer += chunk
    writer.close()
    proxy.close()
    await proxy.wait_closed()
    return answer, reported


async def test_answers_to_head_have_no_body_and_the_next_answer_follows(
    upstream: tuple[int, list[bytes]],
) -> None:
    port, _ = upstream
    requests = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n" * 2 + b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
    answer, reported = await through_proxy(port, requests, lambda a: a.endswith(b"\r\n\r\nok"))
    assert answer.count(b"Content-Length: 1234") == 2 and answer.endswith(PLAIN_ANSWER), answer
    assert [(r.method, r.status) for r in reported] == [("HEAD", 200), ("HEAD", 200), ("GET", 200)]


async def test_chunked_trailers_pass_both_ways(upstream: tuple[int, list[bytes]]) -> None:
    port, seen = upstream
    request = (
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-request-sum: 7\r\n\r\n"
    )
    answer, _ = await through_proxy(
        port, request, lambda a: b"hello\r\n0\r\n" in a and a.endswith(b"\r\n\r\n")
    )
    assert answer.endswith(b"0\r\nx-checksum: 42\r\n\r\n"), answer
    assert b"5\r\nhello\r\n" in answer
    assert b"".join(seen).endswith(b"0\r\nx-request-sum: 7\r\n\r\n"), seen


async def test_a_denied_request_never_reaches_the_upstream(
    upstream: tuple[int, list[bytes]],
) -> None:
    port, seen = upstream
    requests = b"GET /secret HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\n\r\n"
    answer, reported = await through_proxy(port, requests, lambda a: a.endswith(b"\r\n\r\nok"))
    assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(PLAIN_ANSWER), answer
    assert b"/secret" not in b"".join(seen) and b"GET /ok" in b"".join(seen), seen
    assert [r.status for r in reported] == [403, 200]


async def proxy_for(port: int, reported: list[L7Info]) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = HttpConnection.of_streams(
            allow_all_but_secret(), reader, writer, lambda _c, _v, l7: reported.append(l7)
        )
        handler.conn = dataclasses.replace(handler.conn, dport=port)
        await handler.run()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_a_client_that_ends_its_side_gets_the_answers_owed_then_the_end(
    upstream: tuple[int, list[bytes]],
) -> None:
    """A client's end (a half-close after its last request) ends the connection once its
    answers went out, while the upstream still holds its side open (before, the proxy waited
    for the upstream to close: never, here)."""
    port, _ = upstream
    reported: list[L7Info] = []
    proxy = await proxy_for(port, reported)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /secret HTTP/1.1\r\nHost: a\r\n\r\n")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 2)  # read to the end
    writer.close()
    proxy.close()
    await proxy.wait_closed()
    assert answer.startswith(PLAIN_ANSWER) and answer.count(b"HTTP/1.1 ") == 2, answer
    assert [r.status for r in reported] == [200, 403]


async def test_a_big_answer_to_a_slow_reader_comes_whole(upstream: tuple[int, list[bytes]]) -> None:
    """4 MiB to a client that reads late: the proxy stops reading the upstream while the
    client's side is full and starts again as it drains (nothing lost, nothing doubled)."""
    port, _ = upstream
    reported: list[L7Info] = []
    proxy = await proxy_for(port, reported)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0.3)  # the buffers on the way fill up
    answer = await asyncio.wait_for(reader.readexactly(len(BIG_ANSWER) + len(PLAIN_ANSWER)), 5)
    writer.close()
    proxy.close()
    await proxy.wait_closed()
    assert answer == BIG_ANSWER + PLAIN_ANSWER
    assert [r.url for r in reported] == ["/big", "/after"]


@pytest.mark.parametrize("batch", range(2))
async def test_fuzzed_answers_never_crash_the_proxy(batch: int) -> None:
    """Whatever the upstream answers (its canned answers mutated, fixed seed), the handler ends
    cleanly: a broken answer ends that connection only."""
    rng = random.Random(20261205 + batch)
    valid = HEAD_ANSWER + CHUNKED_ANSWER + PLAIN_ANSWER
    requests = (
        b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    for _ in range(25):
        garbled = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(garbled))
            if rng.random() < 0.5:
                garbled[at] = rng.randrange(256)
            else:
                del garbled[at : at + rng.randint(1, 8)]
        await _one_fuzzed(bytes(garbled), requests)


async def _one_fuzzed(answer: bytes, requests: bytes) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    failures: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = HttpConnection.of_streams(allow_all_but_secret(), reader, writer, lambda *_: None)
        handler.conn = dataclasses.replace(handler.conn, dport=server.sockets[0].getsockname()[1])
        try:
            await handler.run()
        except BaseException as exc:
            failures.append(exc)

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(requests)
    await asyncio.wait_for(reader.read(), 5)  # the proxy closes when the upstream did
    writer.close()
    for s in (proxy, server):
        s.close()
        await s.wait_closed()
    assert not failures, (answer, failures)


async def test_grpc_calls_to_a_refusing_upstream_are_unavailable_and_the_connection_stays() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    refusing = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(refusing, reported, failures)  # HTTP/2 by its preface
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for sid in (1, 3):
        client.send_headers(
            sid,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"),
             (b":authority", b"a"), (b"content-type", b"application/grpc")],
            end_stream=True,
        )  # fmt: skip
    writer.write(client.data_to_send())
    answers: list[h2.events.ResponseReceived] = []
    while len(answers) < 2:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, answers
        answers += [
            e for e in client.receive_data(data) if isinstance(e, h2.events.ResponseReceived)
        ]
    writer.close()
    proxy.close()
    await proxy.wait_closed()
    assert [dict(a.headers)[b"grpc-status"] for a in answers] == [b"14", b"14"]
    assert [(r.grpc_status, r.status) for r in reported] == [(14, 200), (14, 200)]
    assert {r.error for r in reported} == {"upstream connect error: Connection refused"}
    assert not failures


class _Towards(Accepted):
    """The listener's protocol as the service makes it, pointed at ``port`` (on a node the
    upstream is the address the client asked for: on loopback, the proxy itself)."""

    port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn = dataclasses.replace(self.conn, dport=self.port)


async def listening_towards(
    port: int, reported: list[L7Info], failures: list[BaseException]
) -> asyncio.Server:
    towards = type("Towards", (_Towards,), {"port": port})
    return await asyncio.get_running_loop().create_server(
        lambda: towards(allow_all_but_secret(), lambda _c, _v, l7: reported.append(l7),
                        failures.append),
        "127.0.0.1", 0,
    )  # fmt: skip


async def test_new_connections_through_the_listener_leave_no_cycles(
    upstream: tuple[int, list[bytes]],
) -> None:
    """New connections, each with one request (allowed, then denied) and Connection: close,
    through the listener's protocol: answered, and once ended, nothing of them is left for the
    cycle collector (the parsers and the transports hold the handler: it lets them go when the
    connection ends, and a connection's objects go by reference counting; before, ~40 objects
    a connection waited for a collector pass, a tenth of the proxy's time per connection)."""
    port, seen = upstream
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(port, reported, failures)
    gc.collect()
    gc.disable()
    try:
        for path in ("/a", "/secret", "/b"):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.sockets[0].getsockname()[1]
            )
            writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the proxy closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 403" if path == "/secret" else PLAIN_ANSWER)
        assert not await still_alive(HttpConnection, _Towards)
    finally:
        gc.enable()
        proxy.close()
        await proxy.wait_closed()
    assert [(r.url, r.status) for r in reported] == [("/a", 200), ("/secret", 403), ("/b", 200)]
    assert not failures
    assert all(b"secret" not in data for data in seen)


async def test_an_upstream_that_never_answers_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream whose SYNs go unanswered (here: a listener whose accept queue is full; on a
    node, a connection the far end's policy drops): the client is answered 503 and its
    connection closed after CONNECT_TIMEOUT_S, not after the kernel's own SYN retries
    (minutes)."""
    monkeypatch.setattr(http, "CONNECT_TIMEOUT_S", 0.3)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # never accepted: one connection fills the queue, later SYNs are dropped
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    await asyncio.sleep(0.1)
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(full.getsockname()[1], reported, failures)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1]
        )
        writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 5)
        waited = time.monotonic() - started
        writer.close()
    finally:
        proxy.close()
        await proxy.wait_closed()
        for s in (full, *fillers):
            s.close()
    assert answer == UNAVAILABLE and 0.2 < waited < 2, (answer, waited)
    assert [(r.url, r.status, r.error) for r in reported] == [
        ("/a", 503, "upstream connect error: timed out")
    ]
    assert not failures


UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 24\r\ncontent-type: text/plain\r\n"
    b"connection: close\r\n\r\nupstream connect error\r\n"
)


async def test_an_upstream_that_refuses_is_answered_503_and_the_rest_end_unanswered() -> None:
    """As Envoy answers: the client learns the upstream failed, and its flow says why; the
    requests pipelined behind it end with the connection (a client sends those again)."""
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    refusing = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(refusing, reported, failures)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /secret HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    proxy.close()
    await proxy.wait_closed()
    assert answer == UNAVAILABLE, answer
    assert [(r.method, r.url, r.status, r.error) for r in reported] == [
        ("POST", "/a", 503, "upstream connect error: Connection refused")
    ]
    assert not failures


async def test_an_upstream_that_closes_before_answering_is_answered_503() -> None:
    """A server that reads the request and closes (or resets) without an answer: 503 with the
    reset's text; one that answers ``Connection: close`` first ends the client's connection
    after that answer, and the request pipelined behind it ends unanswered (the client was
    told the connection closes, and sends it again)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /close"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(server.sockets[0].getsockname()[1], reported, failures)
    answers = []
    for requests in (
        b"GET /vanish HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /close HTTP/1.1\r\nHost: a\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1]
        )
        writer.write(requests)
        answers.append(await asyncio.wait_for(reader.read(), 2))
        writer.close()
    proxy.close()
    await proxy.wait_closed()
    server.close()
    await server.wait_closed()
    assert answers == [
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 33\r\ncontent-type: text/plain\r\n"
        b"connection: close\r\n\r\nupstream reset before answering\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    ], answers
    assert [(r.url, r.status, r.error) for r in reported] == [
        ("/vanish", 503, "upstream reset before answering"),
        ("/close", 200, ""),
    ]
    assert not failures


CLOSING_CLIENT = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
late = 0
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /a HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n")
    answer = b""
    while not answer.endswith(b"\\r\\n\\r\\nok"):
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    sock.setblocking(False)
    try:
        late += sock.recv(65536) != b""  # (data after the answer: counted as late too)
    except BlockingIOError:
        late += 1  # the proxy's end not there yet: this client would close first
    sock.close()
print(late)
"""


async def test_the_end_comes_with_the_last_answer(upstream: tuple[int, list[bytes]]) -> None:
    """A client that asked for Connection: close finds the proxy's end (FIN) with the answer,
    so it never closes first: a client closing first keeps the connection's TIME_WAIT in its
    own namespace, and a client making new connections fast runs out of ports (through the
    proxy about half its connections did, against 1 % straight to a server that closes)."""
    port, _ = upstream
    reported: list[L7Info] = []
    failures: list[BaseException] = []
    proxy = await listening_towards(port, reported, failures)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLOSING_CLIENT, str(proxy.sockets[0].getsockname()[1]), "300",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(client.communicate(), 30)
    proxy.close()
    await proxy.wait_closed()
    assert client.returncode == 0 and int(out) == 0, out
    assert len(reported) == 300 and not failures
