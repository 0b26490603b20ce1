"""The agent's reconcilers on plain dicts: minimal writes, adoption, fail closed."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

import pytest

from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.local_ipam import NodeIPAM
from services.datapath.maps import (
    EP_ENFORCE_EGRESS,
    EP_ENFORCE_INGRESS,
    EP_POLICY_FAILED,
    EP_POLICY_PENDING,
    EndpointInfo,
    IPCacheValue,
)
from services.datapath.policy_sync import LocalEndpoint, PolicySync
from shared.errors import ResourceExhausted
from shared.identities import LOCAL_BASE
from shared.messages import ContainerPort, IPCacheEntry, PolicyEntry, ResolvedPolicy
from shared.policy_map import PolicyKey, PolicyValue

K = TypeVar("K")
V = TypeVar("V")
TCP = 6


class CountingMap(MutableMapping[K, V]):
    """A dict that counts writes and deletes, and can be made to fail like a full BPF map."""

    def __init__(self) -> None:
        self.data: dict[K, V] = {}
        self.writes = 0
        self.deletes = 0
        self.full = False

    def __getitem__(self, key: K) -> V:
        return self.data[key]

    def __setitem__(self, key: K, value: V) -> None:
        if self.full and key not in self.data:
            raise OSError(7, "Argument list too long")  # E2BIG, as a full map answers
        self.data[key] = value
        self.writes += 1

    def __delitem__(self, key: K) -> None:
        del self.data[key]
        self.deletes += 1

    def __iter__(self) -> Iterator[K]:
        return iter(list(self.data))

    def __len__(self) -> int:
        return len(self.data)


def policy(identity: int, *entries: PolicyEntry, ingress: bool = True) -> ResolvedPolicy:
    return ResolvedPolicy(
        identity=identity, revision=1, ingress_enforced=ingress, ingress=list(entries)
    )


@pytest.fixture
def maps() -> tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]]:
    endpoints: CountingMap[int, EndpointInfo] = CountingMap()
    for ifindex, identity in ((10, 300), (11, 300), (12, 400)):
        endpoints.data[ifindex] = EndpointInfo(identity, IPv4Address(f"10.0.0.{ifindex}"), 0)
    return CountingMap(), endpoints


def test_a_policy_change_touches_only_endpoints_of_that_identity(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    for ifindex, identity in ((10, 300), (11, 300), (12, 400)):
        sync.upsert_endpoint(LocalEndpoint(ifindex, identity))
    sync.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    assert policy_map.writes == 2  # one entry for each of the two endpoints with identity 300
    assert endpoint_map[10].flags == EP_ENFORCE_INGRESS
    # identity 400's entry has not arrived: pending (drops new connections), never unenforced
    assert endpoint_map[12].flags == EP_POLICY_PENDING
    before = policy_map.writes, policy_map.deletes
    sync.set_resolved(
        300,
        policy(
            300,
            PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1),
            PolicyEntry(peer=501, protocol=TCP, port=80, rule_id=2),
        ),
    )
    # one new entry per endpoint; the unchanged one is not rewritten
    assert (policy_map.writes - before[0], policy_map.deletes - before[1]) == (2, 0)
    sync.set_resolved(300, None)
    assert not policy_map.data
    assert endpoint_map[10].flags == EP_POLICY_PENDING  # its entry gone: pending, not open


def test_a_restarted_agent_adopts_the_map_and_fixes_only_the_difference(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    first = PolicySync(policy_map, endpoint_map)
    first.upsert_endpoint(LocalEndpoint(10, 300))
    first.upsert_endpoint(LocalEndpoint(12, 400))
    first.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    first.set_resolved(400, policy(400, PolicyEntry(peer=500, protocol=TCP, port=81, rule_id=2)))
    writes = policy_map.writes

    second = PolicySync(policy_map, endpoint_map)
    assert second.adopt() == 2
    second.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    second.upsert_endpoint(LocalEndpoint(10, 300))  # endpoint 12 is gone meanwhile
    assert policy_map.writes == writes  # nothing rewritten
    assert second.forget_strays() == 1
    assert {k.endpoint for k in policy_map.data} == {10}


def test_a_policy_that_cannot_be_installed_denies(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(10, 300))
    policy_map.full = True
    sync.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    assert endpoint_map[10].flags & EP_POLICY_FAILED
    assert 10 in sync.failed
    policy_map.full = False
    sync.retry_failed()
    assert endpoint_map[10].flags == EP_ENFORCE_INGRESS
    assert not sync.failed


def peers_of(policy_map: CountingMap[PolicyKey, PolicyValue], endpoint: int) -> set[int]:
    return {k.identity for k in policy_map.data if k.endpoint == endpoint}


def test_a_peer_set_change_recompiles_only_the_endpoints_naming_it(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    for ifindex, identity in ((10, 300), (11, 300), (12, 400)):
        sync.upsert_endpoint(LocalEndpoint(ifindex, identity))
    sync.set_peer_set(77, [500, 501])
    sync.set_peer_set(88, [600])
    sync.set_resolved(300, policy(300, PolicyEntry(selector=77, protocol=TCP, port=80, rule_id=1)))
    sync.set_resolved(400, policy(400, PolicyEntry(selector=88, protocol=TCP, port=80, rule_id=2)))
    assert peers_of(policy_map, 10) == peers_of(policy_map, 11) == {500, 501}
    assert peers_of(policy_map, 12) == {600}
    before = policy_map.writes, policy_map.deletes
    sync.set_peer_set(77, [501, 502])  # 500 leaves, 502 joins
    # per endpoint naming it: one write and one delete; endpoint 12 untouched
    assert (policy_map.writes - before[0], policy_map.deletes - before[1]) == (2, 2)
    assert peers_of(policy_map, 10) == {501, 502} and peers_of(policy_map, 12) == {600}


def test_egress_named_ports_follow_the_destinations_declarations(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(10, 300))
    sync.upsert_endpoint(LocalEndpoint(12, 400))
    egress = PolicyEntry(peer=500, protocol=TCP, port_name="http", rule_id=1)
    sync.set_resolved(300, ResolvedPolicy(identity=300, revision=1, egress=[egress]))
    sync.set_resolved(400, policy(400, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=2)))
    assert {k.endpoint for k in policy_map.data} == {12}  # 500 declares no "http" yet
    writes = policy_map.writes
    sync.set_peer_ports(500, [ContainerPort(port=8080, name="http")])
    # only the endpoint whose egress names a port is recompiled
    assert policy_map.writes == writes + 1
    assert [k.port for k in policy_map.data if k.endpoint == 10] == [8080]
    sync.set_peer_ports(500, [])
    assert {k.endpoint for k in policy_map.data} == {12}


def test_a_policy_naming_an_unknown_peer_set_keeps_the_old_one_or_denies(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(10, 300))
    sync.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    # the new policy arrives before its peer set: the old one stays
    sync.set_resolved(300, policy(300, PolicyEntry(selector=77, protocol=TCP, port=80, rule_id=1)))
    assert peers_of(policy_map, 10) == {500} and 10 in sync.waiting
    assert endpoint_map[10].flags == EP_ENFORCE_INGRESS
    sync.set_peer_set(77, [501])
    assert peers_of(policy_map, 10) == {501} and not sync.waiting
    # a new endpoint with nothing installed yet denies until the set is there
    sync.set_resolved(400, policy(400, PolicyEntry(selector=88, protocol=TCP, port=80, rule_id=2)))
    sync.upsert_endpoint(LocalEndpoint(12, 400))
    assert endpoint_map[12].flags & EP_POLICY_FAILED
    sync.set_peer_set(88, [600])
    assert endpoint_map[12].flags == EP_ENFORCE_INGRESS and peers_of(policy_map, 12) == {600}
    # an unreadable peer set may have held a deny rule's peers: deny
    sync.set_peer_set(88, None, unreadable=True)
    assert endpoint_map[12].flags & EP_POLICY_FAILED
    sync.set_peer_set(88, [600])
    assert endpoint_map[12].flags == EP_ENFORCE_INGRESS


def test_denies_go_in_before_allows_come_out(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    _, endpoint_map = maps
    seen: list[tuple[str, bool]] = []

    class Recording(CountingMap[PolicyKey, PolicyValue]):
        def __setitem__(self, key: PolicyKey, value: PolicyValue) -> None:
            seen.append(("write", value.deny))
            super().__setitem__(key, value)

    recording = Recording()
    sync = PolicySync(recording, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(10, 300))
    sync.set_resolved(300, policy(300, PolicyEntry(peer=500, protocol=TCP, port=80, rule_id=1)))
    seen.clear()
    sync.set_resolved(
        300,
        policy(
            300,
            PolicyEntry(peer=501, protocol=TCP, port=80, rule_id=2),
            PolicyEntry(peer=500, deny=True, rule_id=3),
        ),
    )
    assert seen[0] == ("write", True)


def test_egress_flag(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(12, 400))
    sync.set_resolved(
        400, ResolvedPolicy(identity=400, revision=1, egress_enforced=True, egress=[])
    )
    assert endpoint_map[12].flags == EP_ENFORCE_EGRESS
    assert not policy_map.data  # default deny: no entries at all


def entry(ip: str, identity: int) -> IPCacheEntry:
    return IPCacheEntry(cidr=f"{ip}/32", identity=identity, node="n1", host_ip="172.31.0.11")


def test_ipcache_start_up_rewrites_nothing_unchanged_and_prunes_the_rest() -> None:
    cache: CountingMap[IPv4Network, IPCacheValue] = CountingMap()
    stale = IPv4Network("10.0.0.99/32")
    cache.data[stale] = IPCacheValue(999)
    cache.data[IPv4Network("10.0.0.1/32")] = IPCacheValue(300, IPv4Address("172.31.0.11"))
    sync = IPCacheSync(cache)
    sync.apply("10.0.0.1", entry("10.0.0.1", 300))
    sync.apply("10.0.0.2", entry("10.0.0.2", 400))
    assert sync.prune() == 1
    assert (cache.writes, cache.deletes) == (1, 1)
    assert stale not in cache


def test_ipcache_events_are_single_writes_and_local_addresses_win() -> None:
    cache: CountingMap[IPv4Network, IPCacheValue] = CountingMap()
    sync = IPCacheSync(cache)
    host = IPv4Network("172.31.0.11/32")
    sync.set_local(host, IPCacheValue(1))
    sync.apply("172.31.0.11", entry("172.31.0.11", 300))  # the bucket says otherwise
    assert cache[host].identity == 1
    sync.apply("10.0.0.5", entry("10.0.0.5", 300))
    assert cache[IPv4Network("10.0.0.5/32")] == IPCacheValue(300, IPv4Address("172.31.0.11"))
    writes = cache.writes
    sync.apply("10.0.0.5", entry("10.0.0.5", 301))
    assert cache.writes == writes + 1
    sync.apply("10.0.0.5", None)
    assert IPv4Network("10.0.0.5/32") not in cache
    assert cache.deletes == 1
    cache.data[IPv4Network("10.0.0.77/32")] = IPCacheValue(5)  # left by an earlier agent
    assert sync.prune() == 1
    assert set(cache) == {host}


def test_a_local_address_removed_before_or_after_the_bucket_delete_is_gone() -> None:
    for bucket_first in (True, False):
        cache: CountingMap[IPv4Network, IPCacheValue] = CountingMap()
        sync = IPCacheSync(cache)
        net = IPv4Network("10.0.0.5/32")
        sync.set_local(net, IPCacheValue(300))
        sync.apply("10.0.0.5", entry("10.0.0.5", 300))
        if bucket_first:
            sync.apply("10.0.0.5", None)
            sync.remove_local(net)
        else:
            sync.remove_local(net)
            assert net in cache  # the bucket still says so, until its delete arrives
            sync.apply("10.0.0.5", None)
        assert net not in cache


def prefix(cidr: str, identity: int) -> IPCacheEntry:
    """What the policy service publishes for a network a policy names (key: the CIDR)."""
    return IPCacheEntry(cidr=cidr, identity=identity)


def test_a_policy_prefix_never_takes_an_owned_address_and_its_removal_restores_nothing_lost() -> (
    None
):
    # the regression of issue 14: an ipBlock.except naming another pod's /32 rewrote the pod's
    # entry into a CIDR identity without a tunnel endpoint, and deleting the policy deleted it
    cidr_id = LOCAL_BASE | 77
    for prefix_first in (True, False):
        cache: CountingMap[IPv4Network, IPCacheValue] = CountingMap()
        sync = IPCacheSync(cache)
        sync.apply("10.0.0.1", entry("10.0.0.1", 300))
        sync.apply("10.0.0.0/24", prefix("10.0.0.0/24", LOCAL_BASE | 1))
        before = dict(cache.data)
        if prefix_first:
            sync.apply("10.0.0.5/32", prefix("10.0.0.5/32", cidr_id))
            assert cache[IPv4Network("10.0.0.5/32")].identity == cidr_id  # nobody's, for now
            sync.apply("10.0.0.5", entry("10.0.0.5", 400))
        else:
            sync.apply("10.0.0.5", entry("10.0.0.5", 400))
            before = dict(cache.data)
            writes = cache.writes
            sync.apply("10.0.0.5/32", prefix("10.0.0.5/32", cidr_id))
            assert cache.writes == writes  # the map did not even see it
        owned = IPCacheValue(400, IPv4Address("172.31.0.11"))
        assert cache[IPv4Network("10.0.0.5/32")] == owned
        assert cache[IPv4Network("10.0.0.1/32")].identity == 300  # inside the /24: still its own
        assert sync.prune() == 0
        sync.apply("10.0.0.5/32", None)  # the policy goes
        assert cache[IPv4Network("10.0.0.5/32")] == owned
        if not prefix_first:
            assert cache.data == before
        sync.apply("10.0.0.5", None)  # then the pod: nothing of either is left
        assert IPv4Network("10.0.0.5/32") not in cache


def test_the_owner_leaving_hands_the_address_back_to_the_policy_prefix() -> None:
    cache: CountingMap[IPv4Network, IPCacheValue] = CountingMap()
    sync = IPCacheSync(cache)
    net = IPv4Network("10.0.0.5/32")
    sync.apply("10.0.0.5", entry("10.0.0.5", 400))
    sync.apply("10.0.0.5/32", prefix("10.0.0.5/32", LOCAL_BASE | 3))
    sync.apply("10.0.0.5", None)
    assert cache[net] == IPCacheValue(LOCAL_BASE | 3, IPv4Address(0))
    sync.set_local(net, IPCacheValue(1))  # and this node's own address beats both
    assert cache[net].identity == 1
    sync.apply("10.0.0.5", entry("10.0.0.5", 400))
    sync.remove_local(net)
    assert cache[net].identity == 400


def test_node_ipam_skips_the_router_and_does_not_reuse_at_once() -> None:
    ipam = NodeIPAM(IPv4Network("10.9.0.0/29"))  # hosts .1-.6; .1 is the router
    got = [ipam.allocate() for _ in range(5)]
    assert [str(a) for a in got] == [f"10.9.0.{i}" for i in range(2, 7)]
    with pytest.raises(ResourceExhausted):
        ipam.allocate()
    ipam.release(got[0])
    assert ipam.allocate() == got[0]
    ipam.release(got[1])
    ipam.release(got[2])
    assert ipam.allocate() == got[1]  # the next free one after the cursor, wrapping around


def test_a_reserved_address_outlives_the_release_of_a_stale_pod_that_held_it() -> None:
    # the health endpoint's address, once a pod's before a restart: the stale pod's clean-up
    # releases its address, which must not make the health address free for the next pod
    ipam = NodeIPAM(IPv4Network("10.9.0.0/29"))
    health = IPv4Address("10.9.0.2")
    ipam.reserve(health)
    ipam.release(health)
    assert ipam.allocate() == IPv4Address("10.9.0.3")
    assert health not in [ipam.allocate() for _ in range(3)]


def test_an_endpoint_is_pending_until_its_identitys_entry_arrives(
    maps: tuple[CountingMap[PolicyKey, PolicyValue], CountingMap[int, EndpointInfo]],
) -> None:
    policy_map, endpoint_map = maps
    sync = PolicySync(policy_map, endpoint_map)
    sync.upsert_endpoint(LocalEndpoint(12, 400))
    assert endpoint_map[12].flags == EP_POLICY_PENDING and not sync.has_policy(400)
    # "no policy selects it": an entry that enforces nothing
    sync.set_resolved(400, ResolvedPolicy(identity=400, revision=0))
    assert endpoint_map[12].flags == 0 and sync.has_policy(400)
    # the entry deleted (the identity gone): pending again, not unenforced
    sync.set_resolved(400, None)
    assert endpoint_map[12].flags == EP_POLICY_PENDING
    # reserved identities (the health endpoint) have no entry and are never pending
    endpoint_map.data[13] = EndpointInfo(4, IPv4Address("10.0.0.13"), 0)
    sync.upsert_endpoint(LocalEndpoint(13, 4))
    assert endpoint_map[13].flags == 0
