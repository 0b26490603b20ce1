"""Kafka requests read, and denials written, with kafka-python's protocol module (the codec
generated from Kafka's own message schemas, every API and version it knows).

A request is decoded whole (header and body) before anything is decided: what does not decode
is never forwarded. A denied request is answered by the proxy with the response of that API and
version, every error code in it ``TOPIC_AUTHORIZATION_FAILED`` (29), its topics and partitions
echoed from the request the way a broker that refused them answers, so the client sees the
refusal per topic and keeps its connection.

The topics a request names are read from every field Kafka's schemas mark as a topic name
(``entityType: topicName``), at any depth, and every topic id (``TopicId``); an id is named by
the broker's own Metadata answers (``topic_ids``, kept by the connection handler), else it
stands as ``<id>``, which no rule's topic matches.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kafka.protocol.admin
import kafka.protocol.consumer
import kafka.protocol.metadata
import kafka.protocol.producer  # noqa: F401  (the imports register every API's classes)
from kafka.protocol.api_header import ResponseClassRegistry
from kafka.protocol.api_message import ApiMessage
from kafka.protocol.metadata import MetadataResponse

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
METADATA_RESPONSE: Any = MetadataResponse


# A field of a request that names a topic: by name (Kafka's schemas mark them ``entityType:
# topicName``: a string, or an array of strings) or by id (``TopicId``, a UUID: Produce v13+,
# Fetch v13+, Metadata v10+, OffsetCommit v10+, OffsetFetch v10+, DeleteTopics v6+).
_NAME, _NAMES, _ID, _ITEMS, _STRUCT = range(5)
_Plan = tuple[tuple[int, str, Any, "_Plan"], ...]  # (kind, attribute, field, the items' plan)
ZERO_ID = uuid.UUID(int=0)  # "no id": the name says which topic


def _plan(struct_field: Any) -> _Plan:
    """Where ``struct_field``'s topic fields are, at any depth (only what leads to one)."""
    steps: list[tuple[int, str, Any, _Plan]] = []
    for field in struct_field._fields:
        if field.is_struct_array() or field.is_struct():
            many = field.is_struct_array()
            inner = _plan(field.array_of if many else field)
            if inner:
                steps.append((_ITEMS if many else _STRUCT, field.name, field, inner))
        elif field._entity_type == "topicName":
            steps.append((_NAMES if field.is_array() else _NAME, field.name, field, ()))
        elif field.name == "topic_id":
            steps.append((_ID, field.name, field, ()))
    return tuple(steps)


PLANS = {key: _plan(cls._struct) for key, cls in REQUESTS.items()}


def _refs(plan: _Plan, node: Any, version: int, out: list[str | uuid.UUID]) -> None:
    """Every topic ``node`` names in ``version``: names (non-empty) and ids (non-zero)."""
    for kind, attribute, field, inner in plan:
        if not field.for_version_q(version):
            continue
        value = getattr(node, attribute, None)
        if kind == _NAME:
            if value:
                out.append(value)
        elif kind == _NAMES:
            out += [name for name in value or () if name]
        elif kind == _ID:
            if isinstance(value, uuid.UUID) and value != ZERO_ID:
                out.append(value)
        elif kind == _ITEMS:
            for item in value or ():
                _refs(inner, item, version, out)
        elif value is not None:
            _refs(inner, value, version, out)


def unknown_id(topic_id: uuid.UUID) -> str:
    """What stands for a topic id no Metadata answer named: no rule's topic matches it."""
    return f"<{topic_id}>"


@dataclass(frozen=True)
class Parsed:
    request: KafkaRequest
    correlation_id: int
    body: Any  # the decoded request (kafka-python's data container)
    expects_response: bool  # false for produce with acks=0
    frame: bytes  # what was decoded, encoded again (size, header, body): what is forwarded
    unknown_ids: tuple[uuid.UUID, ...] = ()  # topic ids ``topic_names`` could not name


