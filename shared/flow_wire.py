"""The binary flow batch an agent publishes on ``membrane.flows.<node>`` (agent -> monitors).

At a million events a second there is no budget for a Python object per event in the agent,
so the batch carries the ring buffer's records as they are: a header, then ``count`` records of
``record_size`` bytes each, every one the ring buffer's own u32 length and u32 page offset
followed by ``struct flow_event`` (bpf/events.h, :data:`shared.bpf_layouts.FLOW_EVENT`), in the
agent's byte order. The monitor unpacks them with ``struct.iter_unpack`` in one call per batch.

Header (little-endian), then the node's name (UTF-8), then the records::

    magic "MFB1" | byte order u8 (0 little, 1 big) | pad u8 | record_size u16 | count u32
    | clock_offset_ns i64 | lost u64 | dropped_queue u64 | dropped_publish u64 | node_len u16

``clock_offset_ns`` turns the kernel's CLOCK_MONOTONIC timestamps into unix time: it is the
agent's, as the monitor's monotonic clock is another machine's. The three counts are the events
lost since the previous batch, one per stage the agent sees: ``lost`` the kernel could not put in
the ring buffer (it was full), ``dropped_queue`` the agent read but its queue for the bus was full,
``dropped_publish`` the bus did not take (publish failed or timed out, or nats-server delivered
the batch to no monitor replica). With the monitor's own
stage (intake queue full) every event is either enriched or counted lost somewhere.

JSON :class:`~shared.messages.FlowBatch` stays valid on the same subject (the L7 proxy publishes
it; an agent with ``MEMBRANE_FLOW_WIRE=json`` too): a JSON batch starts with ``{``, never with
the magic.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Final

from shared import bpf_layouts

MAGIC: Final = b"MFB1"
HEADER: Final = struct.Struct("<4sBxHIqQQQH")
LITTLE: Final = 0
BIG: Final = 1
NATIVE: Final = LITTLE if sys.byteorder == "little" else BIG
# the ring buffer's record header (u32 length, u32 page offset) and the event, no byte order yet
RECORD_FIELDS: Final = "II" + bpf_layouts.FLOW_EVENT.format[1:]
RECORDS: Final = {
    LITTLE: struct.Struct("<" + RECORD_FIELDS),
    BIG: struct.Struct(">" + RECORD_FIELDS),
}
RECORD_SIZE: Final = RECORDS[LITTLE].size


class MalformedBatch(ValueError):
    """Bytes that are not a binary flow batch of a layout this build reads."""


@dataclass(frozen=True, slots=True)
class BinaryBatch:
    node: str
    count: int
    clock_offset_ns: int
    lost: int
    dropped_queue: int
    dropped_publish: int
    record: struct.Struct  # the layout of one record, in the sender's byte order
    records: memoryview  # count * record.size bytes

    def unpack(self) -> list[tuple[int, ...]]:
        """Every record as a tuple of :data:`RECORD_FIELDS` (one C call for the batch)."""
        return list(self.record.iter_unpack(self.records))


def is_binary(data: bytes) -> bool:
    return data[:4] == MAGIC


def header(
    node: bytes,
    count: int,
    clock_offset_ns: int,
    lost: int = 0,
    dropped_queue: int = 0,
    dropped_publish: int = 0,
) -> bytes:
    """The header and node name that go in front of ``count`` native-order records."""
    return (
        HEADER.pack(
            MAGIC,
            NATIVE,
            RECORD_SIZE,
            count,
            clock_offset_ns,
            lost,
            dropped_queue,
            dropped_publish,
            len(node),
        )
        + node
    )


def counts(data: bytes) -> tuple[int, int, int, int]:
    """(events, lost, dropped_queue, dropped_publish) from the header alone: what a full
    intake queue costs, without reading the records."""
    if len(data) < HEADER.size or not is_binary(data):
        raise MalformedBatch("not a binary flow batch")
    _, _, _, count, _, lost, queue, publish, _ = HEADER.unpack_from(data)
    return count, lost, queue, publish


def decode(data: bytes) -> BinaryBatch:
    if len(data) < HEADER.size or not is_binary(data):
        raise MalformedBatch("not a binary flow batch")
    _, order, size, count, offset, lost, queue, publish, node_len = HEADER.unpack_from(data)
    record = RECORDS.get(order)
    if record is None or size != record.size:
        raise MalformedBatch(f"records of {size} bytes in byte order {order}: unknown layout")
    start = HEADER.size + node_len
    if len(data) != start + count * size:
        raise MalformedBatch(
            f"{len(data)} bytes do not hold a {node_len}-byte name and {count} records"
        )
    try:
        node = bytes(data[HEADER.size : start]).decode()
    except UnicodeDecodeError as exc:
        raise MalformedBatch("node name is not UTF-8") from exc
    return BinaryBatch(node, count, offset, lost, queue, publish, record, memoryview(data)[start:])
