"""Policy compiler: LPM-trie entries and the modelled datapath lookup agree with policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence

import pytest

from shared.messages import ContainerPort, PolicyEntry, ResolvedPolicy
from shared.policy_map import (
    EGRESS,
    INGRESS,
    KEY_BITS,
    PROTO_BITS,
    SLOT_BITS,
    PolicyKey,
    PolicyValue,
    compile_endpoint,
    diff,
    port_prefixes,
    verdict,
)
from shared.proxy import PROXY_PORT

EP = 7
WEB = 1000
DB = 2000
OTHER = 3000
TCP, UDP, ICMP, SCTP = 6, 17, 1, 132

Entries = dict[PolicyKey, PolicyValue]


def policy(
    ingress: Sequence[PolicyEntry] = (), egress: Sequence[PolicyEntry] = ()
) -> ResolvedPolicy:
    return ResolvedPolicy(
        identity=42,
        revision=1,
        ingress_enforced=True,
        egress_enforced=True,
        ingress=list(ingress),
        egress=list(egress),
    )


def compiled(*ingress: PolicyEntry, ports: Sequence[ContainerPort] = ()) -> Entries:
    return compile_endpoint(EP, policy(ingress), ports)


def ingress(entries: Mapping[PolicyKey, PolicyValue], peer: int, proto: int, port: int) -> str:
    return verdict(entries, EP, INGRESS, peer, proto, port)[0]


def keys(entries: Mapping[PolicyKey, PolicyValue]) -> set[tuple[int, int, int, int]]:
    return {(k.prefixlen, k.identity, k.protocol, k.port) for k in entries}


# --- key layout -----------------------------------------------------------------------------------


def test_key_pack_layout() -> None:
    key = PolicyKey(128, 0x01020304, INGRESS, 0x00ABCDEF, TCP, 8080)
    assert key.pack() == bytes.fromhex("80000000010203040100000000abcdef06001f90")
    assert PolicyKey(SLOT_BITS, 3, EGRESS, 0, 0, 0).pack() == bytes.fromhex(
        "6000000000000003020000000000000000000000"
    )


def test_value_pack_layout() -> None:
    assert PolicyValue(0x01020304, True).pack() == bytes.fromhex("0403020101000000")
    assert PolicyValue(5, False).pack() == bytes.fromhex("0500000000000000")
    assert PolicyValue(5, False, 15001).pack() == bytes.fromhex("050000000000993a")


# --- L7: never an L4 allow ------------------------------------------------------------------------

HTTP = [{"http": {"method": "GET"}}]


def test_l7_allow_holds_the_proxy_port() -> None:
    entries = compiled(PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1, l7=HTTP))
    (value,) = entries.values()
    assert value == PolicyValue(1, False, PROXY_PORT)
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("proxy", 1)
    assert ingress(entries, WEB, TCP, 81) == "none"


def test_l7_beats_a_plain_allow_of_the_same_key_and_deny_beats_both() -> None:
    plain = PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1)
    l7 = PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=2, l7=HTTP)
    for order in ((plain, l7), (l7, plain)):
        assert verdict(compiled(*order), EP, INGRESS, WEB, TCP, 80) == ("proxy", 2)
    deny = PolicyEntry(peer=WEB, protocol=TCP, port=0, rule_id=3, deny=True)
    assert verdict(compiled(plain, l7, deny), EP, INGRESS, WEB, TCP, 80) == ("deny", 3)
    # a wider plain allow of the any-identity slot does not make the L7 port an L4 allow
    wide = PolicyEntry(peer=0, protocol=TCP, port=0, rule_id=4)
    assert verdict(compiled(l7, wide), EP, INGRESS, WEB, TCP, 80) == ("proxy", 2)
    assert verdict(compiled(l7, wide), EP, INGRESS, WEB, TCP, 81) == ("allow", 4)


# --- port ranges ----------------------------------------------------------------------------------


def covered(prefixes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (first, last) port intervals of prefixes, checking each is a well-formed prefix."""
    intervals = []
    for value, bits in prefixes:
        size = 1 << (16 - bits)
        assert value % size == 0, "a prefix value has bits set beyond its length"
        intervals.append((value, value + size - 1))
    return sorted(intervals)


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [
        (80, 80, [(80, 16)]),
        (80, 81, [(80, 15)]),
        (81, 82, [(81, 16), (82, 16)]),
        (1, 65535, [(1, 16), (2, 15), (4, 14), (8, 13)] + [(1 << n, 16 - n) for n in range(4, 16)]),
        (0, 65535, [(0, 0)]),
        (1024, 2047, [(1024, 6)]),
        (65535, 65535, [(65535, 16)]),
    ],
)
def test_port_prefixes_known(first: int, last: int, expected: list[tuple[int, int]]) -> None:
    assert port_prefixes(first, last) == expected


