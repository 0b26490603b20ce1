"""End-to-end check that the BPF toolchain installed by scripts/setup.sh works.

Compiles a tiny bcc-style tc classifier (with a BPF_HASH and a
BPF_RINGBUF_OUTPUT), loads it as BPF.SCHED_CLS, attaches it with a clsact
qdisc in direct-action mode to one end of a veth pair that joins two network
namespaces created by this test, pings across the pair and checks that the
program counted the ICMP echo requests in the hash map and emitted ring buffer
events.

All traffic stays inside the two namespaces this test creates (10.250.x.x/30);
the namespaces (and with them the veth pair) are always deleted afterwards.

Needs root, bcc (Debian's python3-bpfcc linked into the venv by
scripts/setup.sh), kernel headers at /lib/modules/$(uname -r)/build, and
iproute2.
"""

from __future__ import annotations

import ctypes as ct
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="BPF toolchain test needs root (loads BPF programs, creates netns/veth)",
    ),
]

SETUP_HINT = "run `sudo scripts/setup.sh` to install and configure the BPF toolchain"

# Keys of the hash map shared between the program and Python.
KEY_ALL = 1  # every packet seen on ingress (created by the program)
KEY_ECHO = 2  # ICMP echo requests (pre-seeded from Python, incremented by the program)
SEED = 1000
N_PINGS = 3

BPF_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>

struct event_t {
    u32 saddr;
    u32 daddr;
    u32 ifindex;
    u32 len;
};

BPF_HASH(counts, u32, u64, 16);
BPF_RINGBUF_OUTPUT(events, 8);

int cls(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 key = KEY_ALL;
    u64 zero = 0;
    u64 *val = counts.lookup_or_try_init(&key, &zero);
    if (val)
        __sync_fetch_and_add(val, 1);

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return TC_ACT_OK;
    if (ip->ihl != 5 || ip->protocol != IPPROTO_ICMP)
        return TC_ACT_OK;
    struct icmphdr *icmp = (void *)(ip + 1);
    if ((void *)(icmp + 1) > data_end)
        return TC_ACT_OK;
    if (icmp->type != ICMP_ECHO)
        return TC_ACT_OK;

    key = KEY_ECHO;
    val = counts.lookup(&key);  /* seeded from Python */
    if (val)
        __sync_fetch_and_add(val, 1);

    struct event_t *ev = events.ringbuf_reserve(sizeof(struct event_t));
    if (ev) {
        ev->saddr = ip->saddr;
        ev->daddr = ip->daddr;
        ev->ifindex = skb->ifindex;
        ev->len = skb->len;
        events.ringbuf_submit(ev, 0);
    }
    return TC_ACT_OK;
}
"""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"cannot import bcc ({exc}); {SETUP_HINT}")
    return bcc


@dataclass
class VethPair:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str
    ifindex_b: int


def _netns_list() -> set[str]:
    out = _run("ip", "netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def veth_pair() -> Iterator[VethPair]:
    """Two fresh namespaces joined by a veth pair, addressed 10.250.N.1/.2 /30."""
    if shutil.which("ip") is None:
        pytest.fail(f"`ip` (iproute2) not found; {SETUP_HINT}")
    tag = secrets.token_hex(4)
    octet = secrets.randbelow(64) * 4  # a /30 boundary
    pair = VethPair(
        ns_a=f"mbtest-{tag}-a",
        ns_b=f"mbtest-{tag}-b",
        if_a=f"mbt{tag}a",  # <= 15 chars (IFNAMSIZ)
        if_b=f"mbt{tag}b",
        ip_a=f"10.250.{octet}.1",
        ip_b=f"10.250.{octet}.2",
        ifindex_b=0,
    )
    created: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            _run("ip", "netns", "add", ns)
            created.append(ns)
        # Create the pair directly inside the namespaces: nothing ever lives
        # in (or is addressed in) the root namespace.
        _run(
            "ip", "-n", pair.ns_a, "link", "add", pair.if_a, "type", "veth",
            "peer", "name", pair.if_b, "netns", pair.ns_b,
        )  # fmt: skip
        for ns, ifname, addr in (
            (pair.ns_a, pair.if_a, pair.ip_a),
            (pair.ns_b, pair.if_b, pair.ip_b),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _run("ip", "-n", ns, "link", "set", ifname, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        out = _run("ip", "-n", pair.ns_b, "-o", "link", "show", "dev", pair.if_b).stdout
        pair.ifindex_b = int(out.split(":", 1)[0])
        yield pair
    finally:
        for ns in reversed(created):
            # Deleting a namespace destroys the veth end inside it (and so the
            # whole pair) along with the clsact qdisc and filter.
            _run("ip", "netns", "del", ns, check=False)
        leftovers = _netns_list() & {pair.ns_a, pair.ns_b}
        assert not leftovers, f"namespaces left behind: {leftovers}"


def _attach_with_tc(prog_fd: int, pair: VethPair, pin_path: Path) -> None:
    """Attach via the `tc` binary: pin the program, load it with object-pinned.

    `nsenter --net` (unlike `ip netns exec`) keeps the caller's mount
    namespace, so the bpffs at /sys/fs/bpf stays visible to tc.
    """
    from bcc.libbcc import lib

    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_obj_pin.restype = ct.c_int
    ret = lib.bpf_obj_pin(prog_fd, str(pin_path).encode())
    if ret != 0:
        pytest.fail(f"bpf_obj_pin({pin_path}) returned {ret}; is bpffs mounted? {SETUP_HINT}")
    netns = f"--net=/run/netns/{pair.ns_b}"
    _run("nsenter", netns, "tc", "qdisc", "add", "dev", pair.if_b, "clsact")
    _run(
        "nsenter", netns, "tc", "filter", "add", "dev", pair.if_b, "ingress",
        "bpf", "direct-action", "object-pinned", str(pin_path),
    )  # fmt: skip
    shown = _run("nsenter", netns, "tc", "filter", "show", "dev", pair.if_b, "ingress").stdout
    assert "direct-action" in shown, shown


def _attach_with_pyroute2(prog_fd: int, prog_name: str, pair: VethPair) -> None:
    pyroute2 = pytest.importorskip("pyroute2")
    with pyroute2.IPRoute(netns=pair.ns_b) as ipr:
        idx = ipr.link_lookup(ifname=pair.if_b)[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc(
            "add-filter", "bpf", idx, ":1", fd=prog_fd, name=prog_name,
            parent="ffff:fff2", classid=1, direct_action=True,
        )  # fmt: skip
    shown = _run(
        "ip", "netns", "exec", pair.ns_b, "tc", "filter", "show", "dev", pair.if_b, "ingress"
    ).stdout
    assert "direct-action" in shown, shown


_PY_PING = r"""
import os, socket, struct, sys, time
dst, count = sys.argv[1], int(sys.argv[2])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
ident, got = os.getpid() & 0xffff, 0
for seq in range(1, count + 1):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"membrane"
    pkt = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s.sendto(pkt, (dst, 0))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        data = s.recv(1024)
        t, _, _, i, q = struct.unpack("!BBHHH", data[20:28])
        if t == 0 and i == ident and q == seq:
            got += 1
            break
