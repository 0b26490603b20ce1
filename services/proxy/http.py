"""One client connection the datapath steered to the proxy: HTTP/1.1, each request on its own.

Requests are parsed with httptools (llhttp) and written again to the upstream connection:
request line, the headers as received, the body (chunked bodies re-chunked as they arrive, so
nothing is buffered whole). Each request is checked when its headers are complete; a denied one
is answered here with ``403 Access denied`` and its body is read and dropped, so the connection
stays usable (keep-alive, pipelining). Responses go back in request order: answers made here
wait for the upstream's answers to the requests before them, which the response parser counts.

- ``Expect: 100-continue``: forwarded when allowed (the upstream's 100 is passed on); denied,
  the 403 comes at once and the connection is closed after it (the client may never send the
  body, and what it sends next could not be told apart from it);
- ``Upgrade``: an allowed upgrade request is forwarded and the connection becomes a plain
  byte pipe; a denied one gets 403 and the connection is closed;
- malformed request -> ``400`` and close; a header block over ``MAX_HEADER_BYTES`` -> ``431``
  and close. Nothing a client sends ends the proxy: errors end that connection only.
- an upstream that cannot be reached, or ends before it began the answer to the request at the
  head of the line -> ``503`` for that request and close, as Envoy answers, with the cause in
  its flow; the requests pipelined behind it end with the connection.

- chunked bodies keep their trailer section, both ways; answers to ``HEAD`` have no body,
  whatever length their head announces.

Both sides are asyncio Protocols (the client's transport taken over from the stream the
listener made, once the first bytes told HTTP/1.1): what arrives is parsed in ``data_received``
and written to the other side in the same callback. A client that ends its side gets the
answers it is owed, then the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from services.proxy.exchange import (
    CONNECT_TIMEOUT_S,
    UNREACHABLE,
    Conn,
    Judged,
    Report,
    connecting,
    elapsed_ms,
    open_upstream,
    upstream_failure,
)
from services.proxy.pool import Key, UpstreamPool
from services.proxy.view import Verdict, View
from shared.messages import L7Info

MAX_HEADER_BYTES = 64 * 1024  # Envoy's default limit is 60 KiB

DENIED_BODY = b"Access denied\r\n"
UNREACHABLE_BODY = f"{UNREACHABLE}\r\n".encode()
RESET_BODY = b"upstream reset before answering\r\n"
_KEYS: dict[bytes, str] = {}  # header names as received -> as rules match them (lower case)
_LINE_ENDS = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}


def last_chunk(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The end of a chunked body, with its trailer section."""
    return b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers) + b"\r\n"


def without_close(value: bytes) -> bytes:
    """A ``Connection`` header's value without its ``close`` option."""
    return b", ".join(
        option for part in value.split(b",") if (option := part.strip()).lower() != b"close"
    )


def local_response(status: int, reason: str, body: bytes, *, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
        f"content-type: text/plain\r\n{'connection: close' if close else ''}"
    ).rstrip()
    return head.encode() + b"\r\n\r\n" + body


@dataclass(slots=True)
class Request:
    """A request in flight: what a flow reports about it, and how its answer is made."""

    method: str
    url: str
    host: str
    verdict: Verdict
    started: float
    keep_alive: bool
    local: bytes = b""  # the answer made here (denied); empty: the upstream answers
    close_after: bool = False
    status: int = 0
    # its Connection: close kept from the pooled upstream: the proxy closes the client's
    # connection after the answer, and says so in it
    close_kept: bool = False
    error: str = ""  # why the proxy answered for an upstream that failed (503)

    def l7(self) -> L7Info:
        return L7Info(
            protocol="http",
            method=self.method,
            url=self.url,
            host=self.host,
            status=self.status,
            latency_ms=elapsed_ms(self.started),
            error=self.error,
        )


@dataclass(slots=True)
class _Parsing:
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)  # of a chunked body
    size: int = 0
    chunked: bool = False
    allowed: bool = False
    request: Request | None = None


