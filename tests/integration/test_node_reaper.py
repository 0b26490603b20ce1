"""A dead node's pods leave the bus after the grace (the identity service's NodeReaper), on a
real nats-server: its keys go, other nodes' keys stay."""

from __future__ import annotations

import time
from ipaddress import IPv4Address

import msgspec

from services.identity.nodes import NodeReaper
from shared import identities, subjects
from shared.bus import Bus, KVEvent
from shared.messages import Endpoint, IPCacheEntry, Node, NodeLiveness


def beat(name: str, heartbeat: float) -> KVEvent:
    node = Node(
        name=name,
        underlay_ip="198.51.100.12",
        pod_cidr="10.9.12.0/24",
        router_ip="10.9.12.1",
        heartbeat=heartbeat,
    )
    return KVEvent(key=name, value=msgspec.json.encode(node), revision=1)


async def test_a_dead_nodes_pods_are_released_after_the_grace(bus: Bus) -> None:
    ipcache_kv = await bus.kv(subjects.KV_IPCACHE)
    endpoints_kv = await bus.kv(subjects.KV_ENDPOINTS)
    # "b" and "bb" share a prefix, "c.example" has a dot (an FQDN node name)
    for owner, address in (("b", "10.9.12.5"), ("bb", "10.9.13.5"), ("c.example", "10.9.14.5")):
        ip = IPv4Address(address)
        entry = IPCacheEntry(cidr=f"{ip}/32", identity=300, node=owner, host_ip="198.51.100.1")
        await ipcache_kv.put(subjects.ipcache_key(ip, owner), msgspec.json.encode(entry))
        pod = Endpoint(
            namespace="default", name="p", node=owner, ip=address, identity=300, labels={}
        )
        await endpoints_kv.put(
            subjects.endpoint_key(owner, "default", "p"), msgspec.json.encode(pod)
        )
    policy_cidr = subjects.ipcache_key(IPv4Address("10.9.12.5"))  # a policy's, naming b's pod
    await ipcache_kv.put(
        policy_cidr,
        msgspec.json.encode(IPCacheEntry(cidr="10.9.12.5/32", identity=identities.LOCAL_BASE + 1)),
    )

    liveness_kv = await bus.kv(subjects.KV_LIVENESS)
    reaper = NodeReaper(endpoints_kv, ipcache_kv, liveness_kv, expiry=15.0, grace=60.0)
    now = time.time()
    # members first seen then and silent since
    reaper.on_node(beat("b", now), now - 20)  # dead, within the grace
    reaper.on_node(beat("bb", now), now - 80)  # dead past it
    reaper.on_node(beat("c.example", now), now - 80)
    await reaper.tick(now)
    assert reaper.released == {"bb", "c.example"}
    verdicts = {
        key: msgspec.json.decode(raw, type=NodeLiveness)
        for key, raw in (await Bus.snapshot(liveness_kv)).items()
    }
    assert {key: v.alive for key, v in verdicts.items()} == {
        "b": False,
        "bb": False,
        "c_example": False,
    }
    await reaper.reap(now + 60)
    await reaper.reap(now + 60)  # once only: nothing left to do
    assert reaper.released == {"b", "bb", "c.example"}
    assert set(await Bus.snapshot(ipcache_kv)) == {policy_cidr}
    assert await Bus.snapshot(endpoints_kv) == {}

    # a node that beats again is alive; released again only once it is dead past the grace
    await reaper.on_heartbeat("b", now)
    assert reaper.due(now) == [] and "b" not in reaper.released
    assert reaper.due(now + 76) == ["b"]
    # a graceful leave (its entry deleted): its verdict goes too
    reaper.on_node(KVEvent(key="b", value=None, revision=2))
    await reaper.tick(now)
    assert set(await Bus.snapshot(liveness_kv)) == {"bb", "c_example"}


async def test_who_holds_its_underlay_address(bus: Bus) -> None:
    """The failure detector's word on a node's underlay address (the identity service refuses
    another node an address whose holder is alive): every node is alive until the nodes
    snapshot is in; then alive within expiry + grace, dead after, gone when it left."""
    reaper = NodeReaper(
        await bus.kv(subjects.KV_ENDPOINTS),
        await bus.kv(subjects.KV_IPCACHE),
        await bus.kv(subjects.KV_LIVENESS),
        expiry=15,
        grace=60,
    )
    now = time.time()
    # first seen then, never heard since
    reaper.on_node(beat("b", now), now - 70)
    reaper.on_node(beat("c", now), now - 80)
    assert reaper.alive("b", now) and reaper.alive("c", now) and reaper.alive("x", now)
    reaper.on_synced()
    assert reaper.alive("b", now) and not reaper.alive("c", now) and not reaper.alive("x", now)
    assert reaper.seen("c") and not reaper.seen("x")
    reaper.on_node(KVEvent(key="b", value=None, revision=2))  # a graceful leave
    assert not reaper.alive("b", now) and reaper.seen("b")
    reaper.on_node(beat("b", now), now)  # back
    assert reaper.alive("b", now)


async def test_the_detector_judges_nothing_while_it_is_away_from_nats(bus: Bus) -> None:
    """NATS away longer than the expiry: the silence is the detector's, not the nodes'. It
    writes no verdict then, and counts every node from when it is back."""
    connected = True
    reaper = NodeReaper(
        await bus.kv(subjects.KV_ENDPOINTS),
        await bus.kv(subjects.KV_IPCACHE),
        await bus.kv(subjects.KV_LIVENESS),
        expiry=15.0,
        grace=60.0,
        connected=lambda: connected,
    )
    now = time.time()
    await reaper.on_heartbeat("away", now)
    connected = False
    await reaper.tick(now + 30)
    assert reaper.verdicts == {"away": True}
    connected = True
    await reaper.tick(now + 31)  # back: "away" counts from now
    assert reaper.verdicts == {"away": True}
    await reaper.tick(now + 45)
    assert reaper.verdicts == {"away": True}
    await reaper.tick(now + 47)  # silent 16 s since the detector was back: dead
    assert reaper.verdicts == {"away": False}
    assert reaper.due(now + 31 + 76) == ["away"]