def test_port_prefixes_cover_exactly_the_range() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        first = rng.choice([rng.randint(1, 65535), rng.randint(1, 300)])
        last = rng.choice([first, rng.randint(first, min(first + 300, 65535)), 65535])
        prefixes = port_prefixes(first, last)
        intervals = covered(prefixes)
        # back to back, from first to last: every port in the range once, none outside it
        assert intervals[0][0] == first and intervals[-1][1] == last
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(intervals))
        # the decomposition is minimal: at most two prefixes per bit length
        assert len(prefixes) <= 2 * 16
        lengths = [bits for _, bits in prefixes]
        assert all(lengths.count(bits) <= 2 for bits in set(lengths))


def test_range_becomes_port_prefix_keys() -> None:
    entries = compiled(PolicyEntry(peer=WEB, protocol=TCP, port=80, end_port=83, rule_id=1))
    assert keys(entries) == {(PROTO_BITS + 14, WEB, TCP, 80)}
    entries = compiled(PolicyEntry(peer=WEB, protocol=TCP, port=79, end_port=80, rule_id=1))
    assert keys(entries) == {(KEY_BITS, WEB, TCP, 79), (KEY_BITS, WEB, TCP, 80)}
    assert [ingress(entries, WEB, TCP, p) for p in (78, 79, 80, 81)] == [
        "none",
        "allow",
        "allow",
        "none",
    ]


def test_end_port_not_above_port_is_one_port() -> None:
    for end in (0, 80, 70):
        entries = compiled(PolicyEntry(protocol=TCP, port=80, end_port=end, rule_id=1))
        assert keys(entries) == {(KEY_BITS, 0, TCP, 80)}


# --- protocols ------------------------------------------------------------------------------------


def test_any_protocol_any_port_is_one_short_key() -> None:
    entries = compiled(PolicyEntry(peer=WEB, rule_id=3))
    assert entries == {PolicyKey(SLOT_BITS, EP, INGRESS, WEB, 0, 0): PolicyValue(3, False)}
    for proto in (ICMP, TCP, UDP, SCTP, 47):
        assert verdict(entries, EP, INGRESS, WEB, proto, 1234) == ("allow", 3)


def test_port_without_protocol_expands_to_tcp_udp_sctp() -> None:
    entries = compiled(PolicyEntry(peer=WEB, port=80, rule_id=3))
    assert keys(entries) == {(KEY_BITS, WEB, proto, 80) for proto in (TCP, UDP, SCTP)}
    assert [ingress(entries, WEB, proto, 80) for proto in (TCP, UDP, SCTP, ICMP, 47)] == [
        "allow",
        "allow",
        "allow",
        "none",
        "none",
    ]
    ranged = compiled(PolicyEntry(peer=WEB, port=80, end_port=83, rule_id=3))
    assert keys(ranged) == {(PROTO_BITS + 14, WEB, proto, 80) for proto in (TCP, UDP, SCTP)}


def test_protocol_without_port_is_the_protocol_key() -> None:
    entries = compiled(PolicyEntry(protocol=UDP, rule_id=2))
    assert keys(entries) == {(PROTO_BITS, 0, UDP, 0)}
    assert ingress(entries, WEB, UDP, 53) == "allow"
    assert ingress(entries, WEB, TCP, 53) == "none"


def test_icmp_type_sits_in_the_port() -> None:
    entries = compiled(PolicyEntry(protocol=ICMP, port=8, rule_id=2))
    assert keys(entries) == {(KEY_BITS, 0, ICMP, 8)}
    assert [ingress(entries, WEB, ICMP, t) for t in (8, 0)] == ["allow", "none"]
    assert keys(compiled(PolicyEntry(protocol=ICMP, rule_id=2))) == {(PROTO_BITS, 0, ICMP, 0)}