class HeadersTooLarge(Exception):
    pass


class HttpConnection(Judged, asyncio.Protocol):
    def __init__(
        self,
        view: View,
        client: asyncio.Transport,
        report: Report,
        conn: Conn | None = None,
        failed: Callable[[BaseException], None] | None = None,
        pool: UpstreamPool | None = None,
    ) -> None:
        """``failed``: told what a callback failed with (a bug), unless :meth:`run` is
        awaited, which raises it. ``pool``: where upstreams are taken from and handed back
        (none: each connection opens its own and closes it)."""
        super().__init__(view, conn or Conn.of(client), report)
        self.client = client
        self.failed = failed
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.cur = _Parsing()
        self.pending: deque[Request] = deque()  # in request order, awaiting their answers
        self.answered: list[Request] = []  # answers complete, not reported yet
        self.to_upstream: list[bytes] = []
        self.to_client: list[bytes] = []
        self.response: _Response | None = None
        self.head_buffer = bytearray()  # the head of an answer to HEAD, until it is whole
        self.closing = False
        self.upgraded = False
        # llhttp keeps an unfinished header line whole: bound what it may hold
        self.in_head = False
        self.head_fed = 0
        self.too_large = False

    # --- httptools request callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.cur = _Parsing()
        self.in_head = True
        self.in_request = True

    def on_url(self, data: bytes) -> None:
        self.cur.url += data
        self._count(len(data))

    def on_header(self, name: bytes, value: bytes) -> None:
        # after the head: the trailer section of a chunked body
        (self.cur.headers if self.in_head else self.cur.trailers).append((name, value))
        self._count(len(name) + len(value) + 4)

    def _count(self, size: int) -> None:
        self.cur.size += size
        if self.cur.size > MAX_HEADER_BYTES:
            self.too_large = True
            raise HeadersTooLarge

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_fed = 0
        cur, parser = self.cur, self.parser
        method = parser.get_method().decode("latin-1")
        url = cur.url.decode("latin-1")
        headers: dict[str, str] = {}
        for name, value in cur.headers:
            key = _KEYS.get(name)
            if key is None:
                key = name.decode("latin-1").lower()
                if len(_KEYS) < 4096:  # the names clients send: bounded all the same
                    _KEYS[name] = key
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        cur.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        verdict = self.view.http_on(self._lookup(), method, url, headers)
        keep_alive = parser.should_keep_alive()
        request = Request(
            method, url, headers.get("host", ""), verdict, time.perf_counter(), keep_alive
        )
        cur.request = request
        cur.allowed = verdict.allowed
        if verdict.allowed:
            version = parser.get_http_version()
            line_end = _LINE_ENDS.get(version) or f" HTTP/{version}\r\n".encode()
            head: list[bytes | bytearray] = [method.encode("latin-1"), b" ", cur.url, line_end]
            # the upstream may be handed to the next client (pool.py) when every request on it
            # is HTTP/1.1 and none an upgrade; a client's "close" is then kept from it, as
            # Envoy does (the option is the connection's, not the request's: RFC 9110 7.6.1)
            poolable = version == "1.1" and not parser.should_upgrade()
            if not poolable:
                self.keep_upstream = self.replayable = False
            elif (
                method not in _REPLAYABLE
                or cur.chunked
                or headers.get("content-length", "0") != "0"
            ):
                self.replayable = False
            strip = (
                poolable
                and self.pool is not None
                and "close" in headers.get("connection", "").lower()
                and self.conn.dst not in self.view.elsewhere  # (never pooled: see _connect)
            )
            request.close_kept = strip
            for name, value in cur.headers:
                if strip and name.lower() == b"connection":
                    value = without_close(value)
                    if not value:
                        continue
                head += (name, b": ", value, b"\r\n")
            head.append(b"\r\n")
            self.to_upstream.append(b"".join(head))
            self.pending.append(request)
            return
        expects = headers.get("expect", "").lower() == "100-continue"
        body = cur.chunked or int(headers.get("content-length", "0") or 0) > 0
        request.close_after = not keep_alive or parser.should_upgrade() or (expects and body)
        request.status = 403
        request.local = local_response(403, "Forbidden", DENIED_BODY, close=request.close_after)
        self.pending.append(request)
        self._answer_local()

    def on_body(self, data: bytes) -> None:
        if not self.cur.allowed:
            return
        if self.cur.chunked:
            self.to_upstream += (f"{len(data):x}\r\n".encode(), data, b"\r\n")
        else:
            self.to_upstream.append(data)

    def on_message_complete(self) -> None:
        self.in_request = False
        if self.cur.allowed and self.cur.chunked:
            self.to_upstream.append(last_chunk(self.cur.trailers))

    # --- answers --------------------------------------------------------------------------------

    def _answer_local(self) -> None:
        """Answers made here, as far as they are at the head of the line."""
        while self.pending and self.pending[0].local:
            request = self.pending.popleft()
            self.to_client.append(request.local)
            self._done(request)
            if request.close_after:
                self.closing = True
                return

    def _done(self, request: Request) -> None:
        self.answered.append(request)  # reported once its answer is written (_flush)
        if not request.keep_alive:
            self.closing = True

    def response_complete(self, status: int) -> None:
        if not self.pending:
            return
        request = self.pending.popleft()
        request.status = status
        self._done(request)
        self._answer_local()

    # --- I/O --------------------------------------------------------------------------------------
    # Protocols, not streams: the loop calls data_received as the bytes arrive and what they
    # make is written to the other side's transport in the same callback, no task woken and no
    # future per read (with streams each request cost a wake-up of the client's task and of the
    # upstream's pump on top of the loop's own). Flow control: a side whose transport's write
    # buffer is over its high-water mark pauses reading from the other side until it drained.

    @classmethod
    def of_streams(
        cls,
        view: View,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        report: Report,
    ) -> HttpConnection:
        """A connection already made into streams (tests, benchmarks): its transport taken
        over, with whatever the reader still holds (no public way to take it without a read,
        a wake-up), when :meth:`run` starts."""
        handler = cls(view, writer.transport, report)  # type: ignore[arg-type]
        handler.stream_reader = reader
        return handler

    stream_reader: asyncio.StreamReader | None = None

    async def run(self, first: bytes = b"") -> None:
        """Serve the connection (:meth:`start`) until both sides are closed, raising what a
        callback failed with."""
        self.waiter = asyncio.get_running_loop().create_future()
        eof = False
        if self.stream_reader is not None:
            buffered: bytearray = getattr(self.stream_reader, "_buffer", bytearray())
            first += bytes(buffered)
            eof = bool(getattr(self.stream_reader, "_eof", False))
            buffered.clear()
        self.start(first, eof=eof)
        await self.waiter
        if self.error is not None:
            raise self.error

    def start(self, first: bytes, *, eof: bool) -> None:
        """Take the client's transport over and serve it by callbacks; ``first``: what was
        already read from it, ``eof``: whether the client ended its side after it."""
        self.loop = asyncio.get_running_loop()
        self.client.set_protocol(self)
        self.client.resume_reading()  # (a stream's reader may have paused it)
        if first:
            self.data_received(first)
        if eof:
            self.eof_received()

    # the class attributes are what they are before start() and the upstream
    waiter: asyncio.Future[None] | None = None  # run()'s
    finished = False
    upstream: asyncio.Transport | None = None
    connecting: asyncio.Task[None] | None = None
    error: BaseException | None = None
    client_ended = False  # the client sent its end: close once the answers owed are out
    holds: frozenset[str] = frozenset()  # why the client's side is not read
    in_request = False  # between a request's first byte and its end
    # the upstream, pooled: its key, the view's generation when it was opened (it is never
    # reused under another), whether it may go back (every request on it HTTP/1.1, no upgrade,
    # every answer keep-alive, nothing failed)
    pool_key: Key | None = None
    generation = 0
    keep_upstream = True
    # an answer said the upstream closes after it: what was pipelined behind ends unanswered
    upstream_said_close = False
    # what was sent on an upstream taken from the pool before its first answer came: sent again
    # on a new connection if the server had closed it meanwhile, when every request in it is
    # a GET, HEAD or OPTIONS without a body
    replay: list[bytes] | None = None
    replayable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # the transport was taken over in start()

    def data_received(self, data: bytes) -> None:
        try:
            self._from_client(data)
        except Exception as exc:  # a bug, not the client's input: end this connection only
            self._fault(exc)

    def eof_received(self) -> bool:
        self.client_ended = True
        self._maybe_close()
        return True  # half-open: the answers still owed go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> None:
        """The client's side is closed (or a callback failed): the upstream too, and an
        upstream still being connected is dropped."""
        if self.finished:
            return
        self.finished = True
        self._report()  # (after a fault: what was answered before it)
        if self.connecting is not None:
            self.connecting.cancel()
        self.close_both()
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif self.error is not None and self.failed is not None:
            self.failed(self.error)
        self._let_go()

    def _let_go(self) -> None:
        """Drop what refers back to this handler (the parsers call it, the transports hold it
        as their protocol, the upstream's callbacks too): the connection's objects are then
        freed at once by reference counting, not left as cycles for the collector to find
        (about 40 objects a connection, a tenth of the proxy's time per new connection)."""
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.set_protocol(_SPENT)
        self.parser = _SPENT_PARSER
        if self.response is not None:
            self.response.parser = _SPENT_RESPONSE_PARSER
            self.response = None
        self.connecting = None

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading the upstream, and the client itself (its
        denied requests, pipelined, would pile up their 403s here)."""
        self._hold("client", True)
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._hold("client", False)
        if self.upstream is not None:
            self.upstream.resume_reading()

    def _hold(self, reason: str, held: bool) -> None:
        holds = self.holds | {reason} if held else self.holds - {reason}
        if bool(holds) != bool(self.holds) and not self.client.is_closing():
            if holds:
                self.client.pause_reading()
            else:
                self.client.resume_reading()
        self.holds = holds

    def _fault(self, exc: BaseException) -> None:
        self.keep_upstream = False
        self.error = exc
        self._finish()

    def close_both(self) -> None:
        self.closing = True
        end_now(self.client)
        self.client.close()  # what is buffered is still sent
        upstream = self.upstream
        if upstream is not None:
            if self._idle_upstream():
                assert self.pool is not None and self.pool_key is not None
                self.upstream = None
                self.pool.put(self.pool_key, upstream, self.generation)
            else:
                upstream.close()

    def _idle_upstream(self) -> bool:
        """The upstream is between answers and may serve another client (pool.py)."""
        upstream, response = self.upstream, self.response
        return (
            self.keep_upstream
            and self.pool_key is not None
            and upstream is not None
            and response is not None
            and not response.in_message
            and self.error is None
            and not (self.pending or self.to_upstream or self.head_buffer or self.upgraded)
            and not (self.in_request and self.cur.allowed)  # a body half sent
            and (self.connecting is None or self.connecting.done())
            and not upstream.is_closing()
            and upstream.is_reading()
            and not upstream.get_write_buffer_size()
        )

    def _from_client(self, data: bytes) -> None:
        if self.closing:
            return
        if self.upgraded:
            assert self.upstream is not None
            self.upstream.write(data)
            return
        try:
            self.parser.feed_data(data)
            if self.in_head:
                self.head_fed += len(data)
                if self.head_fed > 2 * MAX_HEADER_BYTES:
                    self.too_large = True
                    raise HeadersTooLarge
        except HeadersTooLarge:
            self._fail(431, "Request Header Fields Too Large")
        except httptools.HttpParserUpgrade as upgrade:
            if self.cur.allowed:
                self.upgraded = True
                self.to_upstream.append(data[upgrade.args[0] :])
            else:
                self.closing = True
        except httptools.HttpParserError:
            # an exception raised in a callback comes out wrapped
            if self.too_large:
                self._fail(431, "Request Header Fields Too Large")
            else:
                self._fail(400, "Bad Request")
        if self.to_upstream:
            if self.upstream is None:
                if self.connecting is None:
                    self._connect(self.pending[-1].verdict.src_identity)
                if self.to_upstream:  # what was not sent yet: no more of it until connected
                    self._hold("connecting", True)
            else:
                data = b"".join(self.to_upstream)
                self.to_upstream.clear()
                self.upstream.write(data)
                if self.replay is not None:
                    if self.replayable:
                        self.replay.append(data)
                    else:
                        self.replay = None
        self._flush()
        self._maybe_close()

    def _connect(self, identity: int) -> None:
        """The upstream connection, for the first allowed request: an idle one from the pool
        when there is one, else the connect started and what is to send sent in this callback
        (to a pod on this machine the handshake is over when the connect returns), the
        transport made in a task (uvloop has no other way)."""
        conn = self.conn
        if self.pool is not None and conn.dst not in self.view.elsewhere:
            # (an upstream towards another node is bound to the client's own port: never pooled)
            key = self.pool_key = (conn.src_ip, identity, conn.dst_ip, conn.dport)
            upstream = self.pool.take(key, self.view.generation)
            if upstream is not None:
                data = b"".join(self.to_upstream)
                self.to_upstream.clear()
                self.upstream = upstream
                self.generation = self.view.generation
                upstream.set_protocol(_Upstream(self))
                self.response = _Response(self)
                self.replay = [data] if self.replayable else None
                upstream.write(data)
                return
        self._open(identity)

    def _open(self, identity: int) -> None:
        self.generation = self.view.generation  # what the datapath judges it under
        try:
            sock = open_upstream(self.conn, identity, self.view)
        except OSError as exc:
            self._upstream_failed(UNREACHABLE_BODY, upstream_failure(exc))
            return
        data = b"".join(self.to_upstream)
        self.to_upstream.clear()
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):  # not connected yet: the transport will
            sent = 0
        except OSError as exc:  # refused
            sock.close()
            self._upstream_failed(UNREACHABLE_BODY, upstream_failure(exc))
            return
        self.response = _Response(self)
        if sent < len(data):
            self.to_upstream.append(data[sent:])
        if not sent and connecting(sock):
            self.loop.call_later(CONNECT_TIMEOUT_S, self._connect_timeout, sock)
        self.connecting = self.loop.create_task(self._attach(sock))

    def _connect_timeout(self, sock: socket.socket) -> None:
        try:
            stuck = connecting(sock)
        except OSError:  # closed meanwhile
            return
        if stuck:
            self._upstream_failed(UNREACHABLE_BODY, upstream_failure(TimeoutError()))

    async def _attach(self, sock: socket.socket) -> None:
        try:
            await self.loop.create_connection(lambda: _Upstream(self), sock=sock)
        except BaseException as exc:
            sock.close()  # (uvloop detached it if it had closed it)
            if isinstance(exc, OSError):
                self._upstream_failed(UNREACHABLE_BODY, upstream_failure(exc))
                return
            if isinstance(exc, Exception):
                self._fault(exc)
                return
            raise
        assert self.upstream is not None
        if self.client.is_closing():  # the client went away meanwhile
            self.upstream.close()
            return
        if self.to_upstream:  # (a write before the handshake is over waits for it)
            self.upstream.write(b"".join(self.to_upstream))
            self.to_upstream.clear()
        self._hold("connecting", False)
        self._maybe_close()

    def _fail(self, status: int, reason: str) -> None:
        """A request that cannot be parsed: answered after those before it, then closed."""
        self.closing = True
        if self.pending:  # answers still owed to earlier requests come first: drop the rest
            return
        self.to_client.append(local_response(status, reason, b"", close=True))

    def _flush(self) -> None:
        """The answers to the client, the end right behind the last one (:func:`end_now`), then
        the reports of the requests they end: the client does not wait for the flows."""
        if self.to_client:
            last = self._ending()
            if last:  # the answer and the FIN in one segment (end_now)
                _cork(self.client, True)
            self.client.write(b"".join(self.to_client))
            self.to_client.clear()
            if last and self.client.get_write_buffer_size():
                _cork(self.client, False)  # not all written: the rest goes as it can
        self._maybe_close()
        self._report()

    def _report(self) -> None:
        if self.answered:
            for request in self.answered:
                self.report(self.conn, request.verdict, request.l7())
            self.answered.clear()

    def _maybe_close(self) -> None:
        """Closed (after what is buffered) when nothing more is owed to the client."""
        if self._ending():
            self.close_both()

    def _ending(self) -> bool:
        """Nothing more is owed to the client: it asked for the end, or sent its own, and every
        answer it waits for that can still come went out (an upstream being connected will
        answer)."""
        if not (self.closing or self.client_ended):
            return False
        connecting = self.connecting is not None and not self.connecting.done()
        return not (self.pending and (self.upstream is not None or connecting))

    # --- the upstream's side ----------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.replay = None  # an answer: the server had not closed it
        if self.upgraded and not self.pending:
            self.client.write(data)
            return
        try:
            self._feed_response(data)
        except httptools.HttpParserUpgrade as upgrade:
            # 101 Switching Protocols: from here on the connection is a byte pipe
            self.to_client.append(data[upgrade.args[0] :])
            self.pending.clear()
        except httptools.HttpParserError:
            self.keep_upstream = False
            self._flush()
            self.close_both()
            return
        self._flush()
        self._maybe_close()

    def upstream_ended(self) -> None:
        """The upstream is done: whatever the client still waits for will not come -- unless
        it came from the pool and ended before any answer (the server had closed it while it
        was idle, or as the requests went out): its requests, when they may be, are sent once
        more on a new connection (as Envoy retries a reset pooled connection)."""
        replay, self.replay = self.replay, None
        if replay is not None and self.pending and not self.closing_for_good():
            assert self.upstream is not None and self.pool_key is not None
            self.upstream.set_protocol(_SPENT)
            self.upstream.close()
            self.upstream = None
            self.response = None
            self.to_upstream[:0] = replay
            self._open(self.pool_key[1])
            if self.to_upstream:
                self._hold("connecting", True)
            return
        self._upstream_failed(RESET_BODY, "upstream reset before answering")

    def _upstream_failed(self, body: bytes, error: str) -> None:
        """The upstream failed or ended. If it owed the answer at the head of the line and had
        not begun it, nor said it would close, the request is answered ``503`` here as Envoy
        does, and its flow says why: the client learns more than a bare close. The requests
        behind it end with the connection, unanswered, as after any close."""
        self.keep_upstream = False
        pending, response = self.pending, self.response
        if (
            pending
            and not pending[0].local
            and not self.upstream_said_close
            and not (response is not None and response.in_message)
            and not self.closing_for_good()
        ):
            request = pending.popleft()
            pending.clear()
            request.status, request.error, request.close_after = 503, error, True
            request.local = local_response(503, "Service Unavailable", body, close=True)
            pending.append(request)
            self._answer_local()
        self._flush()
        self.close_both()

    def closing_for_good(self) -> bool:
        """The client's side is gone or failed: nothing to send again."""
        return self.finished or self.error is not None or self.client.is_closing()

    def _feed_response(self, data: bytes) -> None:
        """Upstream bytes to the response parser. An answer to HEAD has no body whatever its
        head announces, and llhttp cannot be told so: such a head is fed alone, the answer
        completed here, and the parser started afresh for the next answer."""
        assert self.response is not None
        while data:
            if not (self.pending and self.pending[0].method == "HEAD"):
                self.response.parser.feed_data(data)
                return
            self.head_buffer += data
            end = self.head_buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head_buffer) > MAX_HEADER_BYTES:
                    raise httptools.HttpParserError("response head too large")
                return
            head, data = bytes(self.head_buffer[: end + 4]), bytes(self.head_buffer[end + 4 :])
            self.head_buffer.clear()
            response = self.response
            self.keep_upstream = False  # (its end, with no body, is told by the head alone)
            response.parser.feed_data(head)
            if not response.completed:  # (an informational answer is complete by itself)
                response.completed = True
                self.response_complete(response.status)
            self.response = _Response(self)


