"""Filters, formatting and enrichment of flows, on plain data."""

from __future__ import annotations

import msgspec
import pytest

from membrane import cli_observe, flowfmt
from services.monitor.enrich import Enricher, event_namespace, policy_of
from services.monitor.ring import FlowRing
from shared import subjects
from shared.errors import InvalidArgument
from shared.flow_api import EnrichedFlow, FlowFilterTerm, FlowPeer
from shared.flow_filter import compile_filter
from shared.messages import (
    Endpoint,
    Flow,
    FQDNAddress,
    FQDNCache,
    FQDNName,
    Identity,
    IPCacheEntry,
    L7Info,
    LBBackend,
    LBFrontend,
    LBService,
    PolicyEntry,
    ResolvedPolicy,
)


def peer(ns: str, pod: str, ip: str, port: int, ident: int, *labels: str) -> FlowPeer:
    return FlowPeer(ip=ip, port=port, identity=ident, namespace=ns, pod=pod, labels=sorted(labels))


XWING = peer("default", "xwing", "10.0.1.5", 39322, 1234, "k8s:app=xwing", "k8s:org=alliance")
DEATHSTAR = peer("default", "deathstar-1", "10.0.2.7", 80, 5678, "k8s:app=deathstar")
WORLD = FlowPeer(ip="1.2.3.4", port=443, identity=2, labels=["reserved:world"])


def make(
    verdict: str = "DROPPED", src: FlowPeer = XWING, dst: FlowPeer = DEATHSTAR, **kw: object
) -> EnrichedFlow:
    fields: dict[str, object] = {
        "time": 1795600801.123,
        "node": "n1",
        "type": "drop" if verdict == "DROPPED" else "trace",
        "verdict": verdict,
        "direction": "ingress",
        "observation_point": "to-endpoint",
        "protocol": "TCP",
        "tcp_flags": ["SYN"],
        "source": src,
        "destination": dst,
    }
    if verdict == "DROPPED":
        fields |= {"drop_reason": 133, "drop_reason_desc": "Policy denied"}
    fields |= kw
    return EnrichedFlow(**fields)  # type: ignore[arg-type]


def matches(flow: EnrichedFlow, *terms: tuple[str, str] | tuple[str, str, bool]) -> bool:
    built = [
        FlowFilterTerm(field=t[0], values=[t[1]], negate=bool(t[2]) if len(t) > 2 else False)
        for t in terms
    ]
    return compile_filter(built)(flow)


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        (("verdict", "dropped"), True),
        (("verdict", "FORWARDED"), False),
        (("type", "drop"), True),
        (("type", "trace"), False),
        (("pod", "default/xwing"), True),
        (("pod", "xwing"), True),  # any namespace
        (("pod", "deathstar"), True),  # a name prefix
        (("pod", "kube-system/xwing"), False),
        (("from_pod", "deathstar"), False),
        (("to_pod", "default/deathstar-1"), True),
        (("namespace", "default"), True),
        (("from_namespace", "other"), False),
        (("label", "app=xwing"), True),
        (("label", "k8s:app=xwing"), True),
        (("label", "org"), True),
        (("label", "app=xwing,org=empire"), False),
        (("to_label", "app=xwing"), False),
        (("identity", "5678"), True),
        (("from_identity", "5678"), False),
        (("ip", "10.0.0.0/16"), True),
        (("to_ip", "10.0.2.7"), True),
        (("from_ip", "10.0.2.7"), False),
        (("port", "80"), True),
        (("from_port", "80"), False),
        (("protocol", "tcp"), True),
        (("protocol", "UDP"), False),
        (("node", "n1"), True),
        (("node", "n2"), False),
    ],
)
def test_each_filter_selects_what_it_says(term: tuple[str, str], expected: bool) -> None:
    flow = make()
    assert matches(flow, term) is expected
    assert matches(flow, (term[0], term[1], True)) is not expected  # --not inverts


