"""services.policy.diff and shared.flow_groups on plain data: which recorded flows change verdict.

The verdicts come from the resolver and explain (the datapath's compiler and lookup); these tests
check the replay around them: grouping, what is replayed, which side and policy are named, and
that a document naming a CIDR gives outside addresses their new identity.
"""

from __future__ import annotations

import itertools

import msgspec

from services.policy.diff import diff
from services.policy.parser import parse_documents
from services.policy.resolver import Resolver
from shared import flow_groups
from shared.flow_api import EnrichedFlow, FlowGroup, FlowPeer
from shared.labels import pod_identity_labels

DEATHSTAR, TIEFIGHTER, XWING = 300, 301, 302
PODS = {
    DEATHSTAR: ("deathstar-1", {"app": "deathstar", "org": "empire"}),
    TIEFIGHTER: ("tiefighter", {"app": "tiefighter", "org": "empire"}),
    XWING: ("xwing", {"app": "xwing", "org": "alliance"}),
}
GUARD = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: guard, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {%s}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


SOURCE_PORTS = itertools.count(40000)  # each flow its own connection


def resolver(*documents: str) -> Resolver:
    r = Resolver()
    for number, (_, labels) in PODS.items():
        r.set_identity(number, pod_identity_labels("default", labels, {}, "default"))
    for text in documents:
        for policy in parse_documents(text, "test.yaml"):
            r.set_policy(policy)
    return r


def flow(
    src: int, dst: int, verdict: str = "FORWARDED", port: int = 80, **kw: object
) -> EnrichedFlow:
    def peer(number: int, port: int) -> FlowPeer:
        if number not in PODS:
            return FlowPeer(ip=str(kw.get("world_ip", "192.0.2.9")), identity=number, port=port)
        name, labels = PODS[number]
        tagged = sorted(f"k8s:{k}={v}" for k, v in labels.items())
        return FlowPeer(namespace="default", pod=name, identity=number, labels=tagged, port=port)

    return EnrichedFlow(
        time=float(kw.get("time", 100.0)),
        node="n1",
        type="trace" if verdict != "DROPPED" else "drop",
        verdict=verdict,
        drop_reason=133 if verdict == "DROPPED" else 0,
        protocol="TCP",
        is_reply=bool(kw.get("is_reply", False)),
        source=peer(src, next(SOURCE_PORTS)),
        destination=peer(dst, port),
    )


def groups(*flows: EnrichedFlow) -> list[FlowGroup]:
    return flow_groups.merge(flow_groups.group(flows))


def test_groups_count_connections_by_workload_and_leave_replies_out() -> None:
    found = groups(
        flow(TIEFIGHTER, DEATHSTAR, time=5),
        flow(TIEFIGHTER, DEATHSTAR, time=9),
        flow(TIEFIGHTER, DEATHSTAR, time=7),
        flow(DEATHSTAR, TIEFIGHTER, is_reply=True),
    )
    (only,) = found
    assert (only.source, only.destination, only.port, only.count) == (
        "default/tiefighter",
        "default/deathstar",
        80,
        3,
    )
    assert (only.first, only.last) == (5, 9)


def test_a_narrower_replacement_is_newly_denied_and_names_the_policy() -> None:
    live = resolver(GUARD % "org: empire")
    (candidate,) = parse_documents(GUARD % "app: nobody", "new.yaml")
    changes, affected = diff(
        live,
        [candidate],
        groups(flow(TIEFIGHTER, DEATHSTAR), flow(XWING, DEATHSTAR, "DROPPED")),
        {},
    )
    assert affected == {DEATHSTAR}
    (change,) = changes
    assert change.group.source == "default/tiefighter" and change.newly_denied
    assert (change.before, change.after, change.direction) == ("allowed", "dropped", "ingress")
    assert change.policy == "default/guard" and "no rule allows" in change.reason


def test_a_wider_replacement_lists_the_newly_allowed_flow() -> None:
    live = resolver(GUARD % "org: empire")
    (candidate,) = parse_documents(GUARD % "", "new.yaml")
    changes, _ = diff(live, [candidate], groups(flow(XWING, DEATHSTAR, "DROPPED")), {})
    (change,) = changes
    assert (change.before, change.after, change.newly_denied) == ("dropped", "allowed", False)
    assert change.policy == "default/guard" and change.rule == "default/guard[0]"


def test_an_unrelated_policy_changes_nothing_and_replays_nothing() -> None:
    live = resolver(GUARD % "org: empire")
    other = GUARD.replace("app: deathstar", "app: nothing-here").replace("guard", "other")
    (candidate,) = parse_documents(other % "", "new.yaml")
    changes, affected = diff(live, [candidate], groups(flow(TIEFIGHTER, DEATHSTAR)), {})
    assert changes == [] and affected == set()


def test_a_new_cidr_gives_an_outside_address_its_identity() -> None:
    live = resolver()
    egress = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: xwing}}
  egress:
  - toCIDR: [192.0.2.0/24]
"""
    (candidate,) = parse_documents(egress, "new.yaml")
    recorded = groups(flow(XWING, 2, world_ip="192.0.2.9"), flow(XWING, 2, world_ip="198.51.100.1"))
    changes, _ = diff(live, [candidate], recorded, {})
    (change,) = changes  # 192.0.2.9 still allowed (by the CIDR rule), 198.51.100.1 cut
    assert change.group.dst_ip == "198.51.100.1" and change.direction == "egress"
    assert change.policy == "default/out"


def test_a_trial_leaves_the_resolver_as_it_was() -> None:
    live = resolver(GUARD % "org: empire")
    live.take_peer_set_changes()
    live.take_cidr_changes()
    before = {i: live.resolved(i) for i in PODS}
    cidr = GUARD.replace("fromEndpoints: [{matchLabels: {%s}}]", "fromCIDR: [192.0.2.0/24]")
    candidates = [
        *parse_documents(GUARD % "app: nobody", "a.yaml"),
        *parse_documents(cidr.replace("guard", "g2"), "b.yaml"),
    ]
    with live.trial(candidates) as changed:
        assert changed == {DEATHSTAR}
        assert live.resolved(DEATHSTAR) != before[DEATHSTAR]
        assert live.cidr_identities()
    assert {i: live.resolved(i) for i in PODS} == before  # revisions included
    assert live.take_peer_set_changes() == ([], [])
    assert live.take_cidr_changes() == ({}, [])
    assert not live.cidr_identities() and live.policy("default/g2") is None


def test_the_events_of_one_connection_count_once_with_its_outcome() -> None:
    sent = flow(XWING, DEATHSTAR, time=10)  # the trace where it left its pod
    dropped = EnrichedFlow(
        **{
            **msgspec.structs.asdict(flow(XWING, DEATHSTAR, "DROPPED", time=10.2)),
            "source": sent.source,
        }
    )
    again = EnrichedFlow(**{**msgspec.structs.asdict(dropped), "time": 11.2})  # the SYN resent
    later = EnrichedFlow(**{**msgspec.structs.asdict(dropped), "time": 40.0})  # the port reused
    (only,) = groups(sent, dropped, again, later)
    assert (only.verdict, only.count) == ("DROPPED", 2)
