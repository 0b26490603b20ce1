"""Kafka in the L7 proxy: Cilium's rule semantics, the denials kafka-python's codec writes for
each API and version, and a connection over real loopback TCP whose requests are all denied
(no upstream), with a fuzz run of a fixed seed: whatever arrives, nothing is forwarded, the
proxy answers only with error 29 or closes, and never crashes."""

from __future__ import annotations

import random
import struct
import uuid
from ipaddress import IPv4Address
from typing import Any

import pytest
from kafka.protocol.api_header import ResponseClassRegistry
from kafka.protocol.consumer import FetchRequest, ListOffsetsRequest, OffsetFetchRequest
from kafka.protocol.metadata import FindCoordinatorRequest, MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest

from services.proxy.kafka import TopicIds
from services.proxy.kafka_codec import REQUESTS, denial, parse, topic_ids
from services.proxy.view import View
from shared import l7_kafka
from shared.errors import InvalidArgument
from shared.l7_kafka import KafkaRequest
from shared.messages import L7Info
from tests.unit import proxy_loop

SEED = 20261204
P, M, F = ProduceRequest, MetadataRequest, FetchRequest


def rules(*raw: dict[str, str]) -> tuple[l7_kafka.KafkaRule, ...]:
    return l7_kafka.compile_rules(raw, "kafka")


def req(key: str, *topics: str, version: int = 0, client: str = "") -> KafkaRequest:
    return KafkaRequest(l7_kafka.API_KEYS[key], version, client, topics)


def test_cilium_rule_semantics() -> None:
    hq = rules({"role": "produce", "topic": "deathstar-plans"}, {"role": "produce", "topic": "a"})
    assert l7_kafka.allows(hq, req("produce", "deathstar-plans")) == 0
    assert l7_kafka.allows(hq, req("produce", "deathstar-plans", "a")) == 1  # both rules
    assert l7_kafka.allows(hq, req("produce", "deathstar-plans", "b")) is None  # all topics
    assert l7_kafka.allows(hq, req("fetch", "deathstar-plans")) is None  # not the role's API
    assert l7_kafka.allows(hq, req("apiversions")) == 0  # no topics: the topic does not bind
    assert l7_kafka.allows(hq, req("metadata")) == 0  # metadata of no topic
    every = KafkaRequest(3, 1, "", None)  # metadata of every topic: only a topic-less rule
    assert l7_kafka.allows(hq, every) is None
    assert l7_kafka.allows(rules({"role": "Produce"}), every) == 0  # roles in any case
    versioned = rules({"apiKey": "Fetch", "apiVersion": "11", "clientID": "outpost"})
    assert l7_kafka.allows(versioned, req("fetch", "x", version=11, client="outpost")) == 0
    assert l7_kafka.allows(versioned, req("fetch", "x", version=12, client="outpost")) is None
    assert l7_kafka.allows(versioned, req("fetch", "x", version=11, client="other")) is None
    assert l7_kafka.allows(rules({}), req("deletetopics", "x")) == 0  # empty rule: anything


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"role": "admin"}, "k[0].role"),
        ({"apiKey": "nope"}, "k[0].apiKey"),
        ({"apiVersion": "1.5"}, "k[0].apiVersion"),
        ({"topic": "a/b"}, "k[0].topic"),
        ({"role": "produce", "apiKey": "fetch"}, "k[0]"),
    ],
)
def test_bad_fields_are_named(raw: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        l7_kafka.compile_rules([raw], "k")
    assert caught.value.field == field


def framed(request: Any, correlation_id: int = 7, client_id: str = "cli") -> bytes:
    request.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(request.encode(header=True, framed=True))


def produce(version: int, *topics: str, acks: int = 1) -> Any:
    data = [
        P.TopicProduceData(name=t, partition_data=[P.TopicProduceData.PartitionProduceData(
            index=0, records=b"")]) for t in topics
    ]  # fmt: skip
    return P[version](transactional_id=None, acks=acks, timeout_ms=1000, topic_data=data)


def answered(request: Any) -> Any:
    """The proxy's denial of ``request``, decoded as a client decodes it."""
    parsed = parse(framed(request)[4:])
    out = denial(parsed)
    assert int.from_bytes(out[:4], "big") == len(out) - 4
    cls = ResponseClassRegistry.get_response_class(parsed.body.header)
    response = cls.decode(out[4:], version=parsed.request.api_version, header=True)
    assert response.header.correlation_id == 7
    return response


def _codes(node: Any) -> list[int]:
    if isinstance(node, dict):
        here = [node["error_code"]] if "error_code" in node else []
        return here + [c for v in node.values() for c in _codes(v)]
    if isinstance(node, list):
        return [c for v in node for c in _codes(v)]
    return []


@pytest.mark.parametrize(
    "request_",
    [
        produce(3, "plans"),
        produce(9, "plans", "announce"),
        M[1](topics=[M.MetadataRequestTopic(name="plans")]),
        M[12](topics=[M.MetadataRequestTopic(name="plans")], allow_auto_topic_creation=True),
        F[11](replica_id=-1, max_wait_ms=1, min_bytes=1, topics=[F.FetchTopic(
            topic="plans", partitions=[F.FetchTopic.FetchPartition(partition=0)])]),
        ListOffsetsRequest[5](replica_id=-1, topics=[ListOffsetsRequest.ListOffsetsTopic(
            name="plans", partitions=[ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
                partition_index=0, timestamp=-1)])]),
        OffsetFetchRequest[5](group_id="g", topics=[OffsetFetchRequest.OffsetFetchRequestTopic(
            name="plans", partition_indexes=[0, 1])]),
        FindCoordinatorRequest[2](key="g", key_type=0),
        FindCoordinatorRequest[4](key_type=0, coordinator_keys=["g1", "g2"]),
    ],
    ids=lambda r: f"{type(r).__name__}",
)  # fmt: skip
def test_denials_carry_29_for_the_apis_topics_and_partitions(request_: Any) -> None:
    response = answered(request_).to_dict()
    codes = _codes(response)
    assert codes and set(codes) == {29}, response
    text = str(response)
    for topic in ("plans", "announce"):
        assert (topic in text) == (topic in str(request_.to_dict())), response