# --- named ports ----------------------------------------------------------------------------------

PORTS = [
    ContainerPort(port=8080, protocol="TCP", name="http"),
    ContainerPort(port=53, protocol="UDP", name="dns"),
    ContainerPort(port=5353, protocol="tcp", name="dns-tcp"),
    ContainerPort(port=9000, protocol="SCTP", name="sig"),
]


@pytest.mark.parametrize(
    ("protocol", "name", "expected"),
    [
        (TCP, "http", {(KEY_BITS, WEB, TCP, 8080)}),
        (0, "http", {(KEY_BITS, WEB, TCP, 8080)}),  # the container port's protocol
        (UDP, "http", set()),  # protocol mismatch
        (0, "dns", {(KEY_BITS, WEB, UDP, 53)}),
        (TCP, "dns-tcp", {(KEY_BITS, WEB, TCP, 5353)}),  # protocol names in any case
        (0, "sig", {(KEY_BITS, WEB, SCTP, 9000)}),
        (0, "missing", set()),  # not declared: no entry for this endpoint
    ],
)
def test_named_port_resolution(protocol: int, name: str, expected: set[object]) -> None:
    entry = PolicyEntry(peer=WEB, protocol=protocol, port_name=name, rule_id=4)
    assert keys(compiled(entry, ports=PORTS)) == expected


def test_named_port_resolves_per_endpoint() -> None:
    resolved = policy([PolicyEntry(protocol=TCP, port_name="http", rule_id=4)])
    a = compile_endpoint(1, resolved, [ContainerPort(port=8080, name="http")])
    b = compile_endpoint(2, resolved, [ContainerPort(port=9090, name="http")])
    c = compile_endpoint(3, resolved, [])
    assert keys(a) == {(KEY_BITS, 0, TCP, 8080)}
    assert keys(b) == {(KEY_BITS, 0, TCP, 9090)}
    assert c == {}


def test_egress_named_port_resolves_against_the_destination() -> None:
    own = [ContainerPort(port=7070, name="http")]  # the source's: never used for egress
    peer_ports = {
        WEB: [ContainerPort(port=8080, name="http")],
        DB: [ContainerPort(port=9090, name="http"), ContainerPort(port=5432, name="pg")],
    }
    to_web = policy(egress=[PolicyEntry(peer=WEB, protocol=TCP, port_name="http", rule_id=4)])
    entries = compile_endpoint(EP, to_web, own, peer_ports)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 8080) == ("allow", 4)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 7070)[0] == "none"
    assert verdict(entries, EP, EGRESS, DB, TCP, 9090)[0] == "none"
    # any peer: each destination on its own declaration of the name, and no other
    to_any = policy(egress=[PolicyEntry(protocol=TCP, port_name="http", rule_id=5)])
    entries = compile_endpoint(EP, to_any, own, peer_ports)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 8080) == ("allow", 5)
    assert verdict(entries, EP, EGRESS, DB, TCP, 9090) == ("allow", 5)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 9090)[0] == "none"
    assert verdict(entries, EP, EGRESS, DB, TCP, 5432)[0] == "none"
    assert verdict(entries, EP, EGRESS, OTHER, TCP, 8080)[0] == "none"
    # a destination that does not declare the name: nothing
    assert compile_endpoint(EP, to_web, own, {}) == {}


def test_named_deny_port() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, rule_id=1),
        PolicyEntry(peer=WEB, protocol=TCP, port_name="http", deny=True, rule_id=2),
        ports=PORTS,
    )
    assert verdict(entries, EP, INGRESS, WEB, TCP, 8080) == ("deny", 2)
    assert verdict(entries, EP, INGRESS, WEB, TCP, 8081) == ("allow", 1)


# --- lookup order (DESIGN §4) ---------------------------------------------------------------------

# most specific first: (identity, proto, port) -> (any, proto, port) -> (identity, proto, any)
# -> (any, proto, any) -> (identity, any, any) -> (any, any, any)
LEVELS = [
    PolicyEntry(peer=WEB, protocol=TCP, port=80),
    PolicyEntry(peer=0, protocol=TCP, port=80),
    PolicyEntry(peer=WEB, protocol=TCP),
    PolicyEntry(peer=0, protocol=TCP),
    PolicyEntry(peer=WEB),
    PolicyEntry(peer=0),
]


