"""The lb service's pure parts: Maglev tables, Service/EndpointSlice parsing, map diffs."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections import Counter
from typing import Any

import pytest

from services.datapath import lb_sync
from services.datapath.lb_sync import LBSync
from services.lb.model import parse_api, parse_endpoint_slice, parse_service
from shared import bpf_layouts, maglev
from shared.errors import InvalidArgument
from shared.messages import LBBackend, LBFrontend, LBService


def test_maglev_is_balanced_deterministic_and_minimally_disrupted() -> None:
    table = maglev.table([7, 3, 5], 16381, seed=42)
    assert table == maglev.table([5, 7, 3], 16381, seed=42)  # order does not matter
    counts = Counter(table)
    assert set(counts) == {3, 5, 7}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert maglev.table([3, 5, 7], 16381, seed=43) != table  # the seed matters
    grown = maglev.table([3, 5, 7, 9], 16381, seed=42)
    moved = sum(1 for a, b in zip(table, grown, strict=True) if a != b and b != 9)
    assert moved < 16381 * 0.05  # adding a backend moves slots mostly to the new one
    assert maglev.table([], 17) == []
    assert maglev.table([4], 17) == [4] * 17
    assert maglev.is_prime(16381) and not maglev.is_prime(16383)


def test_maglev_table_size_follows_the_backend_count() -> None:
    # 100 slots per backend x min(backends, 10), backends rounded up to a power of two
    sizes = {n: maglev.size_for(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 1000)}
    assert sizes == {
        0: 101, 1: 101, 2: 401, 3: 1601, 4: 1601, 5: 6421, 8: 6421,
        9: 16001, 16: 16001, 17: 16381, 1000: 16381,
    }  # fmt: skip
    assert maglev.size_for(3, maximum=1009) == 1009  # capped by the configured maximum
    assert all(maglev.is_prime(size) for size in sizes.values())
    for n in range(2, 21):  # every backend's share within 2 % of even
        counts = Counter(maglev.table(list(range(100, 100 + n)), maglev.size_for(n), seed=n))
        even = maglev.size_for(n) / n
        assert max(abs(c - even) / even for c in counts.values()) <= 0.02, n
    # one of 10 backends removed: at most 1 % of the others' slots move
    for seed in range(4):
        ids = [1000 + 37 * i + seed for i in range(10)]
        size = maglev.size_for(10)
        before = maglev.table(ids, size, seed)
        after = maglev.table(ids[:3] + ids[4:], size, seed)
        extra = sum(1 for a, b in zip(before, after, strict=True) if a != ids[3] and a != b)
        assert extra / size <= 0.01, (seed, extra / size)


def test_maglev_compiled_fill_gives_the_python_tables() -> None:
    # make setup builds the library: a checkout where it did not load would fall back silently
    assert maglev.COMPILED, f"{maglev.LIBRARY} not loaded (make setup builds it)"
    cases = [([1, 2], 101, 0), ([5, 9], 401, 7), ([2**31 - 1, 3, 77], 1601, 2**32 - 1)]
    cases += [(list(range(10, 10 + n)), maglev.size_for(n), n) for n in (4, 9, 17, 64)]
    cases += [([100 + 3 * i for i in range(13)], 13, 5)]  # as many backends as slots
    for ids, size, seed in cases:
        assert maglev.table(ids, size, seed) == maglev.python_table(sorted(ids), size, seed), (
            ids[:3],
            size,
        )


def svc(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec}


def test_service_parses_ports_named_target_affinity_and_node_port() -> None:
    parsed = parse_service(
        svc(
            type="NodePort",
            selector={"app": "web"},
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}},
            ports=[
                {"name": "http", "port": 80, "targetPort": "http-alt"},
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
            ],
        )
    )
    assert parsed.selector == {"app": "web"}
    assert parsed.affinity_timeout == 30
    assert parsed.ports[0].target_port == "http-alt"
    assert parsed.ports[1].target_port == 53 and parsed.ports[1].node_port == 30053
    assert parsed.node_port and parsed.cluster_ip == ""


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.ports"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 70000}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 80}], "clusterIP": "10.1.2.300"}, "spec.clusterIP"),
        ({"ports": [{"port": 80}], "clusterIP": "192.168.0.1"}, "spec.clusterIP"),
        ({"ports": [{"port": 80, "protocol": "HTTP"}]}, "spec.ports[0].protocol"),
        ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, "spec.ports[1].name"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}, "spec.ports[1].port"),
        ({"ports": [{"port": 80, "nodePort": 30000}]}, "spec.ports[0].nodePort"),
        ({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}, "spec.ports[0].nodePort"),
        ({"ports": [{"port": 80}], "sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
        ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, "spec.ports[0].targetPort"),
    ],
)
def test_bad_services_name_the_field(spec: dict[str, Any], field: str) -> None:
    from ipaddress import IPv4Network

    with pytest.raises(InvalidArgument) as caught:
        parse_service(svc(**spec), IPv4Network("10.96.0.0/12"))
    assert caught.value.field == field


def test_endpoint_slice_and_api_mode() -> None:
    parsed = parse_endpoint_slice(
        {
            "metadata": {"name": "s1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "terminating": True}},
            ],
        }
    )
    assert parsed.service == "web" and parsed.ports[0].port == 8080
    assert [(e.ready, e.terminating) for e in parsed.endpoints] == [(True, False), (False, True)]
    with pytest.raises(InvalidArgument) as caught:
        parse_endpoint_slice({"metadata": {"name": "s"}, "addressType": "IPv4"})
    assert caught.value.field == "metadata.labels.kubernetes.io/service-name"
    api = parse_api("default", "dns", ["10.1.0.1:53/udp"], ["10.0.0.1:5353"], 0)
    assert api.frontends[0].protocol == "UDP" and api.backends == (("10.0.0.1", 5353),)
    for frontends, backends, field in (
        ([], [], "frontends"),
        (["10.1.0.1"], [], "frontends[0]"),
        (["10.1.0.1:80/TCP", "10.1.0.1:80/TCP"], [], "frontends"),
        (["10.1.0.1:80"], ["10.0.0.1:99999"], "backends[0]"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            parse_api("default", "x", frontends, backends, 0)
        assert caught.value.field == field


def record(backends: list[tuple[int, str, bool]], algorithm: str = "random") -> LBService:
    return LBService(
        namespace="default",
        name="web",
        algorithm=algorithm,
        maglev_size=131,  # two chunks of lb_maglev: 112 and 19 slots
        maglev_seed=1,
        frontends=[
            LBFrontend(
                id=9,
                ip="10.96.0.10",
                port=80,
                protocol="TCP",
                backends=[
                    LBBackend(id=i, ip=ip, port=8080, terminating=t) for i, ip, t in backends
                ],
            )
        ],
    )


def maglev_in(tables: dict[str, dict[bytes, bytes]], fid: int, size: int) -> list[int]:
    """Frontend ``fid``'s Maglev table as lb_maglev holds it (slot -> backend id)."""
    slots: dict[int, int] = {}
    for k, v in tables["lb_maglev"].items():
        key_fid, chunk = bpf_layouts.LB_SLOT_KEY.unpack(k)
        if key_fid == fid:
            for i, b in enumerate(bpf_layouts.LB_MAGLEV_CHUNK.unpack(v)):
                slots[chunk * bpf_layouts.LB_MAGLEV_CHUNK_SLOTS + i] = b
    return [slots[i] for i in range(size)]


