"""A tool the overlay tests run inside a node namespace (``ip netns exec NODE python3 ...``).

sniff IFACE PORT SECONDS
    print "ready", then capture VXLAN packets (UDP to PORT) on IFACE for SECONDS and print one
    JSON list of [vni, inner source, inner destination, inner protocol]
forge REMOTE PORT VNI SRC DST DPORT PAYLOAD
    send one VXLAN packet to REMOTE:PORT with VNI, carrying a UDP datagram SRC -> DST:DPORT
    (REMOTE may be a broadcast address)
spoof SRC DST DPORT PAYLOAD
    send one UDP datagram SRC -> DST:DPORT from a raw socket, whatever this host's address
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def sniff(iface: str, port: int, seconds: float) -> list[list[object]]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    print("ready", flush=True)
    seen: list[list[object]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame, info = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if info[2] == socket.PACKET_OUTGOING or len(frame) < 14 + 20 + 8 + 8 + 14 + 20:
            continue
        if frame[12:14] != b"\x08\x00" or frame[14 + 9] != socket.IPPROTO_UDP:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = 14 + ihl
        if struct.unpack("!H", frame[udp + 2 : udp + 4])[0] != port:
            continue
        vxlan = udp + 8
        vni = int.from_bytes(frame[vxlan + 4 : vxlan + 7], "big")
        inner_ip = vxlan + 8 + 14
        src = socket.inet_ntoa(frame[inner_ip + 12 : inner_ip + 16])
        dst = socket.inet_ntoa(frame[inner_ip + 16 : inner_ip + 20])
        seen.append([vni, src, dst, frame[inner_ip + 9]])
    return seen


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 + UDP datagram from ``src`` (any address) to ``dst``, UDP checksum left out.
    (netprobe.py sends it from inside a pod, with a forged source.)"""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0x1234,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + udp


def forge(remote: str, port: int, vni: int, src: str, dst: str, dport: int, payload: bytes) -> None:
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    vxlan = struct.pack("!II", 0x08000000, vni << 8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(vxlan + eth + ipv4_udp(src, dst, dport, payload), (remote, port))


def spoof(src: str, dst: str, dport: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.sendto(ipv4_udp(src, dst, dport, payload), (dst, 0))


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "sniff":
        print(json.dumps(sniff(rest[0], int(rest[1]), float(rest[2]))), flush=True)
        return 0
    if command == "forge":
        remote, port, vni, src, dst, dport, payload = rest
        forge(remote, int(port), int(vni), src, dst, int(dport), payload.encode())
        return 0
    if command == "spoof":
        src, dst, dport, payload = rest
        spoof(src, dst, int(dport), payload.encode())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
