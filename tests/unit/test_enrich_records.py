"""Enrichment straight from ring buffer records into JSON gives what decoding, enriching
and encoding gives, byte for byte.

The monitor's fast path (:meth:`Enricher.encode_records`) skips the decoded flow and the
EnrichedFlow and splices cached JSON fragments; this compares its lines with msgspec's encoding
of :meth:`Enricher.enrich` of the :class:`~shared.flow_decode.Decoder`'s flows (what the monitor
published before) over every kind of record, with names that JSON must escape, and again after
each kind of bucket change (the caches must follow them).
"""

from __future__ import annotations

import itertools
import socket
import struct

import msgspec

from services.monitor.enrich import Enricher, group_flows
from services.monitor.service import count_flows, count_records
from shared import flow_wire
from shared.flow_api import EnrichedFlow
from shared.flow_decode import Decoder
from shared.messages import (
    Endpoint,
    FQDNAddress,
    FQDNCache,
    FQDNName,
    Identity,
    IPCacheEntry,
    LBBackend,
    LBFrontend,
    LBService,
    PolicyEntry,
    ResolvedPolicy,
)
from tests.unit.monitor_metrics import moved

NODE = "n1"
OFFSET_NS = 1_700_000_000 * 10**9
ADDRESSES = ["10.0.1.5", "10.0.2.7", "10.96.0.10", "10.0.3.3", "10.0.9.9", "1.2.3.4"]
enc = msgspec.json.encode


def raw(ip: str) -> int:
    """The host-order u32 the kernel's network-order address reads as."""
    return int(struct.unpack("=I", socket.inet_aton(ip))[0])


def records() -> list[tuple[int, ...]]:
    """Every combination that takes a different branch of enrichment."""
    out = []
    combos = itertools.product(
        [(1, 133), (1, 181), (2, 0), (3, 0), (3, 133), (1, 200)],  # type, reason
        [1, 2],  # direction
        [0, 1, 2, 3, 4, 6],  # flags: reply, allowed, audit
        [0, 7, 99],  # rule id: none, named, unknown
        itertools.pairwise(ADDRESSES + ADDRESSES[:1]),
    )
    for n, ((kind, reason), direction, flags, rule, (src, dst)) in enumerate(combos):
        port = (80, 53, 40000)[n % 3]
        out.append(
            flow_wire.RECORDS[flow_wire.NATIVE].unpack(
                flow_wire.RECORDS[flow_wire.NATIVE].pack(
                    48, 0, 10**9 + n, kind, reason, direction, n % 8, (6, 17, 1, 132)[n % 4],
                    n % 256, flags, 0, 3, 1234 + n % 3, 5678 - n % 2, raw(src), raw(dst),
                    40000 + n % 5, port, rule, 60 + n,
                )
            )
        )  # fmt: skip
    return out


def same(e: Enricher, recs: list[tuple[int, ...]], node: str = NODE) -> list[EnrichedFlow]:
    """Asserts the fast path's lines and groups are the reference encoder's; the flows."""
    slow = [e.enrich(f) for f in Decoder(node).wire(recs, OFFSET_NS)]
    groups: dict[tuple[str, str], list[bytes]] = {}
    lines = e.encode_records(recs, node, OFFSET_NS, groups)
    assert lines == [msgspec.json.encode(f) + b"\n" for f in slow]
    # grouped for publication as group_flows (event_namespace) groups them, in order
    assert groups == {
        key: [msgspec.json.encode(f) + b"\n" for f in group]
        for key, group in group_flows(slow).items()
    }
    return slow