class _Response:
    """httptools response callbacks: each upstream answer written again to the client."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.reason = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.in_head = False
        self.in_message = False
        self.completed = False
        self.chunked = False
        self.status = 0

    def on_message_begin(self) -> None:
        self.reason.clear()
        self.headers = []
        self.trailers = []
        self.in_head = True
        self.in_message = True
        self.completed = False

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.headers if self.in_head else self.trailers).append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.status = self.parser.get_status_code()
        version = self.parser.get_http_version()
        out = [f"HTTP/{version} {self.status} ".encode(), bytes(self.reason), b"\r\n"]
        self.chunked = False
        pending = self.conn.pending
        # the client asked for the end, which the upstream was not told (it is pooled): said
        # here, in the final answer
        close = self.status >= 200 and bool(pending) and pending[0].close_kept
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif close and lower == b"connection":
                continue
            out += (name, b": ", value, b"\r\n")
        if close:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        self.conn.to_client.append(b"".join(out))

    def on_body(self, data: bytes) -> None:
        if self.chunked:
            self.conn.to_client += (f"{len(data):x}\r\n".encode(), data, b"\r\n")
        else:
            self.conn.to_client.append(data)

    def on_message_complete(self) -> None:
        self.completed = True
        self.in_message = False
        if not self.parser.should_keep_alive():
            self.conn.keep_upstream = False
            self.conn.upstream_said_close = True
        if self.chunked:
            self.conn.to_client.append(last_chunk(self.trailers))
        if 100 <= self.status < 200 and self.status != 101:
            return  # informational (100 Continue): the final answer is still to come
        self.conn.response_complete(self.status)


class _Upstream(asyncio.Protocol):
    """The upstream connection's callbacks, handed to its :class:`HttpConnection`."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.upstream = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.from_upstream(data)
        except Exception as exc:
            self.conn._fault(exc)

    def eof_received(self) -> bool:
        self.conn.upstream_ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_ended()

    def pause_writing(self) -> None:  # the upstream reads slowly: stop reading the client
        self.conn._hold("upstream", True)

    def resume_writing(self) -> None:
        self.conn._hold("upstream", False)


_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_SPENT = asyncio.Protocol()  # the protocol of a transport whose handler is done
_SPENT_PARSER = httptools.HttpRequestParser(_SPENT)
_SPENT_RESPONSE_PARSER = httptools.HttpResponseParser(_SPENT)


def end_now(transport: asyncio.Transport) -> None:
    """The FIN to a peer now, when nothing is left to write (with the last answer, when it was
    corked: one segment). The loop closes a transport on its next turn, after whatever else is
    ready, and a client that read its last answer meanwhile (the answer's write woke it, on the
    other CPU or in the proxy's place) closed first and kept the connection's TIME_WAIT in its
    own namespace: about half the proxied new connections did, against 1 % straight to the
    server. Its next connects to that port search past them, until the ports run out. The
    proxy's own TIME_WAIT goes at once (``tcp_max_tw_buckets`` 0 in the node's namespace)."""
    if transport.is_closing() or transport.get_write_buffer_size():
        return
    fileobj = transport.get_extra_info("socket")
    fd = fileobj.fileno() if fileobj is not None else -1
    if fd < 0:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone: the close says the rest
    finally:
        sock.detach()


def _cork(transport: asyncio.Transport, on: bool) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
