"""The ipcache guard (shared/ipcache_guard.py): a node's entries only inside its pod CIDR."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import msgspec

from shared import identities, subjects
from shared.ipcache_guard import REFUSED, IPCacheGuard, PodRange, judge
from shared.messages import IPCacheEntry, PodCIDR

N1, N2 = IPv4Network("10.9.1.0/24"), IPv4Network("10.9.2.0/24")
R1 = PodRange.of(N1)
PEER_POD = IPv4Address("10.9.2.5")


def enc(entry: IPCacheEntry | PodCIDR) -> bytes:
    return msgspec.json.encode(entry)


def refused(reason: str) -> float:
    return REFUSED.labels("test", reason)._value.get()


class Reader:
    """What a reader's handler gets: key -> the bytes it may believe."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}
        self.guard = IPCacheGuard("test", self.handle)

    def handle(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.seen.pop(key, None)
        else:
            self.seen[key] = value

    def cidr(self, node: str, cidr: IPv4Network | None) -> None:
        value = None if cidr is None else enc(PodCIDR(node=node, cidr=str(cidr)))
        self.guard.on_pod_cidr(subjects.pod_cidr_key(node), value)

    def put(self, node: str, address: IPv4Address, identity: int, named: str = "") -> str:
        key = subjects.ipcache_key(address, node)
        self.guard.on_ipcache(key, enc(IPCacheEntry(f"{address}/32", identity, named or node)))
        return key


def test_the_rules() -> None:
    peer = subjects.ipcache_key(PEER_POD, "n1")
    assert judge(peer, IPCacheEntry(f"{PEER_POD}/32", 300, "n1"), R1) == "outside_pod_cidr"
    assert judge(peer, IPCacheEntry(f"{PEER_POD}/32", 300, "n2"), R1) == "wrong_node"
    own = subjects.ipcache_key(IPv4Address("10.9.1.5"), "n1")
    assert judge(own, IPCacheEntry("10.9.1.5/32", 300, "n1"), R1) == ""
    assert judge(own, IPCacheEntry("10.9.1.5/32", identities.HEALTH, "n1"), R1) == ""
    assert judge(own, IPCacheEntry("10.9.1.5/32", 300, "n1"), None) == "pending"
    # the tunnel endpoint of n1's pods is the address recorded for n1, not another host's
    mine = IPCacheEntry("10.9.1.5/32", 300, "n1", "172.31.9.1")
    assert judge(own, mine, R1, "172.31.9.1") == ""
    assert judge(own, mine, R1, "172.31.9.2") == "wrong_host"
    assert judge(own, mine, R1) == ""  # none recorded: not judged
    for wide in ("10.9.1.0/24", "10.9.1.5", "10.9.1.5/31", "10.9.1/32", "010.9.1.5/32"):
        assert judge(own, IPCacheEntry(wide, 300, "n1"), R1) == "not_an_address", wide
    assert judge(own, IPCacheEntry("10.9.1.255/32", 300, "n1"), R1) == ""
    assert judge(own, IPCacheEntry("10.9.2.0/32", 300, "n1"), R1) == "outside_pod_cidr"
    for reserved in (identities.HOST, identities.WORLD, identities.REMOTE_NODE, 0):
        assert judge(own, IPCacheEntry("10.9.1.5/32", reserved, "n1"), R1) == "identity"
    assert judge(own, IPCacheEntry("10.9.1.5/32", identities.LOCAL_BASE + 1, "n1"), R1) == (
        "identity"
    )
    # a node named with a dot is one token in its keys
    dotted = subjects.ipcache_key(IPv4Address("10.9.1.5"), "n1.example")
    assert judge(dotted, IPCacheEntry("10.9.1.5/32", 300, "n1.example"), R1) == ""
    cidr = IPv4Network("10.0.0.0/8")
    policy = subjects.ipcache_key(cidr)
    assert judge(policy, IPCacheEntry(str(cidr), identities.LOCAL_BASE + 1), None) == ""
    assert judge(policy, IPCacheEntry(str(cidr), 300), None) == "policy_identity"


def test_a_node_cannot_shadow_a_peers_pod_and_is_counted_once() -> None:
    r = Reader()
    r.cidr("n1", N1)
    r.cidr("n2", N2)
    good = r.put("n2", PEER_POD, 300)
    before = refused("outside_pod_cidr")
    forged = r.put("n1", PEER_POD, 400)
    assert set(r.seen) == {good}
    assert refused("outside_pod_cidr") == before + 1
    r.cidr("n2", N2)  # the same CIDR again: nothing judged again, nothing counted
    r.cidr("n1", N1)
    assert refused("outside_pod_cidr") == before + 1
    r.guard.on_ipcache(forged, None)
    assert set(r.seen) == {good}


def test_entries_wait_for_their_nodes_pod_cidr_and_follow_it() -> None:
    r = Reader()
    pod = r.put("n2", PEER_POD, 300)
    assert r.seen == {}  # not known yet: held back, not refused
    r.cidr("n2", N2)
    assert set(r.seen) == {pod}
    before = refused("outside_pod_cidr")
    r.cidr("n2", IPv4Network("10.9.3.0/24"))  # the node was given another CIDR
    assert r.seen == {}
    assert refused("outside_pod_cidr") == before + 1
    r.cidr("n2", None)  # released: its entries wait again
    r.cidr("n2", N2)
    assert set(r.seen) == {pod}
    r.guard.on_ipcache(pod, None)
    assert r.seen == {}


def test_an_unreadable_entry_goes_to_the_reader_which_counts_it() -> None:
    r = Reader()
    r.guard.on_ipcache("n1.10.9.1.5", b"\xff junk")
    assert r.seen == {"n1.10.9.1.5": b"\xff junk"}
    r.guard.on_pod_cidr("n1", b"junk")  # a bad authority entry is no CIDR
    assert r.guard.pod_cidrs == {}
