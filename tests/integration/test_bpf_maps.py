"""The typed map wrapper over a real kernel map: a refusal is an OSError, values round-trip."""

from __future__ import annotations

import os

import pytest

from services.datapath import maps
from services.datapath.maps import BpfMap

pytestmark = pytest.mark.root

PROGRAM = b"""
BPF_HASH(tiny, u32, u32, 1);
int noop(void *ctx) { return 0; }
"""


def test_a_full_map_raises_oserror_and_keeps_what_it_had() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    from bcc import BPF

    bpf = BPF(text=PROGRAM)
    try:
        table: BpfMap[int, int] = BpfMap(
            bpf[b"tiny"], maps.pack_u32, maps.unpack_u32, maps.pack_u32, maps.unpack_u32
        )
        table[1] = 10
        assert table[1] == 10
        with pytest.raises(OSError):
            table[2] = 20  # full: the kernel refuses, whatever bcc raises for it
        with pytest.raises(OSError):
            table[3] = -1  # cannot even be encoded
        assert dict(table) == {1: 10}
        del table[1]
        assert len(table) == 0
        with pytest.raises(KeyError):
            del table[1]
    finally:
        bpf.cleanup()


CONNTRACK = b"""
struct ct_key { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 protocol; u8 scope; u16 icmp; };
struct ct_entry { u64 expires_ns; u64 packets; u64 bytes; u32 rule_id; u32 src_identity;
                  u32 dst_identity; u8 flags; u8 tcp_flags_seen; u16 pad; };
struct ct_quota { u32 entries; u32 refused; };
BPF_HASH(ct, struct ct_key, struct ct_entry, 64);
BPF_HASH(ct_quota, u32, struct ct_quota, 64);
struct lb_nat { u64 expires_ns; u32 backend_id; u32 frontend_id; u8 flags; u8 pad[7]; };
BPF_HASH(lb_nat, struct ct_key, struct lb_nat, 64);
BPF_HASH(lb_quota, u32, struct ct_quota, 64);
int noop(void *ctx) { return 0; }
"""


def test_the_sweep_recounts_each_endpoints_share_of_conntrack() -> None:
    # The datapath only counts an endpoint's answered connections up (bpf/maps.h ct_quota);
    # the agent's sweep sets each count to what the map holds, egress entries being their
    # sender's and ingress entries their receiver's, keeps the refusals, and forgets endpoints
    # that went.
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    import socket
    import time
    from ipaddress import IPv4Network

    from bcc import BPF

    from services.datapath.conntrack import QUOTA_REFUSED, Conntrack
    from shared import bpf_layouts

    bpf = BPF(text=CONNTRACK)
    try:
        ct, quota = bpf[b"ct"], bpf[b"ct_quota"]
        a, b, c, gone = "10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.9"
        expires = time.monotonic_ns() + 60 * 10**9

        def track(src: str, dst: str, sport: int, scope: int) -> None:
            key = bpf_layouts.CT_KEY.pack(
                socket.inet_aton(src), socket.inet_aton(dst), sport, 80, 17, scope, 0
            )
            value = bpf_layouts.CT_ENTRY.pack(expires, 1, 64, 0, 300, 301, 0, 0, 0)
            ct[ct.Key.from_buffer_copy(key)] = ct.Leaf.from_buffer_copy(value)

        for port in (1, 2, 3):
            track(a, c, port, maps.CT_EGRESS)  # a's own connections
        for port in (4, 5):
            track(c, a, port, maps.CT_INGRESS)  # connections to a
        track(b, c, 6, maps.CT_EGRESS)

        def key(address: str) -> object:
            return quota.Key(bpf_layouts.U32.unpack(socket.inet_aton(address))[0])

        quota[key(a)] = quota.Leaf(99, 5)  # counted up past what the map holds
        quota[key(b)] = quota.Leaf(0, 0)
        quota[key(gone)] = quota.Leaf(7, 1)
        Conntrack((ct, ct), IPv4Network("10.1.0.0/24"), quota).recount({a, b, c})
        held = {
            socket.inet_ntoa(bpf_layouts.U32.pack(k.value)): (v.entries, v.refused)
            for k, v in quota.items()
        }
        assert held == {a: (5, 5), b: (1, 0)}
        assert QUOTA_REFUSED._value.get() == 5
    finally:
        bpf.cleanup()


def test_the_sweep_recounts_each_clients_share_of_service_translations() -> None:
    # The same for the answered service translation records (bpf/lb.h lb_quota), keyed by the
    # client -> frontend tuple: each one is its client's.
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    import socket
    import time
    from ipaddress import IPv4Network

    from bcc import BPF

    from services.datapath.conntrack import LB_QUOTA_REFUSED, Conntrack
    from shared import bpf_layouts

    bpf = BPF(text=CONNTRACK)
    try:
        nat, quota = bpf[b"lb_nat"], bpf[b"lb_quota"]
        a, b, gone = "10.1.0.5", "10.1.0.6", "10.1.0.9"
        expires = time.monotonic_ns() + 60 * 10**9
        for client, sport in ((a, 1), (a, 2), (a, 3), (b, 4)):
            key = bpf_layouts.CT_KEY.pack(
                socket.inet_aton(client), socket.inet_aton("10.96.0.10"), sport, 53, 17, 1, 0
            )
            value = bpf_layouts.LB_NAT.pack(expires, 7, 1, 0)
            nat[nat.Key.from_buffer_copy(key)] = nat.Leaf.from_buffer_copy(value)

        def key(address: str) -> object:
            return quota.Key(bpf_layouts.U32.unpack(socket.inet_aton(address))[0])

        quota[key(a)] = quota.Leaf(64, 9)  # counted up; deletions and evictions unseen
        quota[key(b)] = quota.Leaf(0, 0)
        quota[key(gone)] = quota.Leaf(3, 2)
        Conntrack((), IPv4Network("10.1.0.0/24"), lb_quota=((nat,), quota)).recount({a, b})
        held = {
            socket.inet_ntoa(bpf_layouts.U32.pack(k.value)): (v.entries, v.refused)
            for k, v in quota.items()
        }
        assert held == {a: (3, 9), b: (1, 0)}
        assert LB_QUOTA_REFUSED._value.get() == 9
    finally:
        bpf.cleanup()


TRANSLATIONS = b"""
struct record { u64 expires_ns; u32 backend_id; u32 frontend_id; };
BPF_HASH(records, u32, struct record, 8);
int noop(void *ctx) { return 0; }
"""


def test_the_sweep_deletes_translation_records_whose_connection_is_over() -> None:
    # Service and node-port translation records (bpf/lb.h, nodeport.h) start with their expiry;
    # the datapath ignores an expired one, the sweep deletes it and keeps the live ones.
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    import time
    from ipaddress import IPv4Network

    from bcc import BPF

    from services.datapath.conntrack import Conntrack

    bpf = BPF(text=TRANSLATIONS)
    try:
        records = bpf[b"records"]
        now = time.monotonic_ns()
        records[records.Key(1)] = records.Leaf(now - 10**9, 7, 1)  # over a second ago
        records[records.Key(2)] = records.Leaf(now + 60 * 10**9, 8, 1)
        conntrack = Conntrack((), IPv4Network("10.1.0.0/24"), translations=(records,))
        assert conntrack.expire_translations() == 1
        assert [(k.value, v.backend_id) for k, v in records.items()] == [(2, 8)]
    finally:
        bpf.cleanup()