def test_lb_sync_writes_only_the_difference() -> None:
    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in lb_sync.MAP_NAMES}
    sync = LBSync(tables)
    ops = lb_sync.Ops()
    sync._apply("default.web", record([(1, "10.0.0.1", False), (2, "10.0.0.2", False)]), ops)
    sync.write(ops)
    assert len(tables["lb_services"]) == 1 and len(tables["lb_slots"]) == 2
    assert len(tables["lb_backends"]) == 2
    # one backend goes terminating: it keeps its backend entry, loses its slot
    ops = lb_sync.Ops()
    sync._apply("default.web", record([(1, "10.0.0.1", False), (2, "10.0.0.2", True)]), ops)
    assert sum(len(u) for u in ops.updates.values()) == 2  # service count, backend flags
    assert sum(len(d) for d in ops.deletes.values()) == 1  # slot 1
    sync.write(ops)
    assert len(tables["lb_slots"]) == 1 and len(tables["lb_backends"]) == 2
    # Maglev: the full table once, then only the slots that move
    ops = lb_sync.Ops()
    sync._apply("default.web", record([(1, "10.0.0.1", False)], "maglev"), ops)
    sync.write(ops)
    assert len(tables["lb_maglev"]) == 2 and not tables["lb_slots"]
    ops = lb_sync.Ops()
    sync._apply(
        "default.web", record([(1, "10.0.0.1", False), (3, "10.0.0.3", False)], "maglev"), ops
    )
    sync.write(ops)
    assert maglev_in(tables, 9, 131) == maglev.table([1, 3], 131, 1)
    (row,) = sync.dump()
    assert (row["table_size"], row["maglev_entries"]) == (131, 131)
    # a backend added: only the chunks in which a slot moved are written
    ops = lb_sync.Ops()
    three = [(1, "10.0.0.1", False), (3, "10.0.0.3", False), (4, "10.0.0.4", False)]
    sync._apply("default.web", record(three, "maglev"), ops)
    before, after = maglev.table([1, 3], 131, 1), maglev.table([1, 3, 4], 131, 1)
    moved = {
        slot // bpf_layouts.LB_MAGLEV_CHUNK_SLOTS
        for slot in range(131)
        if before[slot] != after[slot]
    }
    assert len(ops.updates["lb_maglev"]) == len(moved)
    sync.write(ops)
    assert maglev_in(tables, 9, 131) == after
    # gone: nothing left behind
    ops = lb_sync.Ops()
    sync._apply("default.web", None, ops)
    sync.write(ops)
    assert all(not t for t in tables.values()), tables


