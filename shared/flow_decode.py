"""Decode ``struct flow_event`` (bpf/events.h) records into flows: the agent (JSON wire) and
the monitor (binary batches, :mod:`shared.flow_wire`) share it.

Built for hundreds of thousands of events a second: the layout is one precompiled struct,
every name is a table lookup by the raw number, addresses are formatted once and cached, and
the publisher builds :class:`WireFlow` positionally (several times cheaper than the keyword
constructor of :class:`~shared.messages.Flow`) while producing the very same JSON.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

from shared import bpf_layouts, protocols
from shared.messages import SCHEMA_VERSION, Flow, L7Info, Message
from shared.reasons import reason_name

EVENT_SIZE: Final = 48
# struct flow_event, native byte order (the kernel writes host-order integers), no padding;
# saddr/daddr are read as host-order u32 and packed back to get their network-order bytes
EVENT: Final = bpf_layouts.FLOW_EVENT
# a ring buffer record: the u32 length and u32 page offset header, then the event
RECORD: Final = struct.Struct("=II" + EVENT.format[1:])
assert EVENT.size == EVENT_SIZE and RECORD.size == EVENT_SIZE + 8

EVENT_DROP: Final = 1
EVENT_TRACE: Final = 2
EVENT_POLICY_VERDICT: Final = 3
F_REPLY: Final = 0x1
F_ALLOWED: Final = 0x2
F_AUDIT: Final = 0x4  # policy would deny; allowed because the endpoint is in audit mode
VERDICT_BITS: Final = F_ALLOWED | F_AUDIT

# how often the monotonic -> unix offset is re-read (NTP slews the wall clock)
CLOCK_REFRESH_S: Final = 1.0
# distinct addresses whose text is kept; beyond it the cache starts over
IP_CACHE_SIZE: Final = 65536


def _table(names: dict[int, str], default: str | None = None) -> tuple[str, ...]:
    """Index 0..255 -> name; numbers without a name read as ``default`` or themselves."""
    return tuple(names.get(n, str(n) if default is None else default) for n in range(256))


TYPES: Final = _table(
    {EVENT_DROP: "drop", EVENT_TRACE: "trace", EVENT_POLICY_VERDICT: "policy-verdict"}
)
DIRECTIONS: Final = _table({1: "ingress", 2: "egress"}, "")
OBSERVATION_POINTS: Final = _table(
    {
        1: "from-endpoint",
        2: "to-endpoint",
        3: "to-overlay",
        4: "from-overlay",
        5: "from-network",
        6: "to-proxy",
        7: "from-proxy",
    },
    "",
)
# the protocols the datapath reports by name; others (SCTP too) print as their number
PROTOCOLS: Final = _table(
    {n: protocols.NAMES[n] for n in (protocols.TCP, protocols.UDP, protocols.ICMP)}
)
# forwarded events carry reason 0 and, like Hubble, no reason name
REASON_NAMES: Final = ("", *(reason_name(code) for code in range(1, 256)))
# bit order of the TCP header, names and order as Hubble prints them
TCP_FLAG_NAMES: Final = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
TCP_FLAGS: Final = tuple(
    [name for bit, name in enumerate(TCP_FLAG_NAMES) if flags & (1 << bit)] for flags in range(256)
)


def _verdicts() -> tuple[str, ...]:
    """Index ``type << 3 | (flags & VERDICT_BITS)`` -> verdict."""
    table = ["DROPPED"] * (256 << 3)
    table[EVENT_TRACE << 3] = table[EVENT_TRACE << 3 | F_ALLOWED] = "FORWARDED"
    table[EVENT_POLICY_VERDICT << 3 | F_ALLOWED] = "FORWARDED"
    table[EVENT_POLICY_VERDICT << 3 | F_AUDIT] = "AUDIT"
    table[EVENT_POLICY_VERDICT << 3 | F_AUDIT | F_ALLOWED] = "AUDIT"
    return tuple(table)


VERDICTS: Final = _verdicts()


class WireFlow(msgspec.Struct, gc=False):
    """:class:`~shared.messages.Flow`'s fields in its encoding order, built positionally.

    It encodes to the same JSON as the Flow with the same values; it exists only on the way
    to the wire (its tcp_flags lists are shared between flows and must not be mutated).
    """

    time: float
    node: str
    type: str
    verdict: str
    reason: int
    reason_name: str
    direction: str
    observation_point: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    protocol: str
    tcp_flags: list[str]
    src_identity: int
    dst_identity: int
    ifindex: int
    rule_id: int
    is_reply: bool
    bytes: int
    l7: L7Info | None = None  # the proxy's flows only
    v: int = SCHEMA_VERSION


class WireBatch(Message):
    """Encodes as :class:`~shared.messages.FlowBatch` does, with WireFlow flows."""

    node: str
    flows: list[WireFlow]
    lost: int = 0


def _check_wire_layout() -> None:
    """WireFlow must track Flow field for field, or the two would encode differently."""
    flow = [(f.name, f.type) for f in msgspec.structs.fields(Flow)]
    wire = [(f.name, f.type) for f in msgspec.structs.fields(WireFlow)]
    # Flow's inherited ``v`` is keyword-only and so encoded last
    flow = [f for f in flow if f[0] != "v"] + [f for f in flow if f[0] == "v"]
    if flow != wire:
        raise RuntimeError(f"WireFlow is out of step with Flow: {wire} != {flow}")


_check_wire_layout()


class AddressNames(dict[int, str]):
    """Host-order u32 of a network-order IPv4 address -> dotted quad, computed on first use."""

    _pack = struct.Struct("=I").pack

    def __missing__(self, raw: int) -> str:
        if len(self) >= IP_CACHE_SIZE:
            self.clear()
        text = self[raw] = socket.inet_ntoa(self._pack(raw))
        return text


class Decoder:
    """Decodes the events of one node; keeps the clock offset and the address cache."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._addresses = AddressNames()
        self._offset_ns = 0
        self._offset_read = -CLOCK_REFRESH_S
        self._refresh_clock()

    def clock_offset_ns(self) -> int:
        """Unix time minus CLOCK_MONOTONIC here, re-read at most once a second (so that the
        flows of one second keep their order across batches)."""
        self._refresh_clock()
        return self._offset_ns

    def _refresh_clock(self) -> None:
        now = time.monotonic()
        if now - self._offset_read >= CLOCK_REFRESH_S:
            # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as time.monotonic_ns() is on Linux
            self._offset_ns = time.time_ns() - time.monotonic_ns()
            self._offset_read = now

    def wire(
        self, records: Sequence[tuple[Any, ...]], offset_ns: int | None = None
    ) -> list[WireFlow]:
        """Flows from :data:`RECORD` tuples (ring buffer header first), ready to encode.

        ``offset_ns``: unix time minus CLOCK_MONOTONIC on the node that wrote the records
        (a binary batch says it); by default this machine's, for a decoder on the node.
        """
        offset = self.clock_offset_ns() if offset_ns is None else offset_ns
        node = self.node
        ips = self._addresses
        types, verdicts, reasons = TYPES, VERDICTS, REASON_NAMES
        directions, points, protocols, flags = DIRECTIONS, OBSERVATION_POINTS, PROTOCOLS, TCP_FLAGS
        return [
            WireFlow(
                (ts + offset) / 1e9,
                node,
                types[kind],
                verdicts[kind << 3 | (fl & VERDICT_BITS)],
                reason,
                reasons[reason],
                directions[direction],
                points[point],
                ips[saddr],
                ips[daddr],
                sport,
                dport,
                protocols[proto],
                flags[tcp],
                src_id,
                dst_id,
                ifindex,
                rule_id,
                (fl & F_REPLY) == F_REPLY,
                length,
            )
            for (
                _len,
                _pg_off,
                ts,
                kind,
                reason,
                direction,
                point,
                proto,
                tcp,
                fl,
                _pad,
                ifindex,
                src_id,
                dst_id,
                saddr,
                daddr,
                sport,
                dport,
                rule_id,
                length,
            ) in records
        ]

    def flows(self, records: Iterable[bytes]) -> list[Flow]:
        """Flows from event payloads (``EVENT_SIZE`` bytes each)."""
        unpack = EVENT.unpack
        wire = self.wire([(EVENT_SIZE, 0, *unpack(record)) for record in records])
        return [to_flow(flow) for flow in wire]


def to_flow(wire: WireFlow) -> Flow:
    """The message type of a wire flow, with a list of its own."""
    fields = msgspec.structs.asdict(wire)
    fields["tcp_flags"] = list(wire.tcp_flags)
    return Flow(**fields)


def decode_events(records: Iterable[bytes], node: str) -> list[Flow]:
    """Flows from ``struct flow_event`` payloads of ``node``'s ring buffer."""
    return Decoder(node).flows(records)
