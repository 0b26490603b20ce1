"""The DNS proxy's decisions, as pure logic over the proxy's :class:`View`.

- Which queries a pod may send (``rules.dns`` of its egress policy): the allow entries matching
  (server identity, protocol, port) as the datapath's compiler matches them; one without L7
  rules allows every name (Cilium's wildcard rule), otherwise one of their ``matchName`` /
  ``matchPattern`` rules must match the query name. No match: ``REFUSED``.
- What an answer teaches: name -> (IPv4 addresses, TTL), the query name included when the
  addresses came through a CNAME chain.
- When the answer may be released: every toFQDNs peer set of the pod's egress policy whose
  selector matches a learned name must hold the identity of that name's addresses, so that the
  first connection after the lookup is not dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from ipaddress import IPv4Address

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from services.proxy.view import Verdict, View
from shared import fqdn, identities
from shared.fqdn import NameMatch
from shared.messages import PolicyEntry

Learned = dict[str, tuple[list[str], int]]  # name -> (addresses, TTL)

_matches: dict[tuple[str, str], NameMatch] = {}


def _name_match(rule: Mapping[str, object]) -> NameMatch:
    key = (str(rule.get("matchName") or ""), str(rule.get("matchPattern") or ""))
    found = _matches.get(key)
    if found is None:
        if len(_matches) > 4096:  # bounded: rules come from policies, but policies churn
            _matches.clear()
        found = _matches[key] = NameMatch(*key)
    return found


def _entry_matches(view: View, entry: PolicyEntry, peer: int, protocol: int, port: int) -> bool:
    if entry.deny or entry.protocol not in (0, protocol) or entry.port_name:
        return False
    if entry.selector:
        if peer not in view.members.get(entry.selector, ()):
            return False
    elif entry.peer and entry.peer != peer:
        return False
    return entry.port == 0 or entry.port <= port <= max(entry.port, entry.end_port)


def query_verdict(
    view: View, src: IPv4Address, dst: IPv4Address, port: int, protocol: int, name: str
) -> Verdict:
    """Whether ``src`` may ask ``dst:port`` for ``name`` (normalized)."""
    src_id, dst_id = view.identity_of(src), view.identity_of(dst)
    policy = view.resolved.get(src_id)
    if policy is None or not policy.egress_enforced:
        return Verdict(True, src_id, dst_id)
    restricting = 0
    for entry in policy.egress:
        if not _entry_matches(view, entry, dst_id, protocol, port):
            continue
        if not entry.l7:
            return Verdict(True, src_id, dst_id, entry.rule_id, "", "egress")
        restricting = restricting or entry.rule_id
        for rule in entry.l7:
            spec = rule.get("dns")
            if isinstance(spec, Mapping) and _name_match(spec).matches(name):
                names = policy.rules.get(entry.rule_id, "")
                return Verdict(True, src_id, dst_id, entry.rule_id, names, "egress")
    return Verdict(False, src_id, dst_id, restricting, policy.rules.get(restricting, ""), "egress")


def question(message: dns.message.Message) -> tuple[str, str] | None:
    """(normalized name, type) of a query with exactly one question, else None."""
    if len(message.question) != 1:
        return None
    rrset = message.question[0]
    return fqdn.normalize(rrset.name.to_text()), dns.rdatatype.to_text(rrset.rdtype)


def learned(answer: dns.message.Message) -> Learned:
    """The IPv4 addresses an answer gives, by owner name, and for the question's name."""
    out: Learned = {}
    every: list[str] = []
    ttl: int | None = None
    for rrset in answer.answer:
        if rrset.rdtype != dns.rdatatype.A or rrset.rdclass != dns.rdataclass.IN:
            continue
        addresses = [rdata.address for rdata in rrset]
        name = fqdn.normalize(rrset.name.to_text())
        known, known_ttl = out.get(name, ([], rrset.ttl))
        out[name] = (known + addresses, min(known_ttl, rrset.ttl))
        every += addresses
        ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
    found = question(answer)
    if found is not None and every and found[0] not in out:
        out[found[0]] = (every, ttl or 0)  # reached through CNAMEs
    return out


def _fqdn_sets(view: View, fqdn_sets: Mapping[int, NameMatch], identity: int) -> Iterator[int]:
    policy = view.resolved.get(identity)
    if policy is None:
        return
    for entry in policy.egress:
        if entry.selector in fqdn_sets and not entry.deny:
            yield entry.selector


def missing(
    view: View, fqdn_sets: Mapping[int, NameMatch], identity: int, names: Learned
) -> list[tuple[str, str]]:
    """The (name, address) pairs the pod's toFQDNs peer sets should hold and do not yet."""
    out: list[tuple[str, str]] = []
    sets = set(_fqdn_sets(view, fqdn_sets, identity))
    if not sets:
        return out
    for name, (addresses, _) in names.items():
        wanted = [s for s in sets if fqdn_sets[s].matches(name)]
        if not wanted:
            continue
        for address in addresses:
            number = view.identity_of(IPv4Address(address))
            if number == identities.WORLD or any(
                number not in view.members.get(s, ()) for s in wanted
            ):
                out.append((name, address))
    return out


def answers_of(names: Learned) -> tuple[list[str], int]:
    """Every address of an answer (for its flow), and the smallest TTL."""
    addresses: list[str] = []
    ttls: list[int] = []
    for found, ttl in names.values():
        addresses += [a for a in found if a not in addresses]
        ttls.append(ttl)
    return addresses, min(ttls) if ttls else 0


def refused(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.REFUSED)
    return response.to_wire()


def servfail(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


def rcode_name(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())
