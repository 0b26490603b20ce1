"""membrane.suggest on plain data: the documents parse, allow every observed connection and
nothing else, checked with the resolver and explain (the datapath's lookup)."""

from __future__ import annotations

import pytest

from membrane.suggest import CNP, KNP, suggest
from services.policy.diff import diff
from services.policy.explain import explain
from services.policy.model import PROTO_ICMP, PROTO_TCP
from services.policy.parser import parse_document
from services.policy.resolver import Resolver
from shared.flow_api import FlowGroup
from shared.labels import pod_identity_labels

FRONTEND, API, DB, OTHER_NS = 400, 401, 402, 403
LABELS = {
    FRONTEND: pod_identity_labels("shop", {"app": "frontend"}, {"team": "a"}, "default"),
    API: pod_identity_labels("shop", {"app": "api", "tier": "backend"}, {"team": "a"}, "api"),
    DB: pod_identity_labels("shop", {"app": "db"}, {"team": "a"}, "default"),
    OTHER_NS: pod_identity_labels("ops", {"app": "probe"}, {"team": "ops"}, "default"),
}


NAMES = {
    FRONTEND: "shop/frontend",
    API: "shop/api",
    DB: "shop/db",
    OTHER_NS: "ops/probe",
    2: "198.51.100.7",
}


def group(src: int, dst: int, port: int, protocol: str = "TCP", **kw: object) -> FlowGroup:
    return FlowGroup(
        source=NAMES[src],
        destination=NAMES[dst],
        src_identity=src,
        dst_identity=dst,
        protocol=protocol,
        port=port,
        verdict=str(kw.get("verdict", "FORWARDED")),
        dst_ip=str(kw.get("dst_ip", "")),
        count=3,
        first=1.0,
        last=2.0,
    )


OBSERVED = [
    group(FRONTEND, API, 8080),
    group(API, DB, 5432),
    group(OTHER_NS, API, 9090),
    group(API, 2, 443, dst_ip="198.51.100.7"),
    group(FRONTEND, API, 8, "ICMP"),
    group(FRONTEND, DB, 5432, verdict="DROPPED"),  # not delivered: not allowed
]


def resolver_with(documents: list[dict[str, object]]) -> Resolver:
    resolver = Resolver()
    for number, labels in LABELS.items():
        resolver.set_identity(number, labels)
    for index, document in enumerate(documents, start=1):
        resolver.set_policy(parse_document(document, "suggested", index))
    return resolver


def allowed(resolver: Resolver, src: int, dst: int, port: int, protocol: int = PROTO_TCP) -> bool:
    return explain(resolver, src, dst, protocol, port).allowed


def test_a_suggestion_allows_what_was_seen_and_nothing_else() -> None:
    result = suggest(OBSERVED, LABELS, "shop")
    assert [d["metadata"]["name"] for d in result.documents] == [
        "api-observed",
        "db-observed",
        "frontend-observed",
    ]
    api = result.documents[0]["spec"]
    assert api["endpointSelector"] == {"matchLabels": {"app": "api", "tier": "backend"}}
    assert result.uncovered == [] and result.flows == 15
    r = resolver_with(result.documents)
    assert allowed(r, FRONTEND, API, 8080) and allowed(r, API, DB, 5432)
    assert allowed(r, OTHER_NS, API, 9090) and allowed(r, FRONTEND, API, 8, PROTO_ICMP)
    assert not allowed(r, FRONTEND, DB, 5432)  # dropped when observed: stays out
    assert not allowed(r, FRONTEND, API, 8081)  # only the port seen
    assert not allowed(r, DB, API, 8080)  # egress of db: nothing seen
    assert not allowed(r, API, FRONTEND, 8080)  # ingress of frontend: nothing seen
    # and `policy diff` of it changes no delivered flow (the dropped one was dropped by a
    # policy this resolver does not have: here it is newly denied)
    empty = resolver_with([])
    policies = [parse_document(d, "s", i) for i, d in enumerate(result.documents, start=1)]
    changes, _ = diff(empty, policies, OBSERVED, {})
    assert [c.group.verdict for c in changes] == ["DROPPED"]


def test_for_one_workload_and_as_networkpolicy() -> None:
    result = suggest(OBSERVED, LABELS, "shop", kind=KNP, workload="api")
    (document,) = result.documents
    assert document["kind"] == KNP and document["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress = document["spec"]["ingress"]
    assert {
        "namespaceSelector": {"matchLabels": {"team": "ops"}},
        "podSelector": {"matchLabels": {"app": "probe"}},
    } in [rule["from"][0] for rule in ingress]
    r = resolver_with(result.documents)
    assert allowed(r, FRONTEND, API, 8080) and allowed(r, OTHER_NS, API, 9090)
    assert not allowed(r, DB, API, 8080)
    assert "ICMP" in " ".join(result.uncovered)  # NetworkPolicy has no ICMP rules


@pytest.mark.parametrize("kind", [CNP, KNP])
def test_nothing_observed_suggests_nothing(kind: str) -> None:
    assert suggest([], LABELS, "shop", kind=kind).documents == []
