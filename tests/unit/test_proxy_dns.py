"""The DNS proxy's pure parts: query verdicts from resolved policy, what answers teach, the
per-endpoint caches with TTL, grace and cap, and when an answer may be released."""

from __future__ import annotations

from ipaddress import IPv4Address

import dns.message
import dns.rrset
import msgspec

from services.proxy.dns_policy import answers_of, learned, missing, query_verdict, question
from services.proxy.fqdn_cache import FQDNCaches
from services.proxy.view import View
from shared.fqdn import NameMatch
from shared.messages import IPCacheEntry, PeerSet, PolicyEntry, ResolvedPolicy

POD, SERVER = IPv4Address("10.0.0.4"), IPv4Address("198.51.100.10")
POD_ID, SERVER_ID, API_ID = 300, (1 << 24) | 5, (1 << 24) | 6
DNS_SET, FQDN_SET = 11, 12
UDP, TCP = 17, 6
RULES = [{"dns": {"matchName": "api.example.com"}}, {"dns": {"matchPattern": "*.cdn.io"}}]


def view(*egress: PolicyEntry) -> View:
    v = View()
    v.set_ipcache(str(POD), msgspec.json.encode(IPCacheEntry(f"{POD}/32", POD_ID)))
    v.set_ipcache("198.51.100.10/32", msgspec.json.encode(IPCacheEntry(f"{SERVER}/32", SERVER_ID)))
    v.set_members(str(DNS_SET), msgspec.json.encode(PeerSet(DNS_SET, 1, identities=[SERVER_ID])))
    policy = ResolvedPolicy(
        identity=POD_ID, revision=1, egress_enforced=True, egress=list(egress), rules={1: "d/p[0]"}
    )
    v.set_resolved(str(POD_ID), msgspec.json.encode(policy))
    return v


def dns_entry(protocol: int = UDP, l7: list[dict[str, object]] | None = None) -> PolicyEntry:
    return PolicyEntry(selector=DNS_SET, protocol=protocol, port=53, rule_id=1, l7=l7 or RULES)


def test_queries_matching_the_dns_rules_are_allowed_others_refused() -> None:
    v = view(dns_entry(UDP), dns_entry(TCP))
    for protocol in (UDP, TCP):
        assert query_verdict(v, POD, SERVER, 53, protocol, "api.example.com").allowed
        assert query_verdict(v, POD, SERVER, 53, protocol, "x.cdn.io").allowed
        denied = query_verdict(v, POD, SERVER, 53, protocol, "evil.example.org")
        assert not denied.allowed and denied.rule_id == 1 and denied.policy == "d/p[0]"
    assert not query_verdict(v, POD, SERVER, 53, UDP, "cdn.io").allowed
    # another server, or a port the entry does not hold: no entry matches, refused
    assert not query_verdict(v, POD, IPv4Address("1.1.1.1"), 53, UDP, "api.example.com").allowed
    assert not query_verdict(v, POD, SERVER, 5353, UDP, "api.example.com").allowed
    # a plain allow of the same server and port lets every name through (Cilium's wildcard)
    plain = PolicyEntry(selector=DNS_SET, protocol=UDP, port=53, rule_id=2)
    assert query_verdict(view(dns_entry(), plain), POD, SERVER, 53, UDP, "evil.org").allowed
    # egress not enforced: nothing restricts
    assert query_verdict(View(), POD, SERVER, 53, UDP, "evil.org").allowed


def answer(name: str, *rrsets: tuple[str, int, str, list[str]]) -> dns.message.Message:
    response = dns.message.make_response(dns.message.make_query(name, "A"))
    for owner, ttl, kind, values in rrsets:
        response.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", kind, values))
    return response