def test_terms_and_values_combine() -> None:
    flow = make()
    # values of one term: any; terms: all
    either = FlowFilterTerm(field="verdict", values=["FORWARDED", "DROPPED"])
    assert compile_filter([either])(flow)
    assert compile_filter([either, FlowFilterTerm(field="to_port", values=["81"])])(flow) is False
    assert compile_filter([])(flow)
    none_of = FlowFilterTerm(field="pod", values=["a", "xwing"], negate=True)
    assert compile_filter([none_of])(flow) is False


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("verdict", "MAYBE", "unknown verdict"),
        ("type", "x", "unknown type"),
        ("port", "http", "not a number"),
        ("port", "70000", "out of range"),
        ("identity", "-1", "out of range"),
        ("ip", "10.0.0.300", "not an IP"),
        ("label", "=x", "empty key"),
        ("pod", "ns/", "no name"),
        ("color", "red", "unknown filter"),
    ],
)
def test_bad_filters_name_themselves(field: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        compile_filter([FlowFilterTerm(field=field, values=[value])])


def test_compact_line_reads_like_hubble() -> None:
    line = flowfmt.compact(make(rule="default/rule1[0]", policy="default/rule1"))
    assert line.endswith(
        ": default/xwing:39322 (ID:1234) -> default/deathstar-1:80 (ID:5678) "
        "Policy denied DROPPED (TCP Flags: SYN) by default/rule1"
    )
    assert line.startswith("Nov ")
    forwarded = flowfmt.compact(make("FORWARDED", src=XWING, dst=WORLD, is_reply=True))
    assert "default/xwing:39322 (ID:1234) <- 1.2.3.4:443 (ID:2 world)" in forwarded
    assert forwarded.endswith("to-endpoint FORWARDED (TCP Flags: SYN)")


def test_json_is_one_flow_per_line_and_decodes_back() -> None:
    flow = make()
    line = flowfmt.json_line(flow)
    assert "\n" not in line
    assert msgspec.json.decode(line, type=EnrichedFlow) == flow


def test_table_has_a_row_per_flow() -> None:
    text = flowfmt.table([make(), make("FORWARDED")])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["TIMESTAMP", "SOURCE", "DESTINATION"]
    assert len(lines) == 3 and "DROPPED" in lines[1] and "FORWARDED" in lines[2]
    assert lines[1].split("DROPPED")[1].strip() == "Policy denied (TCP Flags: SYN)"
    row = flowfmt.fixed_row(flowfmt.row(make()))
    assert row.split()[3:5] == ["default/xwing:39322", "(ID:1234)"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert cli_observe.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "m5", "5m3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidArgument, match="not a duration"):
        cli_observe.parse_duration(text)


def test_not_negates_the_next_filter_and_its_repeats_and_repeats_or() -> None:
    from membrane.cli import build_parser

    args = build_parser().parse_args(
        [
            "observe",
            "--verdict",
            "DROPPED",
            "--not",
            "--pod",
            "a",
            "--pod",
            "b",
            "--not",
            "--pod",
            "c",
        ]
    )
    # docs/monitor.md: `--not --pod a --pod b` matches neither (this test asserted Hubble's
    # one-shot --not before, under which it matched b; issue 21 chose the documented reading)
    terms = {(t.field, t.negate): t.values for t in args.filters}
    assert terms == {("verdict", False): ["DROPPED"], ("pod", True): ["a", "b", "c"]}
    args = build_parser().parse_args(
        ["observe", "--not", "--pod", "a", "--verdict", "X", "--pod", "b"]
    )
    terms = {(t.field, t.negate): t.values for t in args.filters}
    assert terms == {("pod", True): ["a"], ("verdict", False): ["X"], ("pod", False): ["b"]}


def raw_flow(**kw: object) -> Flow:
    fields: dict[str, object] = {
        "time": 1.0,
        "node": "n1",
        "type": "policy-verdict",
        "verdict": "FORWARDED",
        "direction": "egress",
        "src_ip": "10.0.1.5",
        "dst_ip": "10.0.9.9",
        "src_port": 5000,
        "dst_port": 80,
        "src_identity": 1234,
        "dst_identity": 6,
    }
    return Flow(**(fields | kw))  # type: ignore[arg-type]


def test_enrichment_follows_bucket_changes() -> None:
    e = Enricher()
    enc = msgspec.json.encode
    e.on_identity("1234", enc(Identity(id=1234, labels=["k8s:b=2", "k8s:a=1"], kind="cluster")))
    e.on_endpoint(
        "default.xwing",
        enc(
            Endpoint(
                namespace="default",
                name="xwing",
                node="n1",
                ip="10.0.1.5",
                identity=1234,
                labels={},
            )
        ),
    )
    e.on_ipcache("10.0.9.9", enc(IPCacheEntry(cidr="10.0.9.9/32", identity=6, node="n2")))
    e.on_resolved("1234", enc(ResolvedPolicy(identity=1234, revision=1, rules={7: "default/p[2]"})))
    web = LBService(
        namespace="default",
        name="web",
        frontends=[
            LBFrontend(id=1, ip="10.0.9.9", port=80, protocol="TCP"),
            LBFrontend(id=2, ip="0.0.0.0", port=30080, protocol="TCP", node_port=True),
        ],
    )
    e.on_service("default.web", enc(web))
    flow = e.enrich(raw_flow(rule_id=7))
    assert (flow.source.namespace, flow.source.pod, flow.source.node) == ("default", "xwing", "n1")
    assert flow.source.labels == ["k8s:a=1", "k8s:b=2"]
    assert (flow.destination.pod, flow.destination.node) == ("", "n2")
    assert flow.destination.labels == ["reserved:remote-node"]
    assert flow.destination.service == "default/web"
    assert (flow.rule, flow.policy) == ("default/p[2]", "default/p")
    assert event_namespace(flow) == "default"  # egress: the source's namespace

    # deletions and moves are followed; garbage is counted, never fatal
    e.on_endpoint("default.xwing", None)
    e.on_resolved("1234", None)
    e.on_service("default.web", None)
    e.on_identity("1234", b"{broken")
    e.on_identity("abc", b"{}")
    e.on_service("x", b"[1]")
    flow = e.enrich(raw_flow(rule_id=7))
    assert (flow.source.pod, flow.rule, flow.destination.service) == ("", "", "")
    assert e.bad_entries == 3
    assert e.counts()["endpoints"] == 0


def test_a_rule_name_lives_while_any_subject_carries_it() -> None:
    e = Enricher()
    enc = msgspec.json.encode
    for subject in ("1", "2"):
        e.on_resolved(
            subject, enc(ResolvedPolicy(identity=int(subject), revision=1, rules={9: "ns/p[0]"}))
        )
    e.on_resolved("1", None)
    assert e.rules == {9: "ns/p[0]"}
    e.on_resolved("2", enc(ResolvedPolicy(identity=2, revision=2, rules={})))
    assert e.rules == {}


def test_names_and_subjects() -> None:
    assert policy_of("default/rule1[3]") == "default/rule1" and policy_of("cw[0]") == "cw"
    assert subjects.event_flows("DROPPED", "") == "membrane.events.flows.DROPPED._"
    assert subjects.event_flows("AUDIT", "a.b") == "membrane.events.flows.AUDIT.a_b"


def test_the_ring_keeps_the_newest_and_walks_back() -> None:
    ring = FlowRing(5)

    def lines(times: range) -> list[bytes]:
        return [msgspec.json.encode(make(time=float(t))) + b"\n" for t in times]

    everything = compile_filter([])
    ring.extend(lines(range(3)))
    assert len(ring) == 3 and ring.oldest == 0.0
    assert [f.time for f in ring.query(everything)] == [0.0, 1.0, 2.0]
    ring.extend(lines(range(3, 10)))  # batches of several flows, cut inside the oldest
    assert len(ring) == 5 and ring.oldest == 5.0
    assert [f.time for f in ring.query(everything, last=2)] == [8.0, 9.0]
    assert [f.time for f in ring.query(everything, since=7.0)] == [7.0, 8.0, 9.0]
    newest = 9
    for size in (1, 2, 1, 7):  # one flow, two, one, a batch larger than the ring
        ring.extend(lines(range(newest + 1, newest + 1 + size)))
        newest += size
        assert len(ring) == 5 and ring.oldest == newest - 4.0
        expected = [float(t) for t in range(newest - 4, newest + 1)]
        assert [f.time for f in ring.query(everything)] == expected
    ring.extend([])
    assert len(ring) == 5 and len(FlowRing(3)) == 0 and FlowRing(3).oldest == 0.0


def test_a_default_deny_drop_names_the_policies_that_enforce_the_direction() -> None:
    e = Enricher()
    policy = ResolvedPolicy(
        identity=1234,
        revision=1,
        ingress_enforced=True,
        ingress=[PolicyEntry(peer=9, protocol=6, port=80, rule_id=7)],
        rules={7: "default/p[0]", 8: "default/q[0]"},
    )
    e.on_resolved("1234", msgspec.json.encode(policy))
    drop = raw_flow(
        verdict="DROPPED", type="drop", reason=133, direction="ingress", dst_identity=1234
    )
    assert e.enrich(drop).policy == "default/p"
    assert (
        e.enrich(msgspec.structs.replace(drop, direction="egress", src_identity=1234)).policy == ""
    )
    assert e.enrich(msgspec.structs.replace(drop, reason=134)).policy == ""
    e.on_resolved("1234", None)
    assert e.enrich(drop).policy == ""


def test_a_flow_translated_to_a_backend_names_its_service() -> None:
    """The datapath reports a ClusterIP flow after choosing the backend: the backend's
    address and port name the service (the destination of requests, the source of replies)."""
    e = Enricher()
    backend = LBBackend(id=1, ip="10.0.2.7", port=8080)
    for name in ("web", "www"):
        e.on_service(
            f"default.{name}",
            msgspec.json.encode(
                LBService(
                    namespace="default",
                    name=name,
                    frontends=[
                        LBFrontend(
                            id=1, ip="10.96.0.9", port=80, protocol="TCP", backends=[backend]
                        )
                    ],
                )
            ),
        )
    request = e.enrich(raw_flow(dst_ip="10.0.2.7", dst_port=8080))
    assert request.destination.service == "default/web,default/www"
    assert request.source.service == ""
    reply = e.enrich(raw_flow(src_ip="10.0.2.7", src_port=8080, dst_ip="10.0.1.5", is_reply=True))
    assert (reply.source.service, reply.destination.service) == ("default/web,default/www", "")
    e.on_service("default.www", None)
    assert e.enrich(raw_flow(dst_ip="10.0.2.7", dst_port=8080)).destination.service == "default/web"
    e.on_service("default.web", None)
    assert e.enrich(raw_flow(dst_ip="10.0.2.7", dst_port=8080)).destination.service == ""
    assert not e.backends


def test_dns_flows_and_destination_names() -> None:
    e = Enricher()
    cache = FQDNCache(
        node="n1",
        ip="10.0.1.5",
        names=[FQDNName(name="api.example.com", addresses=[FQDNAddress(ip="1.2.3.4", expires=9)])],
    )
    e.on_fqdn("n1.10.0.1.5", msgspec.json.encode(cache))
    to_api = e.enrich(raw_flow(dst_ip="1.2.3.4", dst_identity=2))
    assert to_api.destination_names == ["api.example.com"]
    assert "to api.example.com" in flowfmt.summary(to_api)
    assert not e.enrich(raw_flow(dst_ip="1.2.3.5")).destination_names
    assert not e.enrich(raw_flow(dst_ip="1.2.3.4", is_reply=True)).destination_names
    assert matches(to_api, ("fqdn", "api.example.com")) and matches(
        to_api, ("fqdn", "*.example.com")
    )
    assert not matches(to_api, ("fqdn", "example.com")) and not matches(to_api, ("type", "dns"))
    dns = make(
        "FORWARDED",
        type="l7",
        l7=L7Info(protocol="dns", query="api.example.com", qtype="A", rcode="NOERROR",
                  answers=["1.2.3.4"], ttl=60),
    )  # fmt: skip
    assert matches(dns, ("type", "dns")) and matches(dns, ("type", "l7"))
    assert matches(dns, ("fqdn", "API.example.com."))
    assert "dns A api.example.com => NOERROR 1.2.3.4 TTL 60" in flowfmt.summary(dns)
    e.on_fqdn("n1.10.0.1.5", None)
    assert not e.enrich(raw_flow(dst_ip="1.2.3.4")).destination_names
    with pytest.raises(InvalidArgument):
        compile_filter([FlowFilterTerm(field="fqdn", values=["a b"])])


def test_grpc_and_kafka_flows_filter_and_read() -> None:
    grpc = make(
        "DROPPED",
        type="l7",
        l7=L7Info(protocol="grpc", method="POST", url="/empire.DeathStar/ExhaustPort",
                  host="deathstar:50051", status=200, grpc_status=7, latency_ms=0.2),
    )  # fmt: skip
    kafka = make(
        "DROPPED",
        type="l7",
        l7=L7Info(protocol="kafka", api_key="produce", api_version=9, topics=["secret-plans"],
                  error_code=29, latency_ms=0.3),
    )  # fmt: skip
    assert matches(grpc, ("l7_protocol", "GRPC")) and not matches(kafka, ("l7_protocol", "grpc"))
    assert matches(grpc, ("grpc_status", "7")) and not matches(grpc, ("grpc_status", "0"))
    assert not matches(kafka, ("grpc_status", "7"))
    assert matches(kafka, ("kafka_topic", "secret-plans"))
    assert not matches(kafka, ("kafka_topic", "secret")) and not matches(grpc, ("kafka_topic", "x"))
    assert matches(grpc, ("http_path", "ExhaustPort$"))
    assert "grpc POST deathstar:50051/empire.DeathStar/ExhaustPort => grpc-status 7" in (
        flowfmt.summary(grpc)
    )
    assert "kafka produce v9 [secret-plans] => error 29" in flowfmt.summary(kafka)
    with pytest.raises(InvalidArgument):
        compile_filter([FlowFilterTerm(field="grpc_status", values=["seven"])])


def test_a_request_answered_for_a_failed_upstream_reads_with_its_cause() -> None:
    refused = make(
        "FORWARDED",
        type="l7",
        l7=L7Info(protocol="http", method="POST", url="/v1/request-landing", host="deathstar",
                  status=503, latency_ms=0.4, error="upstream connect error: Connection refused"),
    )  # fmt: skip
    assert matches(refused, ("http_status", "503"))
    assert (
        "http POST deathstar/v1/request-landing => 503 (0.4 ms, upstream connect error: "
        "Connection refused) FORWARDED"
    ) in flowfmt.summary(refused)
    malformed = make("DROPPED", type="l7", l7=L7Info(protocol="http2", error="malformed HTTP/2: x"))
    assert flowfmt.summary(malformed).startswith("http2 malformed HTTP/2: x DROPPED")


def test_a_flow_batch_is_json_lines_cut_at_line_ends() -> None:
    from shared.flow_api import decode_flow_batch, encode_flow_batch, split_batch

    flows = [
        EnrichedFlow(time=float(i), node="n", type="drop", verdict="DROPPED") for i in range(50)
    ]
    flows[7] = EnrichedFlow(time=7.0, node="a\nb", type="drop", verdict="DROPPED")  # escaped
    data = encode_flow_batch(flows)
    assert data.count(b"\n") == 50 and data.endswith(b"\n")
    assert decode_flow_batch(data) == flows
    # each line is exactly the per-flow subject's message
    assert data.splitlines()[3] == msgspec.json.encode(flows[3])
    parts = split_batch(data, limit=500)
    assert all(len(p) <= 500 and p.endswith(b"\n") for p, _ in parts)
    assert b"".join(p for p, _ in parts) == data
    assert sum(n for _, n in parts) == 50
    assert [f for p, _ in parts for f in decode_flow_batch(p)] == flows
    # a flow longer than the limit goes alone; a single flow's JSON is a batch of one
    assert [n for _, n in split_batch(data, limit=10)] == [1] * 50
    assert decode_flow_batch(msgspec.json.encode(flows[0])) == [flows[0]]
    assert decode_flow_batch(b"") == []
    assert split_batch(data) == [(data, 50)]
    assert subjects.event_flow_batches("AUDIT", "a.b") == "membrane.events.flowbatches.AUDIT.a_b"


def test_a_batch_is_counted_per_label_set_as_flow_by_flow() -> None:
    import collections
    import itertools

    from prometheus_client import REGISTRY

    from services.monitor.service import count_flows

    flows = [
        EnrichedFlow(
            time=1.0,
            node="n",
            type=kind,
            verdict=verdict,
            drop_reason=133 if verdict == "DROPPED" else 0,
            drop_reason_desc="Policy denied" if verdict == "DROPPED" else "",
            direction=direction,
            tcp_flags=["SYN"] if rule % 2 else ["SYN", "ACK"],
            rule_id=rule,
            destination=FlowPeer(namespace=f"ns{rule}"),
        )
        for kind, verdict, direction, rule in itertools.product(
            ["drop", "policy-verdict", "trace"],
            ["FORWARDED", "DROPPED", "AUDIT"],
            ["ingress", "egress"],
            [0, 0, 7, 9],
        )
    ]
    expected: collections.Counter[tuple[str, ...]] = collections.Counter()
    for f in flows:  # the metrics' meaning, one flow at a time
        expected["flows", f.type, f.verdict] += 1
        if f.verdict == "DROPPED":
            expected["drops", f.drop_reason_desc, f.direction] += 1
        if f.type == "policy-verdict":
            action = {"FORWARDED": "allowed", "DROPPED": "denied", "AUDIT": "audit"}[f.verdict]
            match = "rule" if f.rule_id else "default"
            expected["verdicts", f.direction, match, action] += 1
        for flag in f.tcp_flags:
            expected["flags", flag] += 1

    def sample(key: tuple[str, ...]) -> float:
        name, *values = key
        metric, labels = {
            "flows": ("membrane_monitor_flows_processed_total", ["type", "verdict"]),
            "drops": ("membrane_monitor_drops_total", ["reason", "direction"]),
            "verdicts": (
                "membrane_monitor_policy_verdicts_total",
                ["direction", "match", "action"],
            ),
            "flags": ("membrane_monitor_tcp_flags_total", ["flag"]),
        }[name]
        return REGISTRY.get_sample_value(metric, dict(zip(labels, values, strict=True))) or 0.0

    before = {key: sample(key) for key in expected}
    count_flows(flows)
    assert {key: sample(key) - before[key] for key in expected} == expected
