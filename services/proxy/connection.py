"""Which protocol a steered connection speaks, and the handler that serves it.

A port whose rules are Kafka rules speaks Kafka (it has no greeting to tell it by; Cilium too
picks the parser by the rule). HTTP/1.1 and HTTP/2 share a port (gRPC is HTTP/2 with prior
knowledge, h2c): a connection is HTTP/2 when it opens with the HTTP/2 connection preface,
HTTP/1.1 otherwise. Nothing is forwarded before the handler has parsed it.

The listener's connections start as an :class:`Accepted` protocol, which reads the first bytes
and hands the transport over: HTTP/1.1 to its own protocol (no task, no stream: served by
callbacks), HTTP/2 and Kafka to streams and a task each. A stream and a task per connection
before the first read, as ``asyncio.start_server`` makes them, cost a new connection an
event-loop turn and a tenth of the proxy's work for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.proxy.exchange import READ_SIZE, Conn, Report
from services.proxy.http import HttpConnection
from services.proxy.http2 import PREFACE, Http2Connection
from services.proxy.kafka import KafkaConnection
from services.proxy.pool import UpstreamPool
from services.proxy.view import View

Failed = Callable[[BaseException], None]  # what a connection's handler failed with (a bug)


class Accepted(asyncio.Protocol):
    """A connection the listener accepted, until its first bytes tell what it speaks."""

    def __init__(
        self, view: View, report: Report, failed: Failed, pool: UpstreamPool | None = None
    ) -> None:
        self.view = view
        self.report = report
        self.failed = failed
        self.pool = pool
        self.first = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.conn = conn = Conn.of(transport)
        if self.view.speaks_kafka(conn.src, conn.dst, conn.dport):
            self._streams(b"", eof=False, kafka=True)

    def data_received(self, data: bytes) -> None:
        first = self.first = self.first + data
        if len(first) < len(PREFACE) and PREFACE.startswith(first):
            return  # the preface, or not yet: more to come
        self._hand_over(eof=False)

    def eof_received(self) -> bool:
        self._hand_over(eof=True)
        return True  # half-open: the answers owed still go out

    def _hand_over(self, *, eof: bool) -> None:
        try:
            self._serve(eof=eof)
        except Exception as exc:  # a bug, not the client's input: this connection only
            self.transport.close()
            self.failed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # before a handler took it: nothing to answer

    def _serve(self, *, eof: bool) -> None:
        if self.first.startswith(PREFACE):
            self._streams(self.first, eof=eof, kafka=False)
            return
        handler = HttpConnection(
            self.view, self.transport, self.report, self.conn, self.failed, self.pool
        )
        handler.start(self.first, eof=eof)

    def _streams(self, first: bytes, *, eof: bool, kafka: bool) -> None:
        """HTTP/2 and Kafka are served by tasks reading streams: the transport made into them."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if eof:
            reader.feed_eof()
        writer = asyncio.StreamWriter(self.transport, protocol, reader, loop)
        handler: KafkaConnection | Http2Connection
        if kafka:
            handler = KafkaConnection(self.view, reader, writer, self.report)
        else:
            handler = Http2Connection(self.view, reader, writer, self.report)
        handler.conn = self.conn  # the connection as the listener's protocol saw it
        task = loop.create_task(handler.run(first))
        _TASKS.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        _TASKS.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.failed(exc)


_TASKS: set[asyncio.Task[None]] = set()  # the stream handlers' tasks, held until done


def accepting(
    view: View, report: Report, failed: Failed, pool: UpstreamPool | None = None
) -> Callable[[], Accepted]:
    """The listener's protocol factory (``loop.create_server``); HTTP/1.1 upstreams taken from
    and handed back to ``pool`` (none: one per client connection)."""
    return lambda: Accepted(view, report, failed, pool)
