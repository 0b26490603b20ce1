"""Kafka requests read, and denials written, with kafka-python's protocol module (the codec
generated from Kafka's own message schemas, every API and version it knows).

A request is decoded whole (header and body) before anything is decided: what does not decode
is never forwarded. A denied request is answered by the proxy with the response of that API and
version, every error code in it ``TOPIC_AUTHORIZATION_FAILED`` (29), its topics and partitions
echoed from the request the way a broker that refused them answers, so the client sees the
refusal per topic and keeps its connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import kafka.protocol.admin
import kafka.protocol.consumer
import kafka.protocol.metadata
import kafka.protocol.producer  # noqa: F401  (the imports register every API's classes)
from kafka.protocol.api_header import ResponseClassRegistry
from kafka.protocol.api_message import ApiMessage

from shared.l7_kafka import TOPIC_AUTHORIZATION_FAILED, KafkaRequest

MAX_FRAME = 100 << 20  # kafka-python's and the broker's default limit on one message


class KafkaDecodeError(Exception):
    pass


def _request_classes() -> dict[int, Any]:
    found: dict[int, Any] = {}
    stack = list(ApiMessage.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        json = getattr(cls, "_json", None)
        if json and json.get("type") == "request" and cls._class_version is None:
            found[cls.API_KEY] = cls
    return found


REQUESTS = _request_classes()


@dataclass(frozen=True)
class Parsed:
    request: KafkaRequest
    correlation_id: int
    body: Any  # the decoded request (kafka-python's data container)
    expects_response: bool  # false for produce with acks=0
    frame: bytes  # what was decoded, encoded again (size, header, body): what is forwarded


def parse(payload: bytes) -> Parsed:
    """One request frame's payload (without its size): KafkaDecodeError when it does not
    decode as the API and version its header names."""
    if len(payload) < 8:
        raise KafkaDecodeError("request shorter than its header")
    api_key, version, correlation_id = struct.unpack_from(">hhi", payload)
    cls = REQUESTS.get(api_key)
    if cls is None:
        raise KafkaDecodeError(f"unknown API key {api_key}")
    if not 0 <= version <= cls.max_version:
        raise KafkaDecodeError(f"API key {api_key} has no version {version}")
    try:
        body = cls.decode(payload, version=version, header=True)
        client_id = body.header.client_id or ""
        request = KafkaRequest(api_key, version, client_id, _topics(api_key, body))
        frame = bytes(body.encode(header=True, framed=True))
    except Exception as exc:  # the codec raises whatever a truncated buffer makes it raise
        raise KafkaDecodeError(f"undecodable {cls.name} v{version}: {exc}") from None
    return Parsed(request, correlation_id, body, bool(body.expect_response()), frame)


def _topics(api_key: int, body: Any) -> tuple[str, ...] | None:
    """The topic names the request carries; None for "every topic" (metadata's null list).
    A topic named by id only becomes ``<id>``, which no rule's topic matches."""
    if api_key == 3 and body.topics is None:
        return None
    names: list[str] = []
    for field in ("topic_data", "topics", "groups"):
        items = getattr(body, field, None) if field in body.fields else None
        for item in items or ():
            if field == "groups":
                names += _names(getattr(item, "topics", None) or ())
            else:
                names += _names((item,))
    return tuple(dict.fromkeys(names))


def _names(items: Any) -> list[str]:
    out = []
    for item in items:
        name = getattr(item, "name", None) if "name" in item.fields else None
        if name is None and "topic" in item.fields:
            name = item.topic
        out.append(name if name else f"<{getattr(item, 'topic_id', '')}>")
    return out


# the request's list a response's list echoes, where the names differ
_ECHO = {
    "responses": ("topic_data", "topics"),
    "partition_responses": ("partition_data",),
    "partitions": ("partitions", "partition_data", "partition_indexes"),
    "coordinators": ("coordinator_keys",),
    "results": ("topics",),
}
# a response's key field, and the request's fields that carry it
_KEYS = {
    "partition_index": ("partition_index", "partition", "index"),
    "index": ("index", "partition", "partition_index"),
    "name": ("name", "topic"),
    "topic": ("topic", "name"),
    "topic_id": ("topic_id",),
    "group_id": ("group_id",),
}


def denial(parsed: Parsed) -> bytes:
    """The framed response of the request's API and version refusing it: error 29 wherever
    the response has an error code, the request's topics and partitions echoed."""
    api_key, version = parsed.request.api_key, parsed.request.api_version
    cls = ResponseClassRegistry.get_response_class(parsed.body.header)
    if cls is None:  # every request class has its response (kafka-python's registry)
        raise KafkaDecodeError(f"no response known for API key {api_key}")
    try:
        response = cls(version=version, **_echo(cls._struct, parsed.body, version))
        response.with_header(correlation_id=parsed.correlation_id)
        return bytes(response.encode(header=True, framed=True))
    except Exception as exc:  # a request the codec read but cannot answer: never forwarded
        raise KafkaDecodeError(f"cannot answer {cls.name} v{version}: {exc}") from None


def _echo(struct_field: Any, source: Any, version: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in struct_field._fields:
        if not field.for_version_q(version):
            continue
        name = field.name
        if name == "error_code":
            values[name] = TOPIC_AUTHORIZATION_FAILED
        elif field.is_struct_array():
            items = _source_list(source, _ECHO.get(name, (name,)))
            element = field.array_of  # the array's own copy of the fields has no classes
            values[name] = [element.data_class(**_echo(element, item, version)) for item in items]
        elif field.is_struct():
            values[name] = field.data_class(**_echo(field, None, version))
        else:
            values[name] = _key(source, name, field.default)
    return values


def _source_list(source: Any, names: tuple[str, ...]) -> list[Any]:
    if source is None or isinstance(source, int):
        return []
    for name in names:
        if name in source.fields:
            value = getattr(source, name, None)
            if isinstance(value, list):
                return value
    return []


def _key(source: Any, name: str, default: Any) -> Any:
    if isinstance(source, int):  # an element of partition_indexes
        return source if name in _KEYS["partition_index"] else default
    if isinstance(source, str):  # an element of coordinator_keys
        return source if name == "key" else default
    for candidate in _KEYS.get(name, ()) if source is not None else ():
        if candidate in source.fields:
            return getattr(source, candidate)
    return default
