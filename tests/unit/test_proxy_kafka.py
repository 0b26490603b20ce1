"""Kafka in the L7 proxy: Cilium's rule semantics, the denials kafka-python's codec writes for
each API and version, and a connection over real loopback TCP whose requests are all denied
(no upstream), with a fuzz run of a fixed seed: whatever arrives, nothing is forwarded, the
proxy answers only with error 29 or closes, and never crashes."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgspec
import pytest
from kafka.protocol.api_header import ResponseClassRegistry
from kafka.protocol.consumer import FetchRequest, ListOffsetsRequest, OffsetFetchRequest
from kafka.protocol.metadata import FindCoordinatorRequest, MetadataRequest
from kafka.protocol.producer import ProduceRequest

from services.proxy.kafka_codec import denial, parse
from services.proxy.view import View
from shared import identities, l7_kafka
from shared.errors import InvalidArgument
from shared.l7_kafka import KafkaRequest
from shared.messages import L7Info, PolicyEntry, ResolvedPolicy
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
    view = View()
    nobody = {"kafka": {"apiKey": "alterconfigs", "clientID": "no-client-of-these-tests"}}
    allow = PolicyEntry(peer=0, protocol=6, port=0, rule_id=1, l7=[nobody])
    policy = ResolvedPolicy(
        identity=identities.WORLD, revision=1, ingress_enforced=True, ingress=[allow],
        rules={1: "default/empire[0]"},
    )  # fmt: skip
    view.set_resolved(str(identities.WORLD), msgspec.json.encode(policy))
    return view


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