def test_answers_teach_their_addresses_by_name_and_through_cnames() -> None:
    got = learned(answer("API.example.com.", ("api.example.com.", 30, "A", ["1.2.3.4", "1.2.3.5"])))
    assert got == {"api.example.com": (["1.2.3.4", "1.2.3.5"], 30)}
    chain = answer(
        "www.example.com.",
        ("www.example.com.", 300, "CNAME", ["edge.cdn.io."]),
        ("edge.cdn.io.", 20, "A", ["5.6.7.8"]),
    )
    assert learned(chain) == {
        "edge.cdn.io": (["5.6.7.8"], 20),
        "www.example.com": (["5.6.7.8"], 20),
    }
    assert answers_of(learned(chain)) == (["5.6.7.8"], 20)
    assert learned(answer("x.io.")) == {}
    assert question(dns.message.make_query("A.b.", "AAAA")) == ("a.b", "AAAA")


def test_an_answer_waits_for_its_addresses_in_the_matching_toFQDNs_sets() -> None:
    fqdn_rule = PolicyEntry(selector=FQDN_SET, protocol=TCP, port=80, rule_id=1)
    v = view(dns_entry(), fqdn_rule)
    sets = {FQDN_SET: NameMatch(match_name="api.example.com")}
    names = {"api.example.com": (["198.51.100.20"], 30), "other.io": (["198.51.100.30"], 30)}
    assert missing(v, sets, POD_ID, names) == [("api.example.com", "198.51.100.20")]
    v.set_ipcache("198.51.100.20/32", msgspec.json.encode(IPCacheEntry("198.51.100.20/32", API_ID)))
    assert missing(v, sets, POD_ID, names) == [("api.example.com", "198.51.100.20")]
    v.set_members(str(FQDN_SET), msgspec.json.encode(PeerSet(FQDN_SET, 2, identities=[API_ID])))
    assert missing(v, sets, POD_ID, names) == []
    # a pod whose policy names no toFQDNs set waits for nothing
    assert missing(v, sets, 999, names) == []


def test_cache_ttl_min_ttl_grace_and_cap() -> None:
    caches = FQDNCaches("n1", min_ttl=10, grace=5, max_per_name=2)
    changed, evicted = caches.learn("10.0.0.4", POD_ID, {"a.io": (["1.1.1.1"], 2)}, now=100)
    assert (changed, evicted) == (True, 0)
    message = caches.message("10.0.0.4")
    assert message is not None and message.identity == POD_ID
    (entry,) = message.names
    assert (entry.name, entry.addresses[0].ip, entry.addresses[0].expires) == (
        "a.io",
        "1.1.1.1",
        110,
    )
    # the same address again: a longer life, nothing new for the policy service
    assert caches.learn("10.0.0.4", POD_ID, {"a.io": (["1.1.1.1"], 30)}, now=101) == (False, 0)
    assert caches.expire(now=135) == []  # 131 + grace 5
    assert caches.expire(now=136) == ["10.0.0.4"]
    assert caches.message("10.0.0.4") is None
    # the cap: the oldest learned goes first
    caches.learn("10.0.0.4", POD_ID, {"a.io": (["1.1.1.1", "1.1.1.2"], 60)}, now=200)
    assert caches.learn("10.0.0.4", POD_ID, {"a.io": (["1.1.1.3"], 60)}, now=201) == (True, 1)
    message = caches.message("10.0.0.4")
    assert message is not None
    assert [a.ip for a in message.names[0].addresses] == ["1.1.1.2", "1.1.1.3"]


def test_clean_and_restore() -> None:
    caches = FQDNCaches("n1", min_ttl=0, grace=0, max_per_name=50)
    caches.learn("10.0.0.4", POD_ID, {"a.cdn.io": (["1.1.1.1"], 60), "b.io": (["2.2.2.2"], 60)}, 0)
    caches.learn("10.0.0.5", 301, {"c.cdn.io": (["3.3.3.3"], 60)}, 0)
    saved = [caches.message(ip) for ip in ("10.0.0.4", "10.0.0.5")]
    assert caches.clean(NameMatch(match_pattern="*.cdn.io")) == (["10.0.0.4", "10.0.0.5"], 2)
    assert caches.message("10.0.0.5") is None
    assert caches.clean(None, "10.0.0.4") == (["10.0.0.4"], 1)
    restored = FQDNCaches("n1", min_ttl=0, grace=0, max_per_name=50)
    for message in saved:
        assert message is not None
        restored.restore(message)
    assert restored.message("10.0.0.4") == saved[0]