def test_parse_reads_the_header_and_the_topics() -> None:
    sent = framed(produce(9, "plans", "announce"), client_id="hq")
    parsed = parse(sent[4:])
    assert parsed.request == KafkaRequest(0, 9, "hq", ("plans", "announce"))
    assert parsed.frame == sent  # what is forwarded: the request encoded again, the same
    assert parsed.correlation_id == 7 and parsed.expects_response
    assert not parse(framed(produce(9, "plans", acks=0))[4:]).expects_response
    every = parse(framed(M[9](topics=None, allow_auto_topic_creation=False))[4:])
    assert every.request.topics is None


# --- a connection -------------------------------------------------------------------------


def deny_all() -> View:
    """Loopback is "world": its ingress has Kafka rules that no request here matches (so no
    upstream is ever opened: it would be this very listener)."""
    nobody = {"kafka": {"apiKey": "alterconfigs", "clientID": "no-client-of-these-tests"}}
    return proxy_loop.world_view([nobody])


async def exchange(data: bytes) -> tuple[bytes, list[L7Info]]:
    return await proxy_loop.exchange(deny_all(), data)


def split(answer: bytes) -> list[tuple[int, bytes]]:
    """(correlation id, frame) of each answer."""
    out = []
    while answer:
        size = int.from_bytes(answer[:4], "big")
        out.append((struct.unpack_from(">i", answer, 4)[0], answer[: 4 + size]))
        answer = answer[4 + size :]
    return out


async def test_pipelined_denials_come_back_in_order_and_acks_0_gets_none() -> None:
    data = (
        framed(produce(9, "other"), correlation_id=1)
        + framed(produce(9, "other", acks=0), correlation_id=2)
        + framed(M[12](topics=[M.MetadataRequestTopic(name="x")]), correlation_id=3)
        + framed(F[11](replica_id=-1, topics=[]), correlation_id=4)
    )
    answer, reported = await exchange(data)
    assert [cid for cid, _ in split(answer)] == [1, 3, 4]
    assert [(r.api_key, r.error_code) for r in reported] == [
        ("produce", 29), ("produce", 29), ("metadata", 29), ("fetch", 29)
    ]  # fmt: skip


async def test_a_frame_that_does_not_decode_closes_and_a_flow_says_why() -> None:
    good = framed(produce(9, "other"), correlation_id=1)
    bad = struct.pack(">ihhi", 10, 0, 9, 2) + b"\xff\xff"  # a produce cut short
    answer, reported = await exchange(good + bad + good)
    assert [cid for cid, _ in split(answer)] == [1]  # the one before, then closed
    assert reported[-1].error.startswith("malformed Kafka"), reported


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(3)
        if kind == 0 and at < len(out):
            out[at] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            del out[at : at + rng.randint(1, 8)]
    return bytes(out)


