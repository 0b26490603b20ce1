"""One Kafka connection the datapath steered to the proxy: each request on its own.

Requests are framed (a 4-byte size, then the request) and decoded whole with kafka-python's
codec (``kafka_codec``) before anything is decided; each is checked against the Kafka rules
(Cilium's role, apiKey, apiVersion, clientID, topic). An allowed request goes upstream as it
came; a denied one is answered here with its API's response carrying error 29
(TOPIC_AUTHORIZATION_FAILED), and the connection goes on. Answers keep the requests' order
(a client may have several requests in flight): the proxy's own wait for the upstream's answers
to the requests before them. A produce request with ``acks=0`` gets no answer, allowed or not.

A frame that does not decode, or announces more than ``MAX_FRAME``, closes the connection
(nothing of it is forwarded) and a flow says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from services.proxy.exchange import READ_SIZE, Handler, Report, connect_upstream, elapsed_ms
from services.proxy.kafka_codec import MAX_FRAME, KafkaDecodeError, Parsed, denial, parse
from services.proxy.view import Verdict, View
from shared.l7_kafka import TOPIC_AUTHORIZATION_FAILED, api_name
from shared.messages import L7Info


@dataclass
class _Pending:
    parsed: Parsed
    verdict: Verdict
    local: bytes = b""  # the proxy's answer (denied); empty: the upstream answers
    started: float = field(default_factory=time.perf_counter)


def _frames(buffer: bytearray) -> list[bytes]:
    """The complete frames at the head of ``buffer`` (taken out of it), payloads only."""
    frames = []
    while len(buffer) >= 4:
        size = int.from_bytes(buffer[:4], "big", signed=True)
        if size < 0 or size > MAX_FRAME:
            raise KafkaDecodeError(f"frame size {size} out of range")
        if len(buffer) < 4 + size:
            break
        frames.append(bytes(buffer[4 : 4 + size]))
        del buffer[: 4 + size]
    return frames


class KafkaConnection(Handler):
    def __init__(
        self,
        view: View,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        report: Report,
    ) -> None:
        super().__init__(view, reader, writer, report)
        self.pending: deque[_Pending] = deque()  # in request order, awaiting their answers
        self.to_upstream: list[bytes] = []
        self.to_client: list[bytes] = []
        self.closing = False
        self.identity = 0  # the client's, for the upstream connection's mark

    async def run(self, first: bytes = b"") -> None:
        """Serve the connection; ``first``: what was already read from it."""
        pump: asyncio.Task[None] | None = None
        buffer = bytearray()
        try:
            while not self.closing:
                data, first = first or await self.reader.read(READ_SIZE), b""
                if not data:
                    break
                buffer += data
                try:
                    for payload in _frames(buffer):
                        self._request(parse(payload))
                except KafkaDecodeError as exc:
                    self._malformed(exc)
                if self.to_upstream:
                    if self.up_writer is None:
                        self.up_reader, self.up_writer = await connect_upstream(
                            self.conn, self.identity, self.view
                        )
                        pump = asyncio.create_task(self._pump())
                    assert self.up_writer is not None
                    self.up_writer.write(b"".join(self.to_upstream))
                    self.to_upstream.clear()
                    await self.up_writer.drain()
                await self._flush()
            if pump is not None and self.pending and not self.closing:
                await pump  # the answers still owed to a client that stopped sending
        except (OSError, TimeoutError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            self.close_both()

    def _request(self, parsed: Parsed) -> None:
        conn = self.conn
        verdict = self.view.kafka(conn.src, conn.dst, conn.dport, parsed.request)
        if verdict.allowed:
            # what was decoded, encoded again: nothing the codec did not understand goes on
            self.to_upstream.append(parsed.frame)
            self.identity = verdict.src_identity
            entry = _Pending(parsed, verdict)
        else:
            entry = _Pending(
                parsed, verdict, local=denial(parsed) if parsed.expects_response else b""
            )
        if not parsed.expects_response:
            self._done(entry)  # acks=0: nothing will answer it
            return
        self.pending.append(entry)
        self._answer_local()

    def _answer_local(self) -> None:
        while self.pending and self.pending[0].local:
            entry = self.pending.popleft()
            self.to_client.append(entry.local)
            self._done(entry)

    def _done(self, entry: _Pending) -> None:
        request = entry.parsed.request
        self.report(
            self.conn,
            entry.verdict,
            L7Info(
                protocol="kafka",
                api_key=api_name(request.api_key),
                api_version=request.api_version,
                topics=list(request.topics or ()),
                client_id=request.client_id,
                error_code=0 if entry.verdict.allowed else TOPIC_AUTHORIZATION_FAILED,
                latency_ms=elapsed_ms(entry.started),
            ),
        )

    def _malformed(self, exc: KafkaDecodeError) -> None:
        """Nothing of the frame is forwarded: the connection ends after the answers owed."""
        self.closing = True
        conn = self.conn
        verdict = self.view.unparsed(conn.src, conn.dst, conn.dport)
        self.report(conn, verdict, L7Info(protocol="kafka", error=f"malformed Kafka: {exc}"[:200]))

    async def _flush(self) -> None:
        if self.to_client:
            self.writer.write(b"".join(self.to_client))
            self.to_client.clear()
            await self.writer.drain()

    async def _pump(self) -> None:
        """The upstream's answers, back to the client in request order."""
        assert self.up_reader is not None
        buffer = bytearray()
        try:
            while True:
                data = await self.up_reader.read(READ_SIZE)
                if not data:
                    break
                buffer += data
                for payload in _frames(buffer):
                    if not self.pending:
                        raise KafkaDecodeError("an answer to no request")
                    entry = self.pending.popleft()
                    self.to_client.append(len(payload).to_bytes(4, "big") + payload)
                    self._done(entry)
                    self._answer_local()
                await self._flush()
                if self.closing and not self.pending:
                    break
        except KafkaDecodeError:
            pass
        # the upstream is done: whatever the client still waits for will not come
        self.closing = True
        with contextlib.suppress(OSError):
            self.writer.close()
