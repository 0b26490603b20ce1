"""Which protocol a steered connection speaks, and the handler that serves it.

A port whose rules are Kafka rules speaks Kafka (it has no greeting to tell it by; Cilium too
picks the parser by the rule). HTTP/1.1 and HTTP/2 share a port (gRPC is HTTP/2 with prior
knowledge, h2c): a connection is HTTP/2 when it opens with the HTTP/2 connection preface,
HTTP/1.1 otherwise. Nothing is forwarded before the handler has parsed it.
"""

from __future__ import annotations

import asyncio

from services.proxy.exchange import READ_SIZE, Conn, Report
from services.proxy.http import HttpConnection
from services.proxy.http2 import PREFACE, Http2Connection
from services.proxy.kafka import KafkaConnection
from services.proxy.view import View


async def opening(reader: asyncio.StreamReader) -> bytes:
    """The connection's first bytes: at least enough to tell the HTTP/2 preface from
    anything else (a client may send it in pieces), or less when the client stopped."""
    data = await reader.read(READ_SIZE)
    while data and len(data) < len(PREFACE) and PREFACE.startswith(data):
        more = await reader.read(READ_SIZE)
        if not more:
            break
        data += more
    return data


async def serve_connection(
    view: View, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, report: Report
) -> None:
    conn = Conn.of(writer)
    if view.speaks_kafka(conn.src, conn.dst, conn.dport):
        await KafkaConnection(view, reader, writer, report).run()
        return
    first = await opening(reader)
    if first.startswith(PREFACE):
        await Http2Connection(view, reader, writer, report).run(first)
    else:
        await HttpConnection(view, reader, writer, report).run(first)
