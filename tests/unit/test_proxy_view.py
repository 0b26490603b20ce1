"""The L7 proxy's verdicts from resolved policy, and Cilium's HTTP rule fields."""

from __future__ import annotations

from ipaddress import IPv4Address

import msgspec
import pytest

from services.policy.parser import PolicyDocumentError, parse_documents
from services.proxy.view import View
from shared import l7_http, l7_kafka
from shared.errors import InvalidArgument
from shared.messages import IPCacheEntry, PeerSet, PolicyEntry, ResolvedPolicy

CLIENT, SERVER, OTHER = IPv4Address("10.0.0.4"), IPv4Address("10.0.0.3"), IPv4Address("10.0.0.5")
TIE, DEATHSTAR, XWING = 257, 256, 258
LANDING = [{"http": {"method": "POST", "path": "/v1/request-landing"}}]


def view(*policies: ResolvedPolicy) -> View:
    v = View()
    for ip, identity in ((CLIENT, TIE), (SERVER, DEATHSTAR), (OTHER, XWING)):
        v.set_ipcache(str(ip), msgspec.json.encode(IPCacheEntry(f"{ip}/32", identity)))
    for policy in policies:
        v.set_resolved(str(policy.identity), msgspec.json.encode(policy))
    return v


def ingress(*entries: PolicyEntry) -> ResolvedPolicy:
    return ResolvedPolicy(
        identity=DEATHSTAR,
        revision=1,
        ingress_enforced=True,
        ingress=list(entries),
        rules={1: "default/rule1[0]", 2: "default/open[0]"},
    )


def ask(v: View, method: str, path: str, src: IPv4Address = CLIENT, **headers: str) -> bool:
    return v.http(src, SERVER, 80, method, path, headers).allowed


def test_star_wars_rule() -> None:
    v = view(ingress(PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING)))
    assert ask(v, "POST", "/v1/request-landing")
    denied = v.http(CLIENT, SERVER, 80, "PUT", "/v1/exhaust-port", {})
    assert not denied.allowed and denied.rule_id == 1 and denied.policy == "default/rule1[0]"
    assert (denied.src_identity, denied.dst_identity, denied.direction) == (
        TIE,
        DEATHSTAR,
        "ingress",
    )
    # anchored at both ends: a longer path or a query does not match
    assert not ask(v, "POST", "/v1/request-landing/x")
    assert not ask(v, "POSTX", "/v1/request-landing")
    # the xwing matches no entry of the enforced ingress: denied (the datapath drops it first)
    assert not ask(v, "POST", "/v1/request-landing", src=OTHER)
    # the policy gone (an open keep-alive connection outlives it): no side restricts any more
    v.set_resolved(str(DEATHSTAR), None)
    assert ask(v, "PUT", "/v1/exhaust-port")


def test_a_deny_wins_over_the_l7_allow_as_in_the_datapath() -> None:
    # An ingressDeny of the tiefighter next to its L7 allow (a deny that arrived while its
    # keep-alive connection was open): every request is denied, in the deny's name; another
    # port, or another peer's allow, is not touched by it.
    allow = PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING)
    v = view(ingress(allow, PolicyEntry(peer=TIE, protocol=0, port=0, rule_id=2, deny=True)))
    denied = v.http(CLIENT, SERVER, 80, "POST", "/v1/request-landing", {})
    assert not denied.allowed and denied.rule_id == 2 and denied.policy == "default/open[0]"
    kafka_request = l7_kafka.KafkaRequest(api_key=0, api_version=3, client_id="", topics=("t",))
    assert not v.kafka(CLIENT, SERVER, 80, kafka_request).allowed
    other = PolicyEntry(peer=XWING, protocol=6, port=80, rule_id=1, l7=LANDING)
    v = view(ingress(other, PolicyEntry(peer=TIE, protocol=6, port=81, rule_id=2, deny=True)))
    assert ask(v, "POST", "/v1/request-landing", src=OTHER)
    v = view(ingress(allow, PolicyEntry(peer=TIE, protocol=6, port=81, rule_id=2, deny=True)))
    assert ask(v, "POST", "/v1/request-landing")  # the deny is for another port


def test_peer_sets_ports_and_a_plain_allow_next_to_l7() -> None:
    v = view(
        ingress(PolicyEntry(selector=9, protocol=6, port=70, end_port=90, rule_id=1, l7=LANDING))
    )
    assert not ask(v, "POST", "/v1/request-landing")  # the peer set is not known yet
    v.set_members("9", msgspec.json.encode(PeerSet(id=9, revision=1, identities=[TIE])))
    assert ask(v, "POST", "/v1/request-landing")
    assert not ask(v, "GET", "/")
    wide = view(
        ingress(
            PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING),
            PolicyEntry(peer=0, protocol=6, port=0, rule_id=2),
        )
    )
    assert ask(wide, "GET", "/anything")  # a plain allow of the same peer and port: all of it


