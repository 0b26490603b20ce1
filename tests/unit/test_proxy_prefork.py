"""The node's proxy in several processes (services/proxy/prefork.py): how many, and what one
process learns that the others must know."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from ipaddress import IPv4Address

import pytest

from services.proxy import prefork
from services.proxy.kafka import TopicIds
from services.proxy.service import ProxySettings
from shared.errors import InvalidArgument


def test_as_many_as_asked_else_one_per_cpu_up_to_four() -> None:
    assert prefork.process_count(1) == 1
    assert prefork.process_count(6) == 6  # asked: more than the default's cap is allowed
    cpus = len(os.sched_getaffinity(0))
    assert prefork.process_count(0) == min(cpus, prefork.MOST_BY_DEFAULT) >= 1
    assert prefork.MOST_BY_DEFAULT == 4


def _channel() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


async def test_topic_ids_learned_in_one_process_reach_every_other() -> None:
    """The leader and two workers' ends in one process, on real channels: a Metadata answer
    seen by one process teaches every other, once (a Fetch by id on a connection another
    process took is not refused for want of it)."""
    (ours1, theirs1), (ours2, theirs2) = _channel(), _channel()
    leader_ids, ids1, ids2 = TopicIds(), TopicIds(), TopicIds()
    workers = prefork.Workers(
        [prefork.Child(1, -1, ours1), prefork.Child(2, -1, ours2)], leader_ids
    )
    one, two = prefork.Worker(1, theirs1), prefork.Worker(2, theirs2)
    ids1.shared, ids2.shared = one.share, two.share
    tasks = [
        asyncio.ensure_future(workers.watch(lambda child, how: None)),
        asyncio.ensure_future(one.listen(ids1)),
        asyncio.ensure_future(two.listen(ids2)),
    ]
    broker = (IPv4Address("10.0.0.9"), 9092)
    orders, audit = uuid.uuid4(), uuid.uuid4()
    many = [(uuid.uuid4(), f"t{i}") for i in range(2500)]  # more than one message holds

    async def everywhere(expected: dict[uuid.UUID, str]) -> None:
        for _ in range(200):
            if all(dict(ids.names(broker)) == expected for ids in (leader_ids, ids1, ids2)):
                return
            await asyncio.sleep(0.01)
        raise AssertionError([dict(ids.names(broker)) for ids in (leader_ids, ids1, ids2)])

    try:
        ids1.learn(broker, [(orders, "orders")])  # a worker's connection saw the answer
        await everywhere({orders: "orders"})
        leader_ids.learn(broker, [(audit, "audit")])  # the leader's did
        await everywhere({orders: "orders", audit: "audit"})
        ids2.learn(broker, many)
        await everywhere({orders: "orders", audit: "audit", **dict(many)})
        # what every process knows already is not sent again
        sent: list[object] = []
        ids1.shared = lambda b, p: sent.append(p)
        ids1.learn(broker, [(orders, "orders")])
        assert sent == [] and workers.malformed == 0
    finally:
        for task in tasks:
            task.cancel()
        for sock in (ours1, theirs1, ours2, theirs2):
            sock.close()


@pytest.mark.parametrize(
    "message",
    [
        b"K",
        b'K{"broker": ["10.0.0.9", "9092"], "pairs": []}',
        b'K{"broker": ["nowhere", 9092], "pairs": []}',
        b'K{"broker": ["10.0.0.9", 9092], "pairs": [["not-a-uuid", "t"]]}',
        b'K{"broker": ["10.0.0.9", 9092], "pairs": [["'
        + str(uuid.UUID(int=7)).encode()
        + b'", 7]]}',
    ],
)
def test_anything_else_is_not_topic_ids(message: bytes) -> None:
    with pytest.raises(ValueError, match="not topic ids"):
        prefork.decode_topics(message)


def test_a_negative_count_is_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="at least 0") as refused:
        ProxySettings(node="n1", proxy_processes=-1)
    assert refused.value.field == "MEMBRANE_PROXY_PROCESSES"
