"""The L7 proxy's compact records (shared/l7_wire.py) enrich into what their Flows would.

The monitor splices an L7 record's JSON line from cached fragments
(:meth:`Enricher.encode_l7`), with no Flow, EnrichedFlow or FlowPeer in between; this compares
its lines and groups with msgspec's encoding of :meth:`Enricher.enrich` of the Flow each record
stands for (what the monitor published when the proxy sent JSON FlowBatches), over verdicts,
directions, transports, known and unknown peers, rules and services, names JSON must escape,
and after each kind of bucket change. The metrics move as the flows' would.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest

from services.monitor.enrich import Enricher, group_flows
from services.monitor.service import count_flows, count_l7
from shared import l7_wire
from shared.flow_api import EnrichedFlow
from shared.l7_wire import L7Batch, L7Record
from shared.messages import (
    Endpoint,
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
from tests.unit.monitor_metrics import moved

NODE = "n1"
ODD = 'q"b\\s\n\t\x01é☃%d%b'
ADDRESSES = ["10.0.1.5", "10.0.2.7", "10.96.0.10", "10.0.3.3", "10.0.9.9", "1.2.3.4"]
enc = msgspec.json.encode

REQUESTS = [
    L7Info(protocol="http", method="GET", url="/v1/x?y=1", host="svc", status=200, latency_ms=0.12),
    L7Info(protocol="http", method="PUT", url=f"/{ODD}", status=403, latency_ms=1.5),
    L7Info(protocol="http2", method="POST", url="/pkg.S/M", status=200, grpc_status=7),
    L7Info(protocol="kafka", api_key="produce", api_version=7, topics=["a", ODD], error_code=29),
    L7Info(protocol="dns", query="api.example.com.", qtype="A", rcode="NOERROR",
           answers=["1.2.3.4"], ttl=30),
    L7Info(protocol="http", error="malformed request", status=400),
]  # fmt: skip


def records() -> list[L7Record]:
    out = []
    combos = itertools.product(
        ["FORWARDED", "DROPPED"],
        ["ingress", "egress", ""],
        ["TCP", "UDP"],
        [0, 7, 99],  # rule id: none, named, unknown
        itertools.pairwise(ADDRESSES + ADDRESSES[:1]),
    )
    for n, (verdict, direction, transport, rule, (src, dst)) in enumerate(combos):
        port = (80, 53, 40000)[n % 3]
        out.append(
            L7Record(
                1_700_000_000 + n / 7, verdict, direction, transport, src, 40000 + n % 5,
                1234 + n % 3, dst, port, 5678 - n % 2, rule, REQUESTS[n % len(REQUESTS)],
            )
        )  # fmt: skip
    return out


def same(e: Enricher, recs: list[L7Record], node: str = NODE) -> list[EnrichedFlow]:
    """Asserts the fast path's lines and groups are the reference encoder's; the flows."""
    slow = [e.enrich(l7_wire.flow(r, node)) for r in recs]
    groups: dict[tuple[str, str], list[bytes]] = {}
    lines = e.encode_l7(recs, node, groups)
    assert lines == [enc(f) + b"\n" for f in slow]
    assert groups == {
        key: [enc(f) + b"\n" for f in group] for key, group in group_flows(slow).items()
    }
    return slow


def fill(e: Enricher, odd: str = "") -> None:
    """Every table the enrichment reads, names ``odd`` where given."""
    ns, node = odd or "ns", odd or NODE
    e.on_identity("1234", enc(Identity(id=1234, labels=[f"k8s:app=x{odd}"], kind="cluster")))
    e.on_identity("5678", enc(Identity(id=5678, labels=["k8s:app=y"], kind="cluster")))
    for name, ip, identity in (("x", "10.0.1.5", 1234), ("y", "10.0.2.7", 5678)):
        ep = Endpoint(namespace=ns, name=name + odd, node=node, ip=ip, identity=identity, labels={})
        e.on_endpoint(f"{NODE}.ns.{name}", enc(ep))
    e.on_ipcache("k", enc(IPCacheEntry(cidr="10.0.9.9/32", identity=6, node=node)))
    rules = {7: f"{ns}/allow-x[0]"}
    policy = ResolvedPolicy(
        identity=5678, revision=1, ingress_enforced=True, egress_enforced=True,
        ingress=[PolicyEntry(peer=1234, protocol=6, port=80, rule_id=7)], rules=rules,
    )  # fmt: skip
    e.on_resolved("5678", enc(policy))
    frontend = LBFrontend(
        id=1, ip="10.96.0.10", port=53, protocol="UDP",
        backends=[LBBackend(id=1, ip="10.0.3.3", port=53)],
    )  # fmt: skip
    e.on_service("ns.dns", enc(LBService(namespace=ns, name="dns", frontends=[frontend])))
    names = [
        FQDNName(name=f"api.example.com{odd}", addresses=[FQDNAddress(ip="1.2.3.4", expires=9)])
    ]
    e.on_fqdn(f"{NODE}.10.0.9.9", enc(FQDNCache(node=NODE, ip="10.0.9.9", names=names)))


def test_l7_records_enrich_as_their_flows_do_and_follow_bucket_changes() -> None:
    e = Enricher()
    recs = records()
    same(e, recs)  # empty tables
    fill(e)
    flows = same(e, recs)
    assert any(f.source.pod == "x" for f in flows) and any(f.rule == "ns/allow-x[0]" for f in flows)
    assert any(f.destination.service == "ns/dns" for f in flows)
    assert any(f.destination_names == ["api.example.com"] for f in flows)
    assert any(f.l7 is not None and f.l7.topics == ["a", ODD] for f in flows)
    # every kind of change reaches the cached peers, labels and rules
    e.on_endpoint(f"{NODE}.ns.x", None)
    e.on_identity("5678", enc(Identity(id=5678, labels=["k8s:app=z"], kind="cluster")))
    e.on_resolved("5678", enc(ResolvedPolicy(identity=5678, revision=2, rules={7: "ns/p[1]"})))
    e.on_service("ns.dns", None)
    e.on_ipcache("k", None)
    flows = same(e, recs)
    assert not any(f.source.pod == "x" for f in flows)
    assert any(f.rule == "ns/p[1]" for f in flows)
    assert e.encode_l7([], NODE, {}) == []


def test_names_json_must_escape_encode_as_msgspec_encodes_them() -> None:
    e = Enricher()
    fill(e, ODD)
    flows = same(e, records(), node=ODD)
    assert any(f.source.namespace == ODD for f in flows)
    assert any(f.destination_names == [f"api.example.com{ODD}"] for f in flows)


def test_the_wire_round_trips_and_counts_without_decoding() -> None:
    recs = records()
    data = l7_wire.encode(L7Batch(NODE, recs, dropped_publish=3))
    assert l7_wire.is_l7(data) and not l7_wire.is_l7(enc({"node": NODE}))
    assert l7_wire.decode(data) == L7Batch(NODE, recs, 3)
    assert l7_wire.counts(data) == (len(recs), 3)
    for bad in (l7_wire.MAGIC, l7_wire.MAGIC + b'["n",[[1]],0]', l7_wire.MAGIC + b"{}"):
        with pytest.raises(l7_wire.MalformedBatch):
            l7_wire.decode(bad)
    with pytest.raises(l7_wire.MalformedBatch):
        l7_wire.counts(l7_wire.MAGIC + b"[")


def test_l7_records_are_counted_in_the_metrics_as_their_flows() -> None:
    recs = records() * 2
    flows = [Enricher().enrich(l7_wire.flow(r, NODE)) for r in recs]
    by_flows = moved(lambda: count_flows(flows))
    assert by_flows and moved(lambda: count_l7(recs)) == by_flows
