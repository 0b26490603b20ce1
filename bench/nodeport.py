"""from_netdev's cost per packet on the underlay device, measured with BPF_PROG_TEST_RUN.

The datapath is compiled into a scratch pin directory of its own (removed at the end); the
packets are run through the real program in the kernel, side by side with a program that only
returns TC_ACT_OK (the floor of any tc program), in alternating rounds:

1. pass: the traffic every node carries -- TCP to this node's address on a port that is
   neither a node port nor a SNAT port (NATS, the health server), and VXLAN (UDP 8472);
2. nodeport-miss: TCP to a node port no service holds (one lb_services lookup);
3. translate: TCP of an established node-port connection to a backend on another node in
   native mode (NAT lookup, two rewrites, bpf_redirect_neigh's verdict). The program rewrites
   the packet, and a repeated test run reuses the rewritten one: this case is timed one run per
   call (medians of many calls), against the floor timed the same way.

    sudo .venv/bin/python bench/nodeport.py [--rounds 5] [--repeat 200000]

Prints ns per packet for each, and the extra over the floor.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import struct
import sys
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.testrun import test_run
from services.datapath import lb_sync, nodeport
from services.datapath.loader import Datapath
from shared.pins import remove_pins

NODE = "172.31.250.11"
CLIENT = "172.31.250.12"
BACKEND = "10.250.1.7"


def _csum(data: bytes) -> int:
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(src: str, dst: str, proto: int, sport: int, dport: int, flags: int = 0x10) -> bytes:
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        0,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + ip + l4 + b"\x00" * 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=200_000)
    args = parser.parse_args()
    from bcc import BPF

    name = "npbench" + secrets.token_hex(3)
    bpffs = Path("/sys/fs/bpf")
    floor = BPF(text=b"int pass(struct __sk_buff *skb) { return 0; }")
    floor_fd = floor.load_func(b"pass", BPF.SCHED_CLS).fd
    try:
        dp = Datapath(bpffs, name, ct_size=4096, events_bytes=1 << 16)
        nodeport.write_config(
            dp.bpf.get_table("np_config"), nodeport.NodePortConfig(IPv4Address(NODE), 1)
        )
        tables = lb_sync.open_tables(dp.bpf)
        # a node-port frontend with one backend on another node (native mode: no overlay)
        lb = lb_sync.LBSync(tables)
        ops = lb_sync.Ops()
        ops.put("lb_backends", struct.pack("<I", 1), lb_sync.backend_value(BACKEND, 8080, False))
        ops.put("lb_slots", struct.pack("<II", 9, 0), struct.pack("<I", 1))
        ops.put(
            "lb_services",
            lb_sync.service_key(NODE, 30080, socket.IPPROTO_TCP),
            struct.pack("<IIIIB3x", 9, 1, 0, 0, 0),
        )
        lb.write(ops)
        fd = dp.programs.from_netdev.fd
        syn = frame(CLIENT, NODE, socket.IPPROTO_TCP, 40000, 30080, flags=0x02)
        verdict, _ = test_run(fd, syn, 1, room=256)  # opens the connection: NAT records written
        cases = {
            "pass (TCP to the node, port 4222)": frame(
                CLIENT, NODE, socket.IPPROTO_TCP, 40000, 4222
            ),
            "pass (VXLAN, UDP 8472)": frame(CLIENT, NODE, socket.IPPROTO_UDP, 40000, 8472),
            "nodeport-miss (TCP 30081, no service)": frame(
                CLIENT, NODE, socket.IPPROTO_TCP, 40000, 30081
            ),
        }
        established = frame(CLIENT, NODE, socket.IPPROTO_TCP, 40000, 30080)
        singles: list[float] = []
        single_floors: list[float] = []
        translated = 0
        results: dict[str, list[float]] = {k: [] for k in cases}
        floors: list[float] = []
        verdicts = {}
        for _ in range(args.rounds):
            floors.append(
                test_run(floor_fd, cases["pass (VXLAN, UDP 8472)"], args.repeat, room=256)[1]
            )
            for label, data in cases.items():
                verdicts[label], ns = test_run(fd, data, args.repeat, room=256)
                results[label].append(ns)
            for _ in range(2000):
                single_floors.append(test_run(floor_fd, established, 1, room=256)[1])
                translated, ns = test_run(fd, established, 1, room=256)
                singles.append(ns)
        base = statistics.median(floors)
        print(f"first SYN to the node port: verdict {verdict} (7 = TC_ACT_REDIRECT)")
        print(f"floor (a program returning TC_ACT_OK): {base:.1f} ns/packet")
        for label, values in results.items():
            med = statistics.median(values)
            print(
                f"{label:44s} {med:7.1f} ns/packet  +{med - base:6.1f} ns over the floor"
                f"  ({med / base:.2f}x)  verdict {verdicts[label]}"
            )
        one, floor_one = statistics.median(singles), statistics.median(single_floors)
        print(
            f"{'translate (established, remote backend)':44s} {one:7.1f} ns/packet  "
            f"+{one - floor_one:6.1f} ns over the floor timed alike ({floor_one:.1f} ns)  "
            f"verdict {translated}"
        )
        dp.close()
    finally:
        remove_pins(bpffs, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