def test_policy_change_is_seen_by_the_next_request() -> None:
    v = view(ingress(PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING)))
    before = v.generation
    assert not ask(v, "PUT", "/v1/exhaust-port")
    put = [{"http": {"method": "PUT"}}]
    policy = ingress(PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING + put))
    v.set_resolved(str(DEATHSTAR), msgspec.json.encode(policy))
    assert v.generation > before and ask(v, "PUT", "/v1/exhaust-port")
    v.set_resolved(str(DEATHSTAR), msgspec.json.encode(ingress()))  # enforced, nothing allowed
    assert not ask(v, "PUT", "/v1/exhaust-port")


def test_egress_and_ingress_both_restrict() -> None:
    egress = ResolvedPolicy(
        identity=TIE,
        revision=1,
        egress_enforced=True,
        egress=[
            PolicyEntry(
                peer=DEATHSTAR, protocol=6, port=80, rule_id=3, l7=[{"http": {"path": "/v1/.*"}}]
            )
        ],
    )
    v = view(egress, ingress(PolicyEntry(peer=TIE, protocol=6, port=80, rule_id=1, l7=LANDING)))
    assert ask(v, "POST", "/v1/request-landing")
    assert not ask(v, "POST", "/v2/request-landing")  # egress denies
    verdict = v.http(CLIENT, SERVER, 80, "GET", "/v1/x", {})
    assert not verdict.allowed and verdict.direction == "ingress"


def test_http_rule_fields() -> None:
    rule = l7_http.compile_rule(
        {
            "method": "GET|HEAD",
            "host": r"api\.example",
            "headers": ["X-Token", "X-Mode: test"],
            "headerMatches": [{"name": "X-Debug", "value": "1", "mismatch": "LOG"}],
        },
        "r",
    )
    headers = {"host": "api.example", "x-token": "a", "x-mode": "test"}
    assert rule.matches("HEAD", "/", headers) == (True, True)  # X-Debug missing: logged only
    assert rule.matches("GET", "/", {**headers, "x-debug": "1"}) == (True, False)
    assert rule.matches("GET", "/", {**headers, "x-mode": "prod"})[0] is False
    assert rule.matches("GET", "/", {"host": "api.example", "x-mode": "test"})[0] is False
    assert rule.matches("POST", "/", headers)[0] is False
    assert l7_http.compile_rule({}, "r").matches("DELETE", "/x", {}) == (True, False)


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"path": "/v1/(unclosed"}, "http[0].path"),
        ({"method": "*GET"}, "http[0].method"),
        (
            {"headerMatches": [{"name": "X", "mismatch": "REPLACE", "value": "y"}]},
            "headerMatches[0].mismatch",
        ),
        ({"headers": ["bad name: x"]}, "headers[0]"),
    ],
)
def test_rules_that_do_not_compile_are_refused_at_apply(
    rule: dict[str, object], field: str
) -> None:
    import json

    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bad"},
        "spec": {
            "endpointSelector": {"matchLabels": {"a": "b"}},
            "ingress": [
                {
                    "toPorts": [
                        {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [rule]}}
                    ]
                }
            ],
        },
    }
    with pytest.raises((InvalidArgument, PolicyDocumentError)) as caught:
        parse_documents(json.dumps(doc), "-")
    assert field in str(caught.value)


def test_pods_on_other_nodes_are_known_by_address() -> None:
    """The proxy's upstream to a pod on another node leaves as the client (exchange.py): the
    view says which addresses those are, from the ipcache's node field, as entries come, move
    and go."""
    v = View("node-1")

    def put(ip: IPv4Address, node: str) -> None:
        v.set_ipcache(str(ip), msgspec.json.encode(IPCacheEntry(f"{ip}/32", TIE, node=node)))

    put(CLIENT, "node-1")
    put(SERVER, "node-2")
    put(OTHER, "")  # not a pod (a node's address, a CIDR identity)
    assert v.elsewhere == {SERVER}
    put(SERVER, "node-1")  # the address now belongs to a pod here
    assert v.elsewhere == set()
    put(CLIENT, "node-3")
    v.set_ipcache(str(CLIENT), None)
    assert v.elsewhere == set()