async def test_lb_sync_batches_a_burst_into_one_flush() -> None:
    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in lb_sync.MAP_NAMES}
    sync = LBSync(tables)
    import msgspec

    from shared.bus import KVEvent

    for i in range(100):
        rec = msgspec.structs.replace(record([(i + 1, "10.0.0.1", False)]), name=f"s{i}")
        rec.frontends[0].id = 1000 + i
        rec.frontends[0].port = 1000 + i
        sync.on_record(KVEvent(key=f"default.s{i}", value=msgspec.json.encode(rec), revision=i))
    assert not tables["lb_services"]  # nothing until the loop runs the flush
    await asyncio.sleep(0)
    assert len(tables["lb_services"]) == 100
    sync.on_record(KVEvent(key="default.s0", value=b"{not json", revision=101))
    await asyncio.sleep(0)
    assert len(tables["lb_services"]) == 99  # an unreadable record takes its service out


async def test_lb_sync_flushes_a_large_burst_a_chunk_per_loop_turn() -> None:
    """A burst larger than a chunk goes in over several turns of the loop (the agent's other
    work runs between them), the maps holding whole services after each, and a service
    changed again while it waits is installed as its newest record."""
    import msgspec

    from shared.bus import KVEvent

    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in lb_sync.MAP_NAMES}
    sync = LBSync(tables)
    n = 2 * lb_sync.FLUSH_CHUNK + 10

    def rec(i: int, backends: list[int]) -> bytes:
        r = record([(b, f"10.1.{b // 250}.{b % 250 + 1}", False) for b in backends], "maglev")
        r = msgspec.structs.replace(r, name=f"s{i}")
        r.frontends[0].id, r.frontends[0].port = 1000 + i, 1000 + i
        return msgspec.json.encode(r)

    for i in range(n):
        sync.on_record(
            KVEvent(key=f"default.s{i}", value=rec(i, [2 * i + 1, 2 * i + 2]), revision=i)
        )
    assert not gc.isenabled()  # the collector paused through the burst
    turns = 0
    other_work_ran = []
    while sync.pending:
        asyncio.get_running_loop().call_soon(other_work_ran.append, turns)
        await asyncio.sleep(0)
        turns += 1
        installed = len(tables["lb_services"])
        assert installed % lb_sync.FLUSH_CHUNK == 0 or installed == n
        # every installed service has its whole table and both backends
        assert len(tables["lb_maglev"]) == installed * -(-131 // lb_sync.CHUNK_SLOTS)
        assert len(tables["lb_backends"]) == 2 * installed
        if turns == 1:  # the last service changes before its chunk's turn
            last = n - 1
            sync.on_record(
                KVEvent(key=f"default.s{last}", value=rec(last, [9001, 9002]), revision=n)
            )
    assert turns == 3 and other_work_ran == [0, 1, 2]
    assert len(tables["lb_services"]) == n
    assert maglev_in(tables, 1000 + n - 1, 131) == maglev.table([9001, 9002], 131, 1)
    assert lb_sync._U32.pack(2 * n) not in tables["lb_backends"]  # its first backends never went in
    assert gc.isenabled()  # on again once the burst is in


def test_lb_keys_and_backends_are_packed_in_the_maps_layouts() -> None:
    """service_key and backend_value pack the port as a network-order number: the bytes of
    bpf_layouts' LB_SERVICE_KEY and LB_BACKEND (the port as two big-endian bytes)."""
    for ip, port in (("10.96.0.10", 80), ("0.0.0.0", 30080), ("255.1.2.3", 65535)):
        port_bytes = port.to_bytes(2, "big")
        address = socket.inet_aton(ip)
        assert lb_sync.service_key(ip, port, 17) == bpf_layouts.LB_SERVICE_KEY.pack(
            address, port_bytes, 17
        )
        for terminating in (False, True):
            flags = lb_sync.TERMINATING if terminating else 0
            assert lb_sync.backend_value(ip, port, terminating) == bpf_layouts.LB_BACKEND.pack(
                address, port_bytes, flags
            )


def test_lb_sync_prunes_what_a_previous_agent_left() -> None:
    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in lb_sync.MAP_NAMES}
    stale = lb_sync.service_key("10.96.9.9", 80, 6)
    tables["lb_services"][stale] = b"\0" * 20  # a service deleted while no agent ran
    sync = LBSync(tables)
    ops = lb_sync.Ops()
    sync._apply("default.web", record([(1, "10.0.0.1", False)]), ops)
    sync.write(ops)
    assert sync.prune() == 1
    assert list(tables["lb_services"]) == [lb_sync.service_key("10.96.0.10", 80, 6)]