@pytest.mark.parametrize("deny", [False, True])
@pytest.mark.parametrize("top", range(len(LEVELS)))
def test_lookup_order(top: int, deny: bool) -> None:
    levels = [
        PolicyEntry(peer=e.peer, protocol=e.protocol, port=e.port, deny=deny, rule_id=n + 1)
        for n, e in enumerate(LEVELS)
    ]
    entries = compiled(*levels[top:])
    expected = "deny" if deny else "allow"
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == (expected, top + 1)
    # another peer only sees the any-identity levels
    others = [n + 1 for n in range(top, len(LEVELS)) if levels[n].peer == 0]
    assert verdict(entries, EP, INGRESS, OTHER, TCP, 80) == (expected, others[0])


def test_no_match_is_none() -> None:
    entries = compiled(PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1))
    assert verdict(entries, EP, INGRESS, DB, TCP, 80) == ("none", 0)
    assert verdict(entries, EP, INGRESS, WEB, TCP, 81) == ("none", 0)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 80) == ("none", 0)
    assert verdict(entries, EP + 1, INGRESS, WEB, TCP, 80) == ("none", 0)
    assert verdict({}, EP, INGRESS, WEB, TCP, 80) == ("none", 0)


def test_directions_and_endpoints_are_separate_slots() -> None:
    resolved = policy(
        ingress=[PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1)],
        egress=[PolicyEntry(peer=DB, protocol=TCP, port=5432, deny=True, rule_id=2)],
    )
    entries = compile_endpoint(EP, resolved, []) | compile_endpoint(EP + 1, policy(), [])
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("allow", 1)
    assert verdict(entries, EP, EGRESS, WEB, TCP, 80) == ("none", 0)
    assert verdict(entries, EP, EGRESS, DB, TCP, 5432) == ("deny", 2)
    assert verdict(entries, EP, INGRESS, DB, TCP, 5432) == ("none", 0)
    assert {k.endpoint for k in entries} == {EP}
    assert compile_endpoint(EP, None, PORTS) == {}


# --- deny precedence ------------------------------------------------------------------------------


def test_deny_in_identity_slot_beats_allow_in_any_slot() -> None:
    entries = compiled(
        PolicyEntry(peer=0, protocol=TCP, port=80, rule_id=1),
        PolicyEntry(peer=WEB, protocol=TCP, port=80, deny=True, rule_id=2),
    )
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("deny", 2)
    assert verdict(entries, EP, INGRESS, DB, TCP, 80) == ("allow", 1)


def test_short_deny_in_any_slot_beats_long_allow_in_identity_slot() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1),
        PolicyEntry(peer=0, deny=True, rule_id=2),
    )
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("deny", 2)


def test_long_deny_in_any_slot_beats_short_allow_in_identity_slot() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, rule_id=1),
        PolicyEntry(peer=0, protocol=TCP, port=80, deny=True, rule_id=2),
    )
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("deny", 2)
    assert verdict(entries, EP, INGRESS, WEB, TCP, 81) == ("allow", 1)


@pytest.mark.parametrize(
    "deny",
    [
        PolicyEntry(peer=WEB, deny=True, rule_id=9),
        PolicyEntry(peer=WEB, protocol=TCP, deny=True, rule_id=9),
        PolicyEntry(peer=WEB, protocol=TCP, port=64, end_port=127, deny=True, rule_id=9),
    ],
)
def test_broader_deny_in_same_slot_hides_nothing(deny: PolicyEntry) -> None:
    allow = PolicyEntry(peer=WEB, protocol=TCP, port=80, end_port=90, rule_id=1)
    for order in ([allow, deny], [deny, allow]):
        entries = compiled(*order)
        assert all(v.deny for v in entries.values()), "a covered allow stays in the map"
        for port in range(80, 91):
            assert verdict(entries, EP, INGRESS, WEB, TCP, port) == ("deny", 9)


