"""Decoding hand-packed ``struct flow_event`` records (bpf/events.h) into flows."""

from __future__ import annotations

import socket
import struct
import time

import msgspec
import pytest

from shared import reasons
from shared.bus import encode
from shared.flow_decode import (
    EVENT_SIZE,
    RECORD,
    Decoder,
    WireBatch,
    decode_events,
    to_flow,
)
from shared.messages import Flow, FlowBatch

# struct flow_event spelled out field by field, independently of the decoder's format
LAYOUT = [
    ("ts_ns", "Q"),
    ("type", "B"),
    ("reason", "B"),
    ("direction", "B"),
    ("obs_point", "B"),
    ("protocol", "B"),
    ("tcp_flags", "B"),
    ("flags", "B"),
    ("pad", "B"),
    ("ifindex", "I"),
    ("src_identity", "I"),
    ("dst_identity", "I"),
    ("saddr", "4s"),
    ("daddr", "4s"),
    ("sport", "H"),
    ("dport", "H"),
    ("rule_id", "I"),
    ("len", "I"),
]
# host byte order, as the kernel writes it; the addresses are network-order bytes
FORMAT = "=" + "".join(code for _, code in LAYOUT)


def event(**fields: object) -> bytes:
    values: dict[str, object] = {
        "ts_ns": time.monotonic_ns(),
        "type": 1,
        "reason": 133,
        "direction": 1,
        "obs_point": 2,
        "protocol": 6,
        "tcp_flags": 0x12,
        "flags": 0,
        "pad": 0,
        "ifindex": 7,
        "src_identity": 256,
        "dst_identity": 1234567,
        "saddr": socket.inet_aton("10.244.1.5"),
        "daddr": socket.inet_aton("192.168.0.255"),
        "sport": 43210,
        "dport": 443,
        "rule_id": 42,
        "len": 1500,
    }
    values.update(fields)
    return struct.pack(FORMAT, *(values[name] for name, _ in LAYOUT))


def one(**fields: object) -> Flow:
    (flow,) = decode_events([event(**fields)], "node-1")
    return flow


def test_layout_is_48_bytes() -> None:
    assert struct.calcsize(FORMAT) == EVENT_SIZE == 48
    assert RECORD.size == 56


def test_every_field_of_a_drop() -> None:
    before = time.time()
    flow = one()
    assert before - 0.01 <= flow.time <= time.time() + 0.01
    assert flow == Flow(
        time=flow.time,
        node="node-1",
        type="drop",
        verdict="DROPPED",
        reason=133,
        reason_name="Policy denied",
        direction="ingress",
        observation_point="to-endpoint",
        src_ip="10.244.1.5",
        dst_ip="192.168.0.255",
        src_port=43210,
        dst_port=443,
        protocol="TCP",
        tcp_flags=["SYN", "ACK"],
        src_identity=256,
        dst_identity=1234567,
        ifindex=7,
        rule_id=42,
        is_reply=False,
        bytes=1500,
    )


def test_time_is_the_events_monotonic_time_as_unix_time() -> None:
    earlier = one(ts_ns=time.monotonic_ns() - 5_000_000_000)
    assert earlier.time == pytest.approx(time.time() - 5, abs=0.01)


@pytest.mark.parametrize(
    ("kind", "flags", "type_name", "verdict"),
    [
        (1, 0, "drop", "DROPPED"),
        (1, 0x2, "drop", "DROPPED"),
        (2, 0, "trace", "FORWARDED"),
        (2, 0x2, "trace", "FORWARDED"),
        (3, 0x2, "policy-verdict", "FORWARDED"),
        (3, 0x3, "policy-verdict", "FORWARDED"),
        (3, 0, "policy-verdict", "DROPPED"),
        (3, 0x1, "policy-verdict", "DROPPED"),
    ],
)
def test_type_and_verdict(kind: int, flags: int, type_name: str, verdict: str) -> None:
    flow = one(type=kind, flags=flags)
    assert (flow.type, flow.verdict, flow.is_reply) == (type_name, verdict, bool(flags & 1))


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0, ""),  # forwarded: no reason name, as Hubble shows it
        (133, "Policy denied"),
        (181, "Policy denied by denylist"),
        (158, "Service backend not found"),
        (183, "Incorrect VNI from VTEP"),
        (134, "Invalid packet"),
        (139, "Unsupported L3 protocol"),
        (250, "Unknown reason 250"),
    ],
)
def test_reason_names(code: int, name: str) -> None:
    flow = one(reason=code)
    assert (flow.reason, flow.reason_name) == (code, name)


