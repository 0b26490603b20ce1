"""One HTTP/2 connection with prior knowledge (h2c, as gRPC speaks it): each stream on its own.

The proxy ends HTTP/2 on both sides with the h2 library (a server towards the client, a client
towards the upstream, opened on the first allowed stream) and checks every stream when its
headers are complete, against the same HTTP rules as HTTP/1.1: ``:method``, ``:path`` (gRPC's
``/package.Service/Method``), ``:authority`` as the host, and the headers. This is how Cilium
writes gRPC policy: ``method: POST``, ``path: /package.Service/Method``.

- an allowed stream is forwarded frame by frame: headers, data, trailers, resets;
- a denied gRPC call (``content-type: application/grpc...``) is answered here, trailers-only:
  ``:status 200``, ``grpc-status: 7`` (PERMISSION_DENIED), ``grpc-message: Access denied``;
  any other denied request gets ``403`` and ``Access denied``. A stream the client had not
  finished is then reset with NO_ERROR (gRPC servers do the same). The connection and its
  other streams go on;
- flow control end to end: data received on one side is acknowledged (its window reopened)
  only once the other side's window took it, so a slow reader slows its writer and the proxy
  holds at most a window's worth per direction (``STREAM_WINDOW``, ``CONNECTION_WINDOW``);
- malformed frames (h2's ProtocolError): GOAWAY, the connection is closed and a flow says why.

Each stream becomes one report when it ends: method, path, host, ``:status``, grpc-status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from services.proxy.exchange import (
    READ_SIZE,
    UNREACHABLE,
    Handler,
    Report,
    connect_upstream,
    elapsed_ms,
    upstream_failure,
)
from services.proxy.view import Verdict, View
from shared.messages import L7Info

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 1 << 20  # what the proxy lets a peer send on one stream before it forwards
CONNECTION_WINDOW = 4 << 20  # ... and on all streams of a connection
MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST = 64 * 1024


@dataclass(frozen=True)
class _Refusal:
    status: int  # HTTP
    grpc_status: int
    text: str


DENIED = _Refusal(403, 7, "Access denied\r\n")  # gRPC: PERMISSION_DENIED
UNAVAILABLE = _Refusal(503, 14, f"{UNREACHABLE}\r\n")  # gRPC: UNAVAILABLE

Headers = list[tuple[bytes, bytes]]


@dataclass
class _Half:
    """One direction of a stream: what waits for the receiving side's window."""

    data: bytearray = field(default_factory=bytearray)
    unacked: int = 0  # received, not yet taken by the other side: acknowledged once it is
    ended: bool = False  # the sender ended the stream (after ``data`` and ``trailers``)
    trailers: Headers | None = None
    done: bool = False  # end of stream passed on


@dataclass
class _Stream:
    client_id: int
    verdict: Verdict
    method: str
    path: str
    host: str
    grpc: bool
    started: float = field(default_factory=time.perf_counter)
    upstream_id: int = 0  # 0: denied, answered here
    up: _Half = field(default_factory=_Half)  # client -> upstream
    down: _Half = field(default_factory=_Half)  # upstream -> client
    status: int = 0
    grpc_status: int | None = None
    error: str = ""  # why the proxy answered for the upstream (UNAVAILABLE)
    reported: bool = False


def _settings(client_side: bool) -> h2.connection.H2Connection:
    # what one side sends, the other side's h2 validated when it came in: checking it again
    # on the way out would only cost time
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        },
    )
    return conn