async def test_node_ports_take_underlay_addresses_from_the_identity_service() -> None:
    """A node-port frontend is installed on each member of ``nodes`` at the address the
    identity service recorded for it (pod-cidrs), not at the one its own record claims: a
    compromised node naming 10.0.0.99 must not have every node load-balance traffic to it."""
    import msgspec

    from shared.bus import KVEvent
    from shared.messages import Node

    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in lb_sync.MAP_NAMES}
    underlays: dict[str, str] = {"node-a": "192.168.50.1"}  # the ipcache guard's map
    sync = LBSync(tables, underlays)
    nodeport = record([(1, "10.0.0.1", False)])
    nodeport.frontends[0].ip, nodeport.frontends[0].port = "0.0.0.0", 30080
    nodeport.frontends[0].node_port = True
    sync.on_record(KVEvent(key="default.web", value=msgspec.json.encode(nodeport), revision=1))

    def node(name: str, claimed: str) -> bytes:
        return msgspec.json.encode(Node(name, claimed, "10.200.0.0/24", "10.200.0.1", 0.0))

    def frontends() -> set[bytes]:
        return set(tables["lb_services"])

    def at(ip: str) -> bytes:
        return lb_sync.service_key(ip, 30080, 6)

    sync.on_node(KVEvent(key="node-a", value=node("node-a", "192.168.50.1"), revision=2))
    # node-b claims an address no one recorded for it: nothing until its CIDR's address is in
    sync.on_node(KVEvent(key="node-b", value=node("node-b", "10.0.0.99"), revision=3))
    await asyncio.sleep(0)
    assert frontends() == {at("192.168.50.1")}
    underlays["node-b"] = "192.168.50.2"
    sync.on_underlays()
    await asyncio.sleep(0)
    assert frontends() == {at("192.168.50.1"), at("192.168.50.2")}
    # a record rewritten with another node's address changes nothing
    sync.on_node(KVEvent(key="node-b", value=node("node-b", "192.168.50.1"), revision=4))
    await asyncio.sleep(0)
    assert frontends() == {at("192.168.50.1"), at("192.168.50.2")}
    # a node that leaves takes its frontend with it; one whose address is taken away too
    sync.on_node(KVEvent(key="node-b", value=None, revision=5))
    await asyncio.sleep(0)
    assert frontends() == {at("192.168.50.1")}
    del underlays["node-a"]
    sync.on_underlays()
    await asyncio.sleep(0)
    assert not frontends()
