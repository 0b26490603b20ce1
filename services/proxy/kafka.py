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

Topics named by id (Produce v13+, Fetch v13+, Metadata v10+, OffsetCommit/OffsetFetch v10+,
DeleteTopics v6+) are named by what the same broker said in its Metadata answers (v10+) to
requests this proxy let through (``TopicIds``, per broker address and port: a broker is trusted
for its own topics only). An id no answer named matches no rule's topic: where the rules need
the name, the request is denied, with UNKNOWN_TOPIC_ID (100) when the unknown ids alone deny it
(a client's cue to ask for metadata again, which teaches the proxy the id), else with 29.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from services.proxy.exchange import READ_SIZE, Handler, Report, connect_upstream, elapsed_ms
from services.proxy.kafka_codec import (
    MAX_FRAME,
    KafkaDecodeError,
    Parsed,
    denial,
    parse,
    topic_ids,
    unknown_id,
)
from services.proxy.view import Verdict, View
from shared.l7_kafka import TOPIC_AUTHORIZATION_FAILED, api_name
from shared.messages import L7Info

METADATA = 3
UNKNOWN_TOPIC_ID = 100
Broker = tuple[IPv4Address, int]


class TopicIds:
    """Topic id -> name, per broker (address, port), from the brokers' own Metadata answers
    (v10+) that came back through this proxy. Bounded: at most ``max_ids`` per broker and
    ``max_brokers`` brokers, the oldest out first (an id forgotten is unknown again: its
    requests get UNKNOWN_TOPIC_ID, and the client's next Metadata request teaches it again)."""

    def __init__(self, max_brokers: int = 1024, max_ids: int = 65536) -> None:
        self.max_brokers = max_brokers
        self.max_ids = max_ids
        self._by_broker: dict[Broker, dict[uuid.UUID, str]] = {}
        # told what an answer through this process taught that was not known: the node's
        # other proxy processes learn it too (services/proxy/prefork.py), so that a client
        # whose Metadata and Fetch connections landed in different processes is not refused
        self.shared: Callable[[Broker, list[tuple[uuid.UUID, str]]], None] | None = None

    def names(self, broker: Broker) -> Mapping[uuid.UUID, str]:
        return self._by_broker.get(broker) or {}

    def learn(
        self, broker: Broker, pairs: Iterable[tuple[uuid.UUID, str]], *, share: bool = True
    ) -> None:
        """``share``: whether what is new goes to ``shared`` (not when it came from there)."""
        known = self._by_broker.get(broker)
        if known is None:
            if len(self._by_broker) >= self.max_brokers:
                del self._by_broker[next(iter(self._by_broker))]
            known = self._by_broker[broker] = {}
        new = []
        for topic_id, name in pairs:
            if known.pop(topic_id, None) != name:
                new.append((topic_id, name))
            known[topic_id] = name
            if len(known) > self.max_ids:
                del known[next(iter(known))]
        if new and share and self.shared is not None:
            self.shared(broker, new)


TOPIC_IDS = TopicIds()  # the proxy's: every Kafka connection learns into it


@dataclass
class _Pending:
    parsed: Parsed
    verdict: Verdict
    local: bytes = b""  # the proxy's answer (denied); empty: the upstream answers
    started: float = field(default_factory=time.perf_counter)
    error: int = 0  # the proxy's answer's error code


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
        topic_ids: TopicIds = TOPIC_IDS,
    ) -> None:
        super().__init__(view, reader, writer, report)
        self.topic_ids = topic_ids
        self.broker: Broker = (self.conn.dst, self.conn.dport)
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
                        self._request(parse(payload, self.topic_ids.names(self.broker)))
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
            error = self._refusal(parsed)
            local = denial(parsed, error) if parsed.expects_response else b""
            entry = _Pending(parsed, verdict, local=local, error=error)
        if not parsed.expects_response:
            self._done(entry)  # acks=0: nothing will answer it
            return
        self.pending.append(entry)
        self._answer_local()

    def _refusal(self, parsed: Parsed) -> int:
        """The error of a denied request: UNKNOWN_TOPIC_ID when the ids no Metadata answer
        named are all that denied it (the rest of it allowed), else TOPIC_AUTHORIZATION_FAILED."""
        if not parsed.unknown_ids:
            return TOPIC_AUTHORIZATION_FAILED
        request = parsed.request
        unknown = {unknown_id(topic_id) for topic_id in parsed.unknown_ids}
        named = tuple(topic for topic in request.topics or () if topic not in unknown)
        conn = self.conn
        verdict = self.view.kafka(
            conn.src, conn.dst, conn.dport, dataclasses.replace(request, topics=named)
        )
        return UNKNOWN_TOPIC_ID if verdict.allowed else TOPIC_AUTHORIZATION_FAILED

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
                error_code=entry.error,
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
                    request = entry.parsed.request
                    if request.api_key == METADATA and request.api_version >= 10:
                        self.topic_ids.learn(self.broker, topic_ids(request.api_version, payload))
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