sys.exit(0 if got == count else 1)
"""


def _ping(pair: VethPair) -> None:
    """N_PINGS echo requests from ns_a to ns_b (both addresses inside our namespaces)."""
    if shutil.which("ping"):
        cmd = ["ping", "-n", "-q", "-c", str(N_PINGS), "-i", "0.2", "-W", "2", pair.ip_b]
    else:  # iputils-ping missing: send the echo requests ourselves
        cmd = [sys.executable, "-c", _PY_PING, pair.ip_b, str(N_PINGS)]
    _run("ip", "netns", "exec", pair.ns_a, *cmd)


@pytest.mark.parametrize("attach", ["tc", "pyroute2"])
def test_tc_classifier_counts_packets(attach: str, veth_pair: VethPair) -> None:
    bcc = _import_bcc()
    BPF = bcc.BPF

    t0 = time.monotonic()
    try:
        b = BPF(text=BPF_SRC.encode(), cflags=[f"-DKEY_ALL={KEY_ALL}", f"-DKEY_ECHO={KEY_ECHO}"])
    except Exception as exc:
        pytest.fail(
            f"bcc failed to compile the classifier ({exc}); kernel headers at "
            f"/lib/modules/{os.uname().release}/build? {SETUP_HINT}"
        )
    fn = b.load_func(b"cls", BPF.SCHED_CLS)
    assert fn.fd >= 0
    compile_s = time.monotonic() - t0

    counts = b[b"counts"]
    # Python -> map update and read-back.
    counts[counts.Key(KEY_ECHO)] = counts.Leaf(SEED)
    assert counts[counts.Key(KEY_ECHO)].value == SEED

    events: list[tuple[str, str, int]] = []

    def on_event(_ctx: object, data: int, _size: int) -> int:
        ev = b[b"events"].event(data)
        events.append(
            (
                socket.inet_ntoa(struct.pack("I", ev.saddr)),
                socket.inet_ntoa(struct.pack("I", ev.daddr)),
                ev.ifindex,
            )
        )
        return 0

    b[b"events"].open_ring_buffer(on_event)

    pin_path = Path("/sys/fs/bpf") / f"membrane-test-{veth_pair.if_b}"
    try:
        if attach == "tc":
            _attach_with_tc(fn.fd, veth_pair, pin_path)
        else:
            _attach_with_pyroute2(fn.fd, fn.name.decode(), veth_pair)

        _ping(veth_pair)

        deadline = time.monotonic() + 2
        while len(events) < N_PINGS and time.monotonic() < deadline:
            b.ring_buffer_poll(100)

        # Program -> map: the counters it maintained, read from Python.
        echo_count = counts[counts.Key(KEY_ECHO)].value
        all_count = counts[counts.Key(KEY_ALL)].value
    finally:
        if pin_path.exists():
            pin_path.unlink()
        b.cleanup()

    assert compile_s < 10, f"compile took {compile_s:.1f}s"
    assert echo_count == SEED + N_PINGS, f"echo counter {echo_count}, want {SEED + N_PINGS}"
    assert all_count >= N_PINGS, f"packet counter {all_count}, want >= {N_PINGS}"
    assert len(events) == N_PINGS, events
    assert all(e == (veth_pair.ip_a, veth_pair.ip_b, veth_pair.ifindex_b) for e in events), events