def test_narrower_deny_inside_allow() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, port=70, end_port=90, rule_id=1),
        PolicyEntry(peer=WEB, protocol=TCP, port=80, deny=True, rule_id=2),
    )
    assert [ingress(entries, WEB, TCP, p) for p in (69, 70, 79, 80, 81, 90, 91)] == [
        "none",
        "allow",
        "allow",
        "deny",
        "allow",
        "allow",
        "none",
    ]


def test_partly_overlapping_ranges_in_same_slot() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, port=75, end_port=85, rule_id=1),
        PolicyEntry(peer=WEB, protocol=TCP, port=80, end_port=90, deny=True, rule_id=2),
    )
    expected = {p: "allow" for p in range(75, 80)} | {p: "deny" for p in range(80, 91)}
    for port in range(70, 95):
        assert ingress(entries, WEB, TCP, port) == expected.get(port, "none")


def test_same_key_allow_and_deny_keeps_deny() -> None:
    allow = PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1)
    deny = PolicyEntry(peer=WEB, protocol=TCP, port=80, deny=True, rule_id=2)
    for order in ([allow, deny], [deny, allow]):
        entries = compiled(*order)
        assert list(entries.values()) == [PolicyValue(2, True)]


def test_same_key_keeps_lowest_rule_id() -> None:
    for deny in (False, True):
        a = PolicyEntry(peer=WEB, protocol=TCP, port=80, deny=deny, rule_id=5)
        b = PolicyEntry(peer=WEB, protocol=TCP, port=80, deny=deny, rule_id=3)
        for order in ([a, b], [b, a]):
            assert list(compiled(*order).values()) == [PolicyValue(3, deny)]


def test_deny_rule_id_of_the_more_specific_match() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, deny=True, rule_id=1),
        PolicyEntry(peer=0, protocol=TCP, port=80, deny=True, rule_id=2),
    )
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("deny", 2)
    assert verdict(entries, EP, INGRESS, WEB, TCP, 81) == ("deny", 1)


def test_nested_any_identity_entry_is_copied_into_the_peer_slot() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, rule_id=1),
        PolicyEntry(peer=0, protocol=TCP, port=80, rule_id=2),
        PolicyEntry(peer=0, protocol=UDP, port=53, rule_id=3),  # outside WEB's prefixes: no copy
    )
    assert keys(entries) == {
        (PROTO_BITS, WEB, TCP, 0),
        (KEY_BITS, WEB, TCP, 80),
        (KEY_BITS, 0, TCP, 80),
        (KEY_BITS, 0, UDP, 53),
    }
    assert entries[PolicyKey(KEY_BITS, EP, INGRESS, WEB, TCP, 80)] == PolicyValue(2, False)
    assert verdict(entries, EP, INGRESS, WEB, UDP, 53) == ("allow", 3)


def test_copied_allow_under_a_peer_deny_is_left_out() -> None:
    entries = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, deny=True, rule_id=1),
        PolicyEntry(peer=0, protocol=TCP, port=80, rule_id=2),
    )
    assert keys(entries) == {(PROTO_BITS, WEB, TCP, 0), (KEY_BITS, 0, TCP, 80)}
    assert verdict(entries, EP, INGRESS, WEB, TCP, 80) == ("deny", 1)
    assert verdict(entries, EP, INGRESS, DB, TCP, 80) == ("allow", 2)


# --- diff -----------------------------------------------------------------------------------------


def apply(
    installed: Mapping[PolicyKey, PolicyValue], upserts: Entries, deletes: list[PolicyKey]
) -> Entries:
    out = dict(installed)
    out.update(upserts)
    for key in deletes:
        del out[key]
    return out


def test_diff_is_minimal() -> None:
    before = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1),
        PolicyEntry(peer=WEB, protocol=TCP, port=443, rule_id=2),
        PolicyEntry(peer=DB, protocol=UDP, port=53, rule_id=3),
    )
    after = compiled(
        PolicyEntry(peer=WEB, protocol=TCP, port=80, rule_id=1),  # unchanged
        PolicyEntry(peer=WEB, protocol=TCP, port=443, deny=True, rule_id=4),  # changed value
        PolicyEntry(peer=OTHER, protocol=TCP, port=22, rule_id=5),  # new; DB's entry is gone
    )
    upserts, deletes = diff(before, after)
    assert upserts == {
        PolicyKey(KEY_BITS, EP, INGRESS, WEB, TCP, 443): PolicyValue(4, True),
        PolicyKey(KEY_BITS, EP, INGRESS, OTHER, TCP, 22): PolicyValue(5, False),
    }
    assert deletes == [PolicyKey(KEY_BITS, EP, INGRESS, DB, UDP, 53)]
    assert apply(before, upserts, deletes) == after
    assert diff(after, after) == ({}, [])
    assert diff({}, after) == (after, [])
    assert diff(after, {}) == ({}, sorted(after))


