"""``membrane observe``'s Hubble habits on plain data: filters, times, counts and formats."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from msgspec.structs import replace

from membrane import cli_observe, flowfmt
from membrane.cli import build_parser
from membrane.flowfmt import Style
from shared.errors import InvalidArgument
from shared.flow_api import EnrichedFlow, FlowFilterTerm, FlowPeer
from shared.flow_filter import compile_filter
from tests.unit.test_monitor_pure import DEATHSTAR, XWING, make

SERVED = FlowPeer(
    ip="10.0.2.7", port=80, identity=5678, namespace="default", pod="deathstar-1",
    service="default/deathstar",
)  # fmt: skip


def matches(flow: EnrichedFlow, field: str, value: str, until: float = 0.0) -> bool:
    return compile_filter([FlowFilterTerm(field=field, values=[value])], until)(flow)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("protocol", "6", True),
        ("protocol", "tcp", True),
        ("protocol", "1", False),
        ("protocol", "17", False),
        ("to_service", "deathstar", True),
        ("to_service", "default/deathstar", True),
        ("to_service", "other/deathstar", False),
        ("from_service", "deathstar", False),
        ("service", "deathstar", True),
        ("traffic_direction", "INGRESS", True),
        ("traffic_direction", "egress", False),
        ("tcp_flags", "SYN", True),
        ("tcp_flags", "syn,ack", False),
        ("node", "n1", True),
        ("node", "n*", True),
        ("node", "n2", False),
        ("reply", "false", True),
        ("reply", "true", False),
    ],
)
def test_hubble_filters(field: str, value: str, expected: bool) -> None:
    assert matches(make(dst=SERVED), field, value) is expected


def test_icmp_matches_protocol_1_and_sctp_its_number() -> None:
    assert matches(make(protocol="ICMP", tcp_flags=[]), "protocol", "1")
    assert matches(make(protocol="132", tcp_flags=[]), "protocol", "SCTP")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("protocol", "XYZ", "unknown protocol"),
        ("protocol", "300", "out of range"),
        ("traffic_direction", "up", "unknown direction"),
        ("tcp_flags", "SYN,BOGUS", "unknown TCP flag"),
        ("reply", "maybe", "true or false"),
        ("service", "ns/", "no name"),
    ],
)
def test_bad_hubble_filters_are_errors(field: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        compile_filter([FlowFilterTerm(field=field, values=[value])])


def test_until_excludes_later_flows() -> None:
    flow = make()
    assert matches(flow, "verdict", "DROPPED", until=flow.time + 1)
    assert not matches(flow, "verdict", "DROPPED", until=flow.time)


def test_times_are_durations_or_timestamps() -> None:
    now = 1_800_000_000.0
    assert cli_observe.parse_time("5m", "--since", now) == now - 300
    stamp = datetime(2026, 11, 25, 18, 0, tzinfo=UTC).timestamp()
    assert cli_observe.parse_time("2026-11-25T18:00:00Z", "--since", now) == stamp
    assert cli_observe.parse_time("2026-11-25T19:00:00+01:00", "--until", now) == stamp
    with pytest.raises(InvalidArgument, match=r"--until: .*not an RFC 3339"):
        raise_located(lambda: cli_observe.parse_time("2026-13-45T00:00:00Z", "--until", now))
    with pytest.raises(InvalidArgument, match="not a duration"):
        cli_observe.parse_time("yesterday", "--since", now)


def raise_located(call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc)) from None


def parse(*argv: str) -> object:
    return build_parser(run_flags=False).parse_args(["observe", *argv])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), (20, 0)),
        (("--max-flows", "3"), (3, 0)),  # without --follow: the newest 3
        (("--last", "7", "--max-flows", "3"), (7, 0)),  # 3 of them printed
        (("--first", "4"), (0, 4)),
        (("--all",), (0, 0)),
        (("-f",), (0, 0)),
        (("-f", "--last", "2"), (2, 0)),
    ],
)
def test_how_many_flows_are_asked_for(argv: tuple[str, ...], expected: tuple[int, int]) -> None:
    assert cli_observe._count(parse(*argv)) == expected  # type: ignore[arg-type]


def test_one_of_first_last_all() -> None:
    with pytest.raises(InvalidArgument, match="give one of --last, --first"):
        cli_observe._count(parse("--last", "2", "--first", "3"))  # type: ignore[arg-type]


def test_short_forms_and_hubble_flags_parse() -> None:
    args = parse(
        "-n", "default", "-l", "app=web", "-t", "drop", "--node-name", "n1", "--reply",
        "--to-service", "default/web", "--tcp-flags", "SYN", "--traffic-direction", "ingress",
    )  # fmt: skip
    fields = {t.field: t.values for t in args.filters}  # type: ignore[attr-defined]
    assert fields == {
        "namespace": ["default"],
        "label": ["app=web"],
        "type": ["drop"],
        "node": ["n1"],
        "reply": ["true"],
        "to_service": ["default/web"],
        "tcp_flags": ["SYN"],
        "traffic_direction": ["ingress"],
    }


def test_icmp_reads_like_hubble() -> None:
    src, dst = replace(XWING, port=0), replace(DEATHSTAR, port=8)  # the type, as datapath sends
    flow = make("FORWARDED", protocol="ICMP", tcp_flags=[], src=src, dst=dst)
    line = flowfmt.compact(flow)
    assert "-> default/deathstar-1 (ID:5678) to-endpoint FORWARDED (ICMPv4 EchoRequest)" in line
    assert ":8" not in line
    assert flowfmt.jsonpb(flow)["flow"]["l4"] == {"ICMPv4": {"type": 8}}


def test_audit_lines_say_what_would_have_dropped() -> None:
    flow = make("AUDIT", type="policy-verdict", drop_reason=133, drop_reason_desc="Policy denied")
    assert "Policy denied AUDIT (TCP Flags: SYN)" in flowfmt.compact(flow)


def test_node_name_and_numeric() -> None:
    flow = make(dst=SERVED)
    line = flowfmt.compact(flow, Style(node_name=True, numeric=True))
    assert " [n1]: 10.0.1.5:39322 (ID:1234) -> 10.0.2.7:80 (ID:5678) Policy denied" in line
    assert "[default/deathstar]" in flowfmt.compact(flow)
    block = flowfmt.dict_block(flow, Style(node_name=True)).splitlines()
    assert block[0] == "------------"
    assert [line.split(":")[0].strip() for line in block[1:]] == [
        "TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY",
    ]  # fmt: skip


def test_jsonpb_has_hubbles_shape() -> None:
    flow = make(dst=SERVED, policy="default/rule1")
    out = json.loads(flowfmt.line(flow, "jsonpb"))
    assert set(out) == {"flow", "node_name", "time"}
    f = out["flow"]
    assert f["verdict"] == "DROPPED" and f["Type"] == "L3_L4"
    assert f["IP"] == {"source": "10.0.1.5", "destination": "10.0.2.7", "ipVersion": "IPv4"}
    assert f["l4"]["TCP"] == {"source_port": 39322, "destination_port": 80, "flags": {"SYN": True}}
    assert f["source"]["pod_name"] == "xwing" and f["source"]["identity"] == 1234
    assert f["destination_service"] == {"name": "deathstar", "namespace": "default"}
    assert f["traffic_direction"] == "INGRESS"
    assert f["trace_observation_point"] == "TO_ENDPOINT"
    assert f["drop_reason_desc"] == "POLICY_DENIED" and f["drop_reason"] == 133
    assert f["ingress_denied_by"] == [{"name": "rule1", "namespace": "default"}]
    assert f["Summary"] == "TCP Flags: SYN"
    assert out["time"].endswith("Z")