@pytest.mark.parametrize("batch", range(3))
async def test_fuzz_never_crashes_and_never_forwards(batch: int) -> None:
    rng = random.Random(SEED + batch)
    valid = framed(produce(9, "other"), 1) + framed(M[12](topics=[]), 2)
    for _ in range(40):
        data = _mutate(rng, valid) if rng.random() < 0.85 else rng.randbytes(64)
        answer, reported = await exchange(data)
        # nothing could be forwarded (no upstream here): every report is a denial or an error
        for flow in reported:
            assert flow.error_code == 29 or flow.error, (data, flow)
        assert len(split(answer)) <= len(reported)


# --- topics by id, and every field that names a topic --------------------------------------

PLANS_ID, SECRET_ID = uuid.UUID(int=0xA1), uuid.UUID(int=0x5EC)
D, T, W = REQUESTS[20], REQUESTS[24], REQUESTS[27]  # DeleteTopics, AddPartitionsToTxn, Markers


def fetch13(*ids: uuid.UUID, forgotten: tuple[uuid.UUID, ...] = ()) -> Any:
    return F[13](
        replica_id=-1, max_wait_ms=1, min_bytes=1,
        topics=[F.FetchTopic(topic_id=i, partitions=[F.FetchTopic.FetchPartition(partition=0)])
                for i in ids],
        forgotten_topics_data=[F.ForgottenTopic(topic_id=i, partitions=[0]) for i in forgotten],
    )  # fmt: skip


def produce13(*ids: uuid.UUID) -> Any:
    data = [P.TopicProduceData(topic_id=i, partition_data=[
        P.TopicProduceData.PartitionProduceData(index=0, records=b"")]) for i in ids]  # fmt: skip
    return P[13](transactional_id=None, acks=1, timeout_ms=1000, topic_data=data)


@pytest.mark.parametrize(
    ("request_", "topics"),
    [
        # named only in fields the proxy did not read before
        (D[5](topic_names=["secret", "plans"], timeout_ms=1), ("secret", "plans")),
        (T[3](v3_and_below_transactional_id="t", v3_and_below_producer_id=1,
              v3_and_below_producer_epoch=0, v3_and_below_topics=[
                  T.AddPartitionsToTxnTopic(name="secret", partitions=[0])]), ("secret",)),
        (T[4](transactions=[T.AddPartitionsToTxnTransaction(
            transactional_id="t", producer_id=1, producer_epoch=0, verify_only=False,
            topics=[T.AddPartitionsToTxnTopic(name="secret", partitions=[0])])]), ("secret",)),
        (W[1](markers=[W.WritableTxnMarker(producer_id=1, producer_epoch=0,
              transaction_result=True, coordinator_epoch=0, topics=[
                  W.WritableTxnMarker.WritableTxnMarkerTopic(name="secret",
                                                             partition_indexes=[0])])]),
         ("secret",)),
        (F[12](replica_id=-1, topics=[F.FetchTopic(topic="plans", partitions=[])],
               forgotten_topics_data=[F.ForgottenTopic(topic="secret", partitions=[0])]),
         ("plans", "secret")),
        # by id: named by what the broker said, else <id>
        (fetch13(PLANS_ID), ("plans",)),
        (fetch13(PLANS_ID, forgotten=(SECRET_ID,)), ("plans", f"<{SECRET_ID}>")),
        (produce13(SECRET_ID), (f"<{SECRET_ID}>",)),
        # a name and an id: both must be allowed
        (M[12](topics=[M.MetadataRequestTopic(name="plans", topic_id=SECRET_ID)]),
         (f"<{SECRET_ID}>", "plans")),
        (M[12](topics=[M.MetadataRequestTopic(name="plans")]), ("plans",)),  # zero id: none
        (D[6](topics=[D.DeleteTopicState(name=None, topic_id=PLANS_ID)], timeout_ms=1),
         ("plans",)),
    ],
    ids=lambda r: f"{type(r).__name__}" if not isinstance(r, tuple) else "",
)  # fmt: skip
def test_every_field_that_names_a_topic_is_read(request_: Any, topics: tuple[str, ...]) -> None:
    parsed = parse(framed(request_)[4:], {PLANS_ID: "plans"})
    assert parsed.request.topics == topics
    assert parsed.unknown_ids == tuple(
        uuid.UUID(t[1:-1]) for t in topics if t.startswith("<")
    )  # fmt: skip