def test_diff_random_round_trip() -> None:
    rng = random.Random(99)
    for _ in range(200):
        before = compile_endpoint(EP, random_policy(rng), PORTS)
        after = compile_endpoint(EP, random_policy(rng), PORTS)
        upserts, deletes = diff(before, after)
        assert apply(before, upserts, deletes) == after
        assert all(before.get(k) != v for k, v in upserts.items())
        assert not set(upserts) & set(deletes)
        assert len(upserts) + len(deletes) == len(
            {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        )


# --- randomized equivalence with the policy's own semantics ---------------------------------------

PEERS = [0, WEB, DB]
PROTOCOLS = [0, TCP, UDP, ICMP, SCTP]
NAMES = ["http", "dns", "missing"]
LOW, HIGH = 75, 90
SMALL_PORTS = [
    ContainerPort(port=80, protocol="TCP", name="http"),
    ContainerPort(port=84, protocol="UDP", name="dns"),
    ContainerPort(port=88, protocol="TCP", name="dns"),
]


def random_entry(rng: random.Random, low: int, high: int) -> PolicyEntry:
    rule_id = rng.randint(1, 30)
    deny = rng.random() < 0.35
    peer = rng.choice(PEERS)
    protocol = rng.choice(PROTOCOLS)
    roll = rng.random()
    if roll < 0.15:
        return PolicyEntry(peer=peer, protocol=protocol, deny=deny, rule_id=rule_id)
    if roll < 0.3:
        name = rng.choice(NAMES)
        return PolicyEntry(peer=peer, protocol=protocol, port_name=name, deny=deny, rule_id=rule_id)
    port = rng.randint(low, high)
    end = rng.choice([0, port, rng.randint(port, high)])
    return PolicyEntry(
        peer=peer, protocol=protocol, port=port, end_port=end, deny=deny, rule_id=rule_id
    )


def random_policy(rng: random.Random, low: int = LOW, high: int = HIGH) -> ResolvedPolicy:
    return policy(
        ingress=[random_entry(rng, low, high) for _ in range(rng.randint(0, 8))],
        egress=[random_entry(rng, low, high) for _ in range(rng.randint(0, 4))],
    )


def reference_matches(
    entry: PolicyEntry,
    ports: Sequence[ContainerPort],
    peer: int,
    proto: int,
    port: int,
    egress: bool = False,
) -> bool:
    """What an entry means, written from the PolicyEntry contract, independent of the trie.

    ``ports``: the endpoint's own for ingress; for egress, those every peer but 0 declares."""
    if entry.peer not in (0, peer):
        return False
    if entry.port_name and egress and peer == 0:
        return False  # the unknown identity declares no port
    if entry.port_name:
        numbers = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
        return any(
            cp.name == entry.port_name
            and numbers[cp.protocol.upper()] == proto
            and entry.protocol in (0, proto)
            and cp.port == port
            for cp in ports
        )
    if entry.port == 0:
        return entry.protocol in (0, proto)
    # a port without a protocol means TCP, UDP or SCTP
    if proto != entry.protocol and not (entry.protocol == 0 and proto in (TCP, UDP, SCTP)):
        return False
    return entry.port <= port <= max(entry.port, entry.end_port)


def reference_specificity(entry: PolicyEntry, port: int) -> int:
    """How much of (protocol, port) a matching entry names at ``port``, in key bits: a range
    counts as its largest aligned block around the port, the unit the datapath matches on."""
    if entry.port_name:
        return 128
    if entry.port == 0:
        return 112 if entry.protocol else 96
    last = max(entry.port, entry.end_port)
    for bits in range(17):
        start = port & ~((1 << (16 - bits)) - 1)
        if entry.port <= start and start + (1 << (16 - bits)) - 1 <= last:
            return 112 + bits
    raise AssertionError("port outside the entry")


def reference_verdict(
    entries: Sequence[PolicyEntry],
    ports: Sequence[ContainerPort],
    peer: int,
    proto: int,
    port: int,
    egress: bool = False,
) -> tuple[str, int]:
    """Deny if any deny matches, else allow if any allow does; the rule is the most specific
    match (DESIGN §4), the peer's before any identity's, then the lowest rule id."""
    matching = [e for e in entries if reference_matches(e, ports, peer, proto, port, egress)]
    for deny, name in ((True, "deny"), (False, "allow")):
        kind = [e for e in matching if e.deny is deny]
        if kind:
            best = max(
                kind,
                # an egress named port is the destination's: it lands in the peer's own slot
                key=lambda e: (
                    reference_specificity(e, port),
                    e.peer != 0 or (egress and bool(e.port_name)),
                    -e.rule_id,
                ),
            )
            return name, best.rule_id
    return "none", 0


def check_equivalent(
    resolved: ResolvedPolicy,
    ports: Sequence[ContainerPort],
    query_ports: Sequence[int],
    context: str,
) -> None:
    # every peer declares the same ports, so that egress named ports (the destination's)
    # resolve as the reference's do
    entries = compile_endpoint(EP, resolved, ports, {peer: ports for peer in (WEB, DB, OTHER)})
    # canonical keys: the fixed part fully matched, nothing set beyond the prefix
    for key, value in entries.items():
        assert key.prefixlen == SLOT_BITS or PROTO_BITS <= key.prefixlen <= KEY_BITS, context
        bits = int.from_bytes(key.pack()[4:], "big")
        assert bits & ((1 << (KEY_BITS - key.prefixlen)) - 1) == 0, context
        assert key.endpoint == EP and key.direction in (INGRESS, EGRESS), context
        assert isinstance(value, PolicyValue)
    for direction, policy_entries in ((INGRESS, resolved.ingress), (EGRESS, resolved.egress)):
        for peer in [*PEERS, OTHER]:
            for proto in [ICMP, TCP, UDP, SCTP, 47]:
                for port in query_ports:
                    got = verdict(entries, EP, direction, peer, proto, port)
                    want = reference_verdict(
                        policy_entries, ports, peer, proto, port, egress=direction == EGRESS
                    )
                    where = f"{context} dir={direction} peer={peer} proto={proto} port={port}"
                    assert got == want, f"{where}: {got} != {want}\n{policy_entries}"


@pytest.mark.parametrize("seed", range(8))
def test_random_policies_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    query_ports = [0, *range(LOW - 5, HIGH + 6), 65535]
    for n in range(40):
        check_equivalent(random_policy(rng), SMALL_PORTS, query_ports, f"seed={seed} n={n}")


def test_random_wide_ranges_match_reference() -> None:
    rng = random.Random(4242)
    for n in range(40):
        resolved = random_policy(rng, 1, 1100)
        bounds = {p for e in resolved.ingress + resolved.egress for p in (e.port, e.end_port)}
        query_ports = sorted(
            {q for p in bounds for q in (p - 1, p, p + 1) if 0 <= q <= 65535}
            | {rng.randint(0, 1200) for _ in range(30)}
        )
        check_equivalent(resolved, SMALL_PORTS, query_ports, f"wide n={n}")


@pytest.mark.parametrize(
    "key",
    [
        PolicyKey(SLOT_BITS, 7, INGRESS, 0, 0, 0),
        PolicyKey(PROTO_BITS + 3, 0xFFFFFFFF, EGRESS, 16777217, 6, 0xE000),
        PolicyKey(KEY_BITS, 12, EGRESS, 65535, 132, 65535),
    ],
)
def test_key_and_value_read_back_as_written(key: PolicyKey) -> None:
    """The map's keys and values decode with the layout they were encoded with (one module)."""
    assert PolicyKey.unpack(key.pack()) == key
    for value in (PolicyValue(0, False), PolicyValue(0xFFFFFFFF, True, proxy_port=15001)):
        assert PolicyValue.unpack(value.pack()) == value