def parse(payload: bytes, topic_names: Mapping[uuid.UUID, str] | None = None) -> Parsed:
    """One request frame's payload (without its size): KafkaDecodeError when it does not
    decode as the API and version its header names. A topic named by id is named by
    ``topic_names`` (what the broker's own Metadata answers said), else it is ``<id>``,
    which no rule's topic matches, and listed in ``unknown_ids``."""
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
        topics, unknown = _topics(api_key, version, body, topic_names or {})
        request = KafkaRequest(api_key, version, client_id, topics)
        frame = bytes(body.encode(header=True, framed=True))
    except Exception as exc:  # the codec raises whatever a truncated buffer makes it raise
        raise KafkaDecodeError(f"undecodable {cls.name} v{version}: {exc}") from None
    return Parsed(request, correlation_id, body, bool(body.expect_response()), frame, unknown)


def _topics(
    api_key: int, version: int, body: Any, names: Mapping[uuid.UUID, str]
) -> tuple[tuple[str, ...] | None, tuple[uuid.UUID, ...]]:
    """The topics the request names, every field that can name one (an item giving a name
    and an id names both); None for "every topic" (metadata's null list)."""
    if api_key == 3 and body.topics is None:
        return None, ()
    refs: list[str | uuid.UUID] = []
    _refs(PLANS[api_key], body, version, refs)
    topics: list[str] = []
    unknown: list[uuid.UUID] = []
    for ref in refs:
        if isinstance(ref, str):
            topics.append(ref)
        elif (name := names.get(ref)) is not None:
            topics.append(name)
        else:
            topics.append(unknown_id(ref))
            unknown.append(ref)
    return tuple(dict.fromkeys(topics)), tuple(dict.fromkeys(unknown))


def topic_ids(api_version: int, payload: bytes) -> list[tuple[uuid.UUID, str]]:
    """(id, name) of every topic a Metadata response (v10+, the payload without its size)
    names with both, without error; [] for anything else or what does not decode."""
    if api_version < 10:
        return []
    try:
        response = METADATA_RESPONSE.decode(payload, version=api_version, header=True)
        return [
            (topic.topic_id, topic.name)
            for topic in response.topics or ()
            if topic.error_code == 0
            and topic.name
            and isinstance(topic.topic_id, uuid.UUID)
            and topic.topic_id != ZERO_ID
        ]
    except Exception:  # an answer the codec cannot read teaches nothing
        return []


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


def denial(parsed: Parsed, error: int = TOPIC_AUTHORIZATION_FAILED) -> bytes:
    """The framed response of the request's API and version refusing it: ``error`` (29,
    TOPIC_AUTHORIZATION_FAILED, or 100, UNKNOWN_TOPIC_ID) wherever the response has an error
    code, the request's topics and partitions echoed."""
    api_key, version = parsed.request.api_key, parsed.request.api_version
    cls = ResponseClassRegistry.get_response_class(parsed.body.header)
    if cls is None:  # every request class has its response (kafka-python's registry)
        raise KafkaDecodeError(f"no response known for API key {api_key}")
    try:
        response = cls(version=version, **_echo(cls._struct, parsed.body, version, error))
        response.with_header(correlation_id=parsed.correlation_id)
        return bytes(response.encode(header=True, framed=True))
    except Exception as exc:  # a request the codec read but cannot answer: never forwarded
        raise KafkaDecodeError(f"cannot answer {cls.name} v{version}: {exc}") from None


def _echo(struct_field: Any, source: Any, version: int, error: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in struct_field._fields:
        if not field.for_version_q(version):
            continue
        name = field.name
        if name == "error_code":
            values[name] = error
        elif field.is_struct_array():
            items = _source_list(source, _ECHO.get(name, (name,)))
            element = field.array_of  # the array's own copy of the fields has no classes
            values[name] = [
                element.data_class(**_echo(element, item, version, error)) for item in items
            ]
        elif field.is_struct():
            values[name] = field.data_class(**_echo(field, None, version, error))
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