def test_an_unknown_id_is_refused_where_a_rule_needs_the_topic() -> None:
    plans = rules({"role": "produce", "topic": "plans"}, {"role": "consume", "topic": "plans"})
    for request in (fetch13(SECRET_ID), produce13(SECRET_ID)):
        parsed = parse(framed(request)[4:], {PLANS_ID: "plans"})
        assert l7_kafka.allows(plans, parsed.request) is None
        anything = rules({"role": "consume"}, {"role": "produce"})  # no topic: no name needed
        assert l7_kafka.allows(anything, parsed.request) is not None
        known = parse(framed(request)[4:], {SECRET_ID: "plans"})  # the broker said "plans"
        assert l7_kafka.allows(plans, known.request) is not None


@pytest.mark.parametrize("request_", [fetch13(PLANS_ID, SECRET_ID), produce13(SECRET_ID)])
def test_denials_of_requests_by_id_echo_the_ids(request_: Any) -> None:
    parsed = parse(framed(request_)[4:])
    out = denial(parsed, 100)
    cls = ResponseClassRegistry.get_response_class(parsed.body.header)
    response = cls.decode(out[4:], version=parsed.request.api_version, header=True)
    assert set(_codes(response.to_dict())) == {100}
    topics = response.responses
    sent = request_.topics if isinstance(request_, F) else request_.topic_data
    assert [t.topic_id for t in topics] == [t.topic_id for t in sent]


def test_metadata_answers_teach_ids_per_broker() -> None:
    R = MetadataResponse
    answer = R[12](
        throttle_time_ms=0, brokers=[], cluster_id="c", controller_id=1,
        topics=[
            R.MetadataResponseTopic(error_code=0, name="plans", topic_id=PLANS_ID, partitions=[]),
            R.MetadataResponseTopic(error_code=3, name="gone", topic_id=uuid.UUID(int=0),
                                    partitions=[]),
            R.MetadataResponseTopic(error_code=100, name=None, topic_id=SECRET_ID,
                                    partitions=[]),
        ],
    )  # fmt: skip
    answer.with_header(correlation_id=9)
    payload = bytes(answer.encode(header=True, framed=True))[4:]
    assert topic_ids(12, payload) == [(PLANS_ID, "plans")]
    assert topic_ids(9, payload) == [] and topic_ids(12, payload[:20]) == []
    known = TopicIds(max_brokers=2, max_ids=2)
    a, b, c = ((IPv4Address("10.0.0.1"), port) for port in (9092, 9093, 9094))
    known.learn(a, [(PLANS_ID, "plans")])
    assert known.names(a) == {PLANS_ID: "plans"} and known.names(b) == {}  # a's alone
    known.learn(a, [(SECRET_ID, "secret"), (uuid.UUID(int=3), "x")])
    assert set(known.names(a)) == {SECRET_ID, uuid.UUID(int=3)}  # bounded, oldest out
    known.learn(b, [])
    known.learn(c, [])
    assert known.names(a) == {}  # bounded brokers, oldest out


def plans_only() -> View:
    return proxy_loop.world_view([{"kafka": {"role": "consume", "topic": "plans"}}])


async def test_a_connection_answers_unknown_ids_with_100_and_other_topics_with_29() -> None:
    """Nothing here is allowed to reach an upstream (there is none): an unknown id alone gets
    UNKNOWN_TOPIC_ID, a topic the rules refuse 29, whichever came with it."""
    data = (
        framed(fetch13(SECRET_ID), correlation_id=1)
        + framed(D[5](topic_names=["plans"], timeout_ms=1), correlation_id=2)
        + framed(F[12](replica_id=-1, topics=[F.FetchTopic(topic="secret", partitions=[])]), 3)
    )
    answer, reported = await proxy_loop.exchange(plans_only(), data)
    assert [cid for cid, _ in split(answer)] == [1, 2, 3]
    assert [(r.api_key, r.topics, r.error_code) for r in reported] == [
        ("fetch", [f"<{SECRET_ID}>"], 100),
        ("deletetopics", ["plans"], 29),  # not the consume role's API
        ("fetch", ["secret"], 29),
    ]