def test_records_enrich_as_decoded_flows_do_and_follow_bucket_changes() -> None:
    e = Enricher()
    recs = records()
    same(e, recs)  # empty tables
    e.on_identity("1234", enc(Identity(id=1234, labels=["k8s:app=x"], kind="cluster")))
    e.on_identity("5678", enc(Identity(id=5678, labels=["k8s:app=y"], kind="cluster")))
    for name, ip, identity in (("x", "10.0.1.5", 1234), ("y", "10.0.2.7", 5678)):
        ep = Endpoint(namespace="ns", name=name, node=NODE, ip=ip, identity=identity, labels={})
        e.on_endpoint(f"{NODE}.ns.{name}", enc(ep))
    e.on_ipcache("k", enc(IPCacheEntry(cidr="10.0.9.9/32", identity=6, node="n2")))
    policy = ResolvedPolicy(
        identity=5678,
        revision=1,
        ingress_enforced=True,
        egress_enforced=True,
        ingress=[PolicyEntry(peer=1234, protocol=6, port=80, rule_id=7)],
        rules={7: "ns/allow-x[0]"},
    )
    e.on_resolved("5678", enc(policy))
    e.on_resolved("1235", enc(ResolvedPolicy(identity=1235, revision=1, egress_enforced=True)))
    service = LBService(
        namespace="ns",
        name="dns",
        frontends=[
            LBFrontend(
                id=1,
                ip="10.96.0.10",
                port=53,
                protocol="UDP",
                backends=[LBBackend(id=1, ip="10.0.3.3", port=53)],
            )
        ],
    )
    e.on_service("ns.dns", enc(service))
    names = [FQDNName(name="api.example.com", addresses=[FQDNAddress(ip="1.2.3.4", expires=9)])]
    e.on_fqdn(f"{NODE}.10.0.9.9", enc(FQDNCache(node=NODE, ip="10.0.9.9", names=names)))
    fast = same(e, recs)
    assert any(f.source.pod == "x" for f in fast) and any(f.rule == "ns/allow-x[0]" for f in fast)
    assert any(f.destination.service == "ns/dns" for f in fast)
    assert any(f.destination_names == ["api.example.com"] for f in fast)
    assert any(f.policy and not f.rule_id for f in fast)  # a default deny names its policies
    # every kind of change reaches the cached peers and rules
    e.on_endpoint(f"{NODE}.ns.x", None)
    e.on_identity("5678", enc(Identity(id=5678, labels=["k8s:app=z"], kind="cluster")))
    e.on_resolved("5678", enc(ResolvedPolicy(identity=5678, revision=2, rules={7: "ns/p[1]"})))
    e.on_service("ns.dns", None)
    e.on_ipcache("k", None)
    assert not any(f.source.pod == "x" for f in same(e, recs))
    assert e.encode_records([], NODE, OFFSET_NS, {}) == []


def test_names_json_must_escape_encode_as_msgspec_encodes_them() -> None:
    """Quotes, backslashes, control characters, non-ASCII and ``%`` (the line is a bytes
    format) in every name a line carries."""
    odd = 'q"b\\s\n\t\x01é☃%d%b'
    e = Enricher()
    e.on_identity("1234", enc(Identity(id=1234, labels=[f"k8s:a={odd}", "z"], kind="cluster")))
    ep = Endpoint(namespace=odd, name=odd, node=odd, ip="10.0.1.5", identity=1234, labels={})
    e.on_endpoint(f"{NODE}.x.y", enc(ep))
    e.on_ipcache("k", enc(IPCacheEntry(cidr="10.0.9.9/32", identity=6, node=odd)))
    e.on_resolved(
        "5678",
        enc(
            ResolvedPolicy(
                identity=5678, revision=1, ingress_enforced=True, egress_enforced=True,
                rules={7: f"{odd}/p[0]", 99: odd},
            )
        ),
    )  # fmt: skip
    frontend = LBFrontend(
        id=1, ip="10.96.0.10", port=53, protocol="UDP",
        backends=[LBBackend(id=1, ip="10.0.3.3", port=53)],
    )  # fmt: skip
    e.on_service("x.y", enc(LBService(namespace=odd, name=odd, frontends=[frontend])))
    names = [FQDNName(name=odd, addresses=[FQDNAddress(ip="1.2.3.4", expires=9)])]
    e.on_fqdn(f"{NODE}.10.0.9.9", enc(FQDNCache(node=NODE, ip="10.0.9.9", names=names)))
    # reserved identities (fixed labels), a peer unknown to every table, a zero timestamp
    recs = records()
    recs += [(*r[:2], 0, *r[3:12], 2, 1, *r[14:]) for r in recs[:40]]
    flows = same(e, recs, node=odd)
    assert any(f.source.labels == ["reserved:world"] for f in flows)
    assert any(f.source.namespace == odd for f in flows) and any(f.rule == odd for f in flows)
    assert any(f.destination_names == [odd] for f in flows)


def test_records_are_counted_in_the_metrics_as_their_enriched_flows() -> None:
    """count_records (the binary batches' numbers) against count_flows (the flows they become):
    every metric sample moves by the same amount."""
    recs = records() * 3

    flows = [Enricher().enrich(f) for f in Decoder(NODE).wire(recs, OFFSET_NS)]
    by_flows = moved(lambda: count_flows(flows))
    assert by_flows and moved(lambda: count_records(recs)) == by_flows
