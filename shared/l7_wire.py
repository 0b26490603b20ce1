"""The L7 proxy's flow batch on ``membrane.flows.<node>`` (proxy -> monitors).

Every request the proxy decides is a flow, so at tens of thousands of requests a second the
flows' cost is part of every request's. A :class:`~shared.messages.FlowBatch` spells out all
twenty fields of each flow, most of them the same for every proxy flow, and the monitor made a
Flow, an EnrichedFlow and two FlowPeers of each. This batch carries only what varies between
the proxy's flows, each record a JSON array in a fixed order; the monitor splices a record's
JSON line from cached fragments (:meth:`services.monitor.enrich.Enricher.encode_l7`) as it does
the datapath's binary records.

The magic, then the JSON of :class:`L7Batch` (arrays, not objects)::

    "ML71" ["node", [[time, verdict, direction, protocol, src_ip, src_port, src_identity,
                      dst_ip, dst_port, dst_identity, rule_id, {L7Info}], ...], dropped_publish]

What every proxy flow has in common and the record leaves out: type ``l7``, observation point
``to-proxy``, no drop reason (a denied request is a verdict, not a datapath drop), no TCP flags,
not a reply, no byte count (:func:`flow` spells them out again). ``dropped_publish`` counts the
flows the bus did not take since the previous batch, so the monitor can count them lost.

A JSON :class:`~shared.messages.FlowBatch` starts with ``{`` and a binary one with ``MFB1``:
the three share the subject and the monitor tells them apart by their first bytes.
"""

from __future__ import annotations

from typing import Final

import msgspec

from shared.messages import Flow, L7Info

MAGIC: Final = b"ML71"
TYPE: Final = "l7"
OBSERVATION_POINT: Final = "to-proxy"


class L7Record(msgspec.Struct, array_like=True, gc=False):
    """One request the proxy decided (or one DNS query it answered)."""

    time: float  # unix time, seconds
    verdict: str  # "FORWARDED" | "DROPPED"
    direction: str  # the direction whose rules decided: "ingress" | "egress" | ""
    protocol: str  # the transport: "TCP" (DNS: "UDP" or "TCP")
    src_ip: str
    src_port: int
    src_identity: int
    dst_ip: str
    dst_port: int
    dst_identity: int
    rule_id: int
    l7: L7Info


class L7Batch(msgspec.Struct, array_like=True, gc=False):
    node: str
    records: list[L7Record]
    dropped_publish: int = 0


class MalformedBatch(ValueError):
    """Bytes that start with the magic but are no L7 batch."""


class _Size(msgspec.Struct, array_like=True):
    """Just enough of a batch to count what a monitor's full queue costs."""

    node: str
    records: list[msgspec.Raw]
    dropped_publish: int = 0


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(L7Batch)
_size_decoder: Final = msgspec.json.Decoder(_Size)


def is_l7(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(batch: L7Batch) -> bytes:
    return MAGIC + _encoder.encode(batch)


def decode(data: bytes) -> L7Batch:
    try:
        return _decoder.decode(memoryview(data)[4:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedBatch(f"L7 flow batch: {exc}") from None


def counts(data: bytes) -> tuple[int, int]:
    """(flows, dropped_publish) without decoding the records."""
    try:
        size = _size_decoder.decode(memoryview(data)[4:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedBatch(f"L7 flow batch: {exc}") from None
    return len(size.records), size.dropped_publish


def flow(record: L7Record, node: str) -> Flow:
    """The record as the Flow it stands for (every field spelled out)."""
    return Flow(
        time=record.time,
        node=node,
        type=TYPE,
        verdict=record.verdict,
        direction=record.direction,
        observation_point=OBSERVATION_POINT,
        src_ip=record.src_ip,
        dst_ip=record.dst_ip,
        src_port=record.src_port,
        dst_port=record.dst_port,
        protocol=record.protocol,
        src_identity=record.src_identity,
        dst_identity=record.dst_identity,
        rule_id=record.rule_id,
        l7=record.l7,
    )