def _header(headers: Headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


def _grpc_status(headers: Headers) -> int | None:
    text = _header(headers, b"grpc-status")
    return int(text) if text.isdigit() else None


class Http2Connection(Handler):
    def __init__(
        self,
        view: View,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        report: Report,
    ) -> None:
        super().__init__(view, reader, writer, report)
        self.client = _settings(client_side=False)
        self.upstream = _settings(client_side=True)
        self.streams: dict[int, _Stream] = {}  # by the client's stream id
        self.by_upstream: dict[int, _Stream] = {}
        self.pump: asyncio.Task[None] | None = None
        self.closed = False

    # --- the client's side ----------------------------------------------------------------

    async def run(self, first: bytes) -> None:
        """Serve the connection; ``first``: what was already read (the preface and more)."""
        self.client.initiate_connection()
        self.client.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        data = first
        try:
            while data and not self.closed:
                try:
                    events = self.client.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._malformed(exc)
                    break
                for event in events:
                    await self._client_event(event)
                self._move()
                await self._flush()
                data = await self.reader.read(READ_SIZE)
        except (OSError, TimeoutError):
            pass
        finally:
            await self._flush_quietly()
            await self._close()

    async def _client_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            await self._request(event.stream_id, list(event.headers), event.stream_ended)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or not stream.upstream_id:
                # denied (or already gone): dropped, the client's window given back at once
                self._ack(self.client, event.stream_id, event.flow_controlled_length)
                return
            stream.up.data += event.data
            stream.up.unacked += len(event.data)
            # padding is never forwarded: its share of the window comes back now
            self._ack(self.client, event.stream_id, event.flow_controlled_length - len(event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.upstream_id:
                stream.up.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.up.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.upstream_id:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.upstream.reset_stream(stream.upstream_id, event.error_code)
                self._finish(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    async def _request(self, stream_id: int, headers: Headers, ended: object) -> None:
        method = _header(headers, b":method")
        path = _header(headers, b":path")
        host = _header(headers, b":authority") or _header(headers, b"host")
        fields = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in headers
            if not key.startswith(b":")
        }
        fields["host"] = host
        verdict = self.view.http_on(self._lookup(), method, path, fields)
        grpc = fields.get("content-type", "").startswith("application/grpc")
        stream = _Stream(stream_id, verdict, method, path, host, grpc)
        self.streams[stream_id] = stream
        if not verdict.allowed:
            self._answer(stream, ended is not None, DENIED)
            return
        if self.up_writer is None:
            try:
                await self._connect(verdict.src_identity)
            except (OSError, TimeoutError) as exc:
                # the next stream tries again; this one is answered as Envoy does
                stream.error = upstream_failure(exc)
                self._answer(stream, ended is not None, UNAVAILABLE)
                return
        stream.upstream_id = self.upstream.get_next_available_stream_id()
        self.by_upstream[stream.upstream_id] = stream
        self.upstream.send_headers(stream.upstream_id, headers, end_stream=ended is not None)
        if ended is not None:
            stream.up.ended = stream.up.done = True

    def _answer(self, stream: _Stream, client_ended: bool, refusal: _Refusal) -> None:
        """The proxy answers the stream itself: gRPC trailers-only, else status and text."""
        sid = stream.client_id
        if stream.grpc:
            stream.status, stream.grpc_status = 200, refusal.grpc_status
            self.client.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(refusal.grpc_status).encode()),
                    (b"grpc-message", refusal.text.strip().encode()),
                ],
                end_stream=True,
            )
        else:
            stream.status = refusal.status
            body = refusal.text.encode()
            self.client.send_headers(
                sid,
                [
                    (b":status", str(refusal.status).encode()),
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                ],
            )
            self.client.send_data(sid, body, end_stream=True)
        if not client_ended:  # what the client still sends on it would only be dropped
            # (unless its end came in the frames being handled: then the stream is closed)
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.client.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
        self._finish(stream)

    def _malformed(self, exc: h2.exceptions.ProtocolError) -> None:
        """The client broke the protocol: h2 queued a GOAWAY; a flow says why."""
        self.closed = True
        conn = self.conn
        verdict = self.view.unparsed(conn.src, conn.dst, conn.dport)
        self.report(conn, verdict, L7Info(protocol="http2", error=f"malformed HTTP/2: {exc}"[:200]))

    # --- the upstream's side ----------------------------------------------------------------

    async def _connect(self, identity: int) -> None:
        self.up_reader, self.up_writer = await connect_upstream(self.conn, identity, self.view)
        self.upstream.initiate_connection()
        self.upstream.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        """The upstream's frames, back to the client on its streams."""
        assert self.up_reader is not None
        try:
            while not self.closed:
                data = await self.up_reader.read(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.upstream.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._upstream_event(event)
                self._move()
                await self._flush()
        except (OSError, TimeoutError):
            pass
        # the upstream is gone: so is the client's connection (its streams cannot be answered)
        self.closed = True
        await self._flush_quietly()
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()

    def _upstream_event(self, event: h2.events.Event) -> None:
        stream = self.by_upstream.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            headers = list(event.headers)
            stream.status = int(_header(headers, b":status") or 0)
            stream.grpc_status = _grpc_status(headers)  # trailers-only answers
            self.client.send_headers(stream.client_id, headers)
        elif isinstance(event, h2.events.DataReceived):
            if stream is None:
                self._ack(self.upstream, event.stream_id, event.flow_controlled_length)
                return
            stream.down.data += event.data
            stream.down.unacked += len(event.data)
            pad = event.flow_controlled_length - len(event.data)
            self._ack(self.upstream, event.stream_id, pad)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.down.trailers = list(event.headers)
            stream.grpc_status = _grpc_status(stream.down.trailers)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.down.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.client.reset_stream(stream.client_id, event.error_code)
            self._finish(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    # --- moving data within the windows ---------------------------------------------------

    def _move(self) -> None:
        """Whatever the windows allow, both ways; the sender's window reopened as much."""
        for stream in list(self.streams.values()):
            if stream.upstream_id:
                self._send(self.upstream, stream.upstream_id, stream.up, self.client, stream)
                self._send(self.client, stream.client_id, stream.down, self.upstream, stream)
            if stream.down.done and stream.up.done:
                self._finish(stream)

    def _send(
        self,
        to: h2.connection.H2Connection,
        sid: int,
        half: _Half,
        source: h2.connection.H2Connection,
        stream: _Stream,
    ) -> None:
        if half.done:
            return
        source_id = stream.client_id if source is self.client else stream.upstream_id
        try:
            while half.data:
                size = min(
                    len(half.data), to.local_flow_control_window(sid), to.max_outbound_frame_size
                )
                if size <= 0:
                    return  # the window is closed: the rest waits for a WINDOW_UPDATE
                to.send_data(sid, bytes(half.data[:size]))
                del half.data[:size]
                taken = min(size, half.unacked)
                half.unacked -= taken
                self._ack(source, source_id, taken)
            if half.ended:
                if half.trailers is not None:
                    to.send_headers(sid, half.trailers, end_stream=True)
                else:
                    to.end_stream(sid)
                half.done = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            half.done = True  # the receiving side reset it meanwhile

    @staticmethod
    def _ack(conn: h2.connection.H2Connection, sid: int, size: int) -> None:
        if size > 0:
            with contextlib.suppress(h2.exceptions.H2Error, ValueError):
                conn.acknowledge_received_data(size, sid)

    def _finish(self, stream: _Stream) -> None:
        self.streams.pop(stream.client_id, None)
        self.by_upstream.pop(stream.upstream_id, None)
        if stream.reported:
            return
        stream.reported = True
        self.report(
            self.conn,
            stream.verdict,
            L7Info(
                protocol="grpc" if stream.grpc else "http2",
                method=stream.method,
                url=stream.path,
                host=stream.host,
                status=stream.status,
                latency_ms=elapsed_ms(stream.started),
                grpc_status=stream.grpc_status,
                error=stream.error,
            ),
        )

    # --- I/O --------------------------------------------------------------------------------

    async def _flush(self) -> None:
        out = self.client.data_to_send()
        if out:
            self.writer.write(out)
        if self.up_writer is not None:
            up = self.upstream.data_to_send()
            if up:
                self.up_writer.write(up)
                await self.up_writer.drain()
        if out:
            await self.writer.drain()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            await asyncio.wait_for(self._flush(), 1.0)

    async def _close(self) -> None:
        self.closed = True
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()
            with contextlib.suppress(BaseException):
                await self.pump
        self.close_both()