def test_reason_constants_and_lookup() -> None:
    assert reasons.reason_name(reasons.POLICY_DENIED) == "Policy denied"
    assert reasons.reason_name(reasons.POLICY_DENY) == "Policy denied by denylist"
    assert reasons.reason_name(reasons.NO_SERVICE) == "Service backend not found"
    assert reasons.reason_name(reasons.INVALID_VNI) == "Incorrect VNI from VTEP"
    assert reasons.reason_name(reasons.INVALID_PACKET) == "Invalid packet"
    assert reasons.reason_name(reasons.UNSUPPORTED_L3) == "Unsupported L3 protocol"
    assert reasons.reason_name(reasons.CT_INVALID_HDR) == "CT: Truncated or invalid header"
    assert reasons.reason_name(1000) == "Unknown reason 1000"


@pytest.mark.parametrize(
    ("number", "name"), [(6, "TCP"), (17, "UDP"), (1, "ICMP"), (132, "132"), (0, "0")]
)
def test_protocols(number: int, name: str) -> None:
    assert one(protocol=number).protocol == name


@pytest.mark.parametrize(
    ("bits", "names"),
    [
        (0, []),
        (0x01, ["FIN"]),
        (0x02, ["SYN"]),
        (0x12, ["SYN", "ACK"]),
        (0x11, ["FIN", "ACK"]),
        (0x14, ["RST", "ACK"]),
        (0x18, ["PSH", "ACK"]),
        (0xFF, ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]),
    ],
)
def test_tcp_flags_in_hubbles_order(bits: int, names: list[str]) -> None:
    assert one(tcp_flags=bits).tcp_flags == names


def test_tcp_flag_lists_are_each_flows_own() -> None:
    first, second = decode_events([event(), event()], "n")
    first.tcp_flags.append("NS")
    assert second.tcp_flags == ["SYN", "ACK"]


@pytest.mark.parametrize(
    ("direction", "point", "names"),
    [
        (1, 1, ("ingress", "from-endpoint")),
        (2, 2, ("egress", "to-endpoint")),
        (0, 0, ("", "")),
        (9, 9, ("", "")),
    ],
)
def test_direction_and_observation_point(
    direction: int, point: int, names: tuple[str, str]
) -> None:
    flow = one(direction=direction, obs_point=point)
    assert (flow.direction, flow.observation_point) == names


def test_unknown_type_keeps_its_number() -> None:
    flow = one(type=9)
    assert (flow.type, flow.verdict) == ("9", "DROPPED")


def test_reply_flag() -> None:
    assert one(flags=0x1).is_reply
    assert not one(flags=0x2).is_reply


def test_many_addresses_stay_right_past_the_cache_size() -> None:
    addresses = [struct.pack(">I", 0x0A000000 + i) for i in range(70_000)]
    flows = decode_events((event(saddr=a, daddr=a) for a in addresses), "n")
    assert [f.src_ip for f in flows] == [socket.inet_ntoa(a) for a in addresses]
    assert [f.dst_ip for f in flows] == [f.src_ip for f in flows]


def test_a_record_of_another_size_is_refused() -> None:
    with pytest.raises(struct.error):
        decode_events([event()[:40]], "n")


def test_wire_batch_is_byte_for_byte_a_flow_batch() -> None:
    payloads = [
        event(type=t, reason=r, flags=f, protocol=p, tcp_flags=t * 7, rule_id=i)
        for i, (t, r, f, p) in enumerate(
            [(1, 133, 0, 6), (2, 0, 1, 17), (3, 0, 2, 1), (3, 133, 0, 132), (1, 250, 3, 6)]
        )
    ]
    records = [RECORD.unpack(struct.pack("=II", EVENT_SIZE, 0) + p) for p in payloads]
    wire = Decoder("node-7").wire(records)
    batch = WireBatch(node="node-7", flows=wire, lost=3)
    expected = FlowBatch(node="node-7", flows=[to_flow(w) for w in wire], lost=3)
    assert encode(batch) == encode(expected)
    assert msgspec.json.decode(encode(batch), type=FlowBatch) == expected
    assert [f.rule_id for f in expected.flows] == [0, 1, 2, 3, 4]


def test_wire_flows_decode_like_flows() -> None:
    payloads = [event(rule_id=i, sport=i) for i in range(10)]
    records = [RECORD.unpack(struct.pack("=II", EVENT_SIZE, 0) + p) for p in payloads]
    wire = [to_flow(w) for w in Decoder("n").wire(records)]
    plain = decode_events(payloads, "n")
    # the same but for time, which each call derives from its own clock reading
    assert [msgspec.structs.replace(f, time=0) for f in wire] == [
        msgspec.structs.replace(f, time=0) for f in plain
    ]
    assert [f.time for f in wire] == pytest.approx([f.time for f in plain], abs=1e-3)
