"""A tiny traffic tool the tests run inside pods (``membrane pod exec POD -- python3 netprobe.py``).

serve tcp|udp PORT            answer every TCP connection / UDP datagram with "pong <data>"
tcp IP PORT                   connect, send, print the answer; exit 0 on an answer, 1 otherwise
udp IP PORT                   send one datagram, print the answer; exit 0 on an answer
udpc IP PORT                  the same from a connected socket, which hears ICMP errors: exit 0
                              on an answer, 3 on "connection refused", 1 on no answer
stream IP PORT COUNT GAP_MS   send COUNT numbered datagrams, GAP_MS apart (no answers awaited)
count PORT SECONDS|eof        count datagrams arriving on PORT for SECONDS (or until stdin closes:
                              the test ends the count once its senders are done); print the count
matrix TIMEOUT IP:PORT...     try every TCP connection at once; print {"IP:PORT": outcome} as JSON,
                              outcome "ok" (answered), "timeout" (dropped) or the error's name;
                              a target "udp:IP:PORT" sends one UDP datagram and awaits the answer
whoami tcp|udp PORT           answer every connection / datagram with this pod's own address
ask tcp|udp IP PORT N [SPORT [GAP_MS]]  N connections (or datagrams from one source port
                              SPORT, 0: any), GAP_MS apart; print the answers as a JSON list
                              (from the address in $NETPROBE_SOURCE when it is set)
spoof SRC DST DPORT PAYLOAD    send one UDP datagram from the forged address SRC (a raw socket)
udpwait IP PORT SPORT SECONDS send one datagram from SPORT on a connected socket, print "sent",
                              then wait SECONDS: exit 0 on an answer, 3 on an ICMP error
                              ("connection refused"), 1 on nothing
icmperr VICTIM SERVER DPORT N send VICTIM N ICMP port-unreachable errors quoting its UDP datagram
                              VICTIM:40000 -> SERVER:DPORT (100 ms apart)
rawcount PROTO SECONDS|eof    count the IP packets of protocol PROTO arriving for SECONDS or
                              until stdin closes (raw socket; prints "ready" first); print the count
rawsend PROTO IP COUNT        send COUNT IP packets of protocol PROTO to IP (raw socket)
frags SRC DST DPORT ID MODE   send a UDP datagram SRC -> DST:DPORT in two IP fragments of id ID
                              (MODE whole), or its second fragment only (MODE rest)
fragcount SECONDS|eof         print "ready", then count the non-first IP fragments arriving on
                              eth0 for SECONDS or until stdin closes (a packet socket: before
                              reassembly); print
                              {"ID": count} as JSON
synspray SRC DST DPORT COUNT  send COUNT TCP SYNs SRC -> DST, every one from another port pair
                              and each twice (a raw socket; nobody answers them); print COUNT
echo2 PORT                    print "ready"; answer each datagram on PORT, and on the first one
                              from a new peer send every earlier peer a datagram too (a
                              server pushing to established flows when told to)
udplate IP PORT SPORT SECONDS send one datagram from SPORT; on the first answer print
                              "answered", then wait SECONDS for a second one: exit 0 if it
                              comes, 1 if not
peer tcp|udp PORT             print "ready"; answer each connection / datagram with the address it
                              came from (what a server outside the cluster sees)
bigecho PORT                  print "ready"; send each UDP datagram on PORT back whole (<= 64 KiB)
bigudp IP PORT SIZE           send one SIZE-byte UDP datagram (the kernel fragments what exceeds
                              the MTU) and wait for it to come back whole: exit 0 if it does
agent PORT...                 serve TCP (and UDP, for a PORT "udp:N") on every PORT, print "ready",
                              then answer each stdin line "TIMEOUT TARGET..." with one line of
                              matrix JSON, until EOF
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

TIMEOUT = 2.0


def serve(proto: str, port: int) -> None:
    if proto == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(b"pong " + data, peer)
    listener = _listen(port)
    print("ready", flush=True)
    _answer_forever(listener)


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(128)
    return listener


def _answer_forever(listener: socket.socket) -> None:
    def answer(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(2048):
                conn.sendall(b"pong " + data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def _attempt(target: str, timeout: float) -> str:
    ip, _, port = target.rpartition(":")
    if ip.startswith("udp:"):
        return _attempt_udp(ip.removeprefix("udp:"), int(port), timeout)
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout) as sock:
            sock.sendall(b"ping")
            return "ok" if sock.recv(2048) == b"pong ping" else "bad answer"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__


def _attempt_udp(ip: str, port: int, timeout: float) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            sock.send(b"ping")
            return "ok" if sock.recv(2048) == b"pong ping" else "bad answer"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__


def _bind_udp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def _answer_udp_forever(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(b"pong " + data, peer)


def matrix(timeout: float, targets: list[str]) -> dict[str, str]:
    """All connections at once, one thread each: a row costs one timeout, not one per target."""
    results: dict[str, str] = {}

    def run(target: str) -> None:
        results[target] = _attempt(target, timeout)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def agent(ports: list[str]) -> int:
    for port in ports:
        if port.startswith("udp:"):
            sock = _bind_udp(int(port[4:]))
            threading.Thread(target=_answer_udp_forever, args=(sock,), daemon=True).start()
        else:
            listener = _listen(int(port))
            threading.Thread(target=_answer_forever, args=(listener,), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        timeout, *targets = line.split()
        print(json.dumps(matrix(float(timeout), targets)), flush=True)
    return 0


def tcp(ip: str, port: int) -> int:
    try:
        with socket.create_connection((ip, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"ping")
            print(sock.recv(2048).decode())
            return 0
    except OSError as exc:
        print(f"failed: {exc}")
        return 1


def udp(ip: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(b"ping", (ip, port))
        try:
            print(sock.recv(2048).decode())
            return 0
        except OSError as exc:
            print(f"failed: {exc}")
            return 1


def udpflood(ip: str, port: int, count: int) -> int:
    """One datagram from each of ``count`` sockets (ports of their own): as many flows, each
    answered. Prints how many answers came; 0 if every flow was answered."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendto(b"ping", (ip, port))
        answered = 0
        for sock in socks:
            sock.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                sock.recv(2048)
                answered += 1
        print(answered)
        return 0 if answered == count else 1
    finally:
        for sock in socks:
            sock.close()


def bigecho(port: int) -> None:
    sock = _bind_udp(port)
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def bigudp(ip: str, port: int, size: int) -> int:
    payload = bytes(i % 251 for i in range(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(payload, (ip, port))
        try:
            data, peer = sock.recvfrom(65535)
        except OSError as exc:
            print(f"failed: {exc}")
            return 1
    print(f"{len(data)} bytes from {peer[0]}:{peer[1]}")
    return 0 if data == payload and peer == (ip, port) else 1


def udp_connected(ip: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((ip, port))
        sock.send(b"ping")
        try:
            print(sock.recv(2048).decode())
            return 0
        except ConnectionRefusedError:
            print("refused")
            return 3
        except OSError as exc:
            print(f"failed: {exc}")
            return 1


def stream(ip: str, port: int, count: int, gap_ms: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        start = time.monotonic()
        for i in range(count):
            sock.sendto(str(i).encode(), (ip, port))
            time.sleep(max(0.0, start + (i + 1) * gap_ms / 1000 - time.monotonic()))
    print(count)
    return 0


def _until(window: str) -> threading.Event:
    """An event set after ``window`` seconds, or when stdin closes for ``eof``: a counter started
    before its senders ends once the test says they are done (a fixed window ends early when
    the senders, started after it, start late on a loaded machine)."""
    stop = threading.Event()
    if window == "eof":
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    else:
        threading.Timer(float(window), stop.set).start()
    return stop


def _receive(sock: socket.socket, stop: threading.Event) -> Iterator[bytes]:
    """What arrives on ``sock`` until ``stop``, then what was already queued on it."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            yield sock.recv(65535)
        except TimeoutError:
            continue
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            yield sock.recv(65535)


def count(port: int, window: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        stop = _until(window)
        print("ready", flush=True)
        print(len(set(_receive(sock, stop))))
    return 0


def whoami(proto: str, port: int) -> None:
    if proto == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        print("ready", flush=True)
        while True:
            _, peer = sock.recvfrom(2048)
            # the address the datagram was sent to, as this pod sees it
            sock.sendto(_own_address(peer).encode(), peer)
    listener = _listen(port)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.getsockname()[0].encode())


def peer(proto: str, port: int) -> None:
    if proto == "udp":
        sock = _bind_udp(port)
        print("ready", flush=True)
        while True:
            _, source = sock.recvfrom(2048)
            sock.sendto(source[0].encode(), source)
    listener = _listen(port)
    print("ready", flush=True)
    while True:
        conn, source = listener.accept()
        with conn:
            conn.sendall(source[0].encode())


def _own_address(peer: tuple[str, int]) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(peer)
        return str(probe.getsockname()[0])


def ask(proto: str, ip: str, port: int, n: int, sport: int, gap_ms: float = 0) -> int:
    answers: list[str] = []
    source = os.environ.get("NETPROBE_SOURCE", "0.0.0.0")
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, sport))
            sock.settimeout(TIMEOUT)
            for _ in range(n):
                sock.sendto(b"who", (ip, port))
                try:
                    data, peer = sock.recvfrom(2048)
                    # the answer must come from the address asked (reverse NAT)
                    answers.append(data.decode() if peer == (ip, port) else f"from {peer[0]}")
                except OSError:
                    answers.append("failed")
    else:
        for _ in range(n):
            try:
                with socket.create_connection(
                    (ip, port), timeout=TIMEOUT, source_address=(source, 0)
                ) as sock:
                    answers.append(sock.recv(2048).decode() or "failed")
            except OSError:
                answers.append("failed")
            time.sleep(gap_ms / 1000)
    print(json.dumps(answers))
    return 0


def spoof(src: str, dst: str, dport: int, payload: bytes) -> int:
    """A datagram whose IP source is ``src``, not this pod's address (needs CAP_NET_RAW)."""
    from underlay import ipv4_udp  # the script's own directory is on sys.path

    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.sendto(ipv4_udp(src, dst, dport, payload), (dst, 0))
    print("sent")
    return 0


def udpwait(ip: str, port: int, sport: int, seconds: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", sport))
        sock.connect((ip, port))
        sock.settimeout(seconds)
        sock.send(b"ping")
        print("sent", flush=True)
        try:
            print(sock.recv(2048).decode())
            return 0
        except ConnectionRefusedError:
            print("refused")
            return 3
        except OSError as exc:
            print(f"failed: {exc}")
            return 1


def icmperr(victim: str, server: str, dport: int, count: int) -> int:
    """Port unreachable, as if from SERVER's node, quoting VICTIM's datagram to SERVER."""
    from underlay import checksum, ipv4_udp  # the script's own directory is on sys.path

    quoted = ipv4_udp(victim, server, dport, b"ping")[:28]  # IP header + 8 bytes of UDP
    header = struct.pack("!BBHI", 3, 3, 0, 0)
    message = header[:2] + struct.pack("!H", checksum(header + quoted)) + header[4:] + quoted
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for _ in range(count):
            sock.sendto(message, (victim, 0))
            time.sleep(0.1)
    print(count)
    return 0


def rawcount(proto: int, window: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as sock:
        stop = _until(window)
        print("ready", flush=True)
        print(sum(1 for _ in _receive(sock, stop)))
    return 0


def rawsend(proto: int, ip: str, count: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as sock:
        for i in range(count):
            # a GRE header (no flags, protocol 0x0800) is 4 bytes; any payload will do for others
            sock.sendto(b"\x00\x00\x08\x00" + str(i).encode(), (ip, 0))
    print(count)
    return 0


def _ipv4(src: str, dst: str, proto: int, ident: int, frag: int, payload: bytes) -> bytes:
    """An IPv4 header (checksum and length filled in by the kernel for a raw socket)."""
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            ident,
            frag,
            64,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + payload
    )


def frags(src: str, dst: str, dport: int, ident: int, mode: str) -> int:
    """A 40-byte UDP datagram (no checksum) as fragments at offsets 0 and 24 bytes."""
    more_fragments = 0x2000
    datagram = struct.pack("!HHHH", 40000, dport, 40, 0) + b"fragment-one----fragment-two----"
    first = _ipv4(src, dst, socket.IPPROTO_UDP, ident, more_fragments, datagram[:24])
    rest = _ipv4(src, dst, socket.IPPROTO_UDP, ident, 24 // 8, datagram[24:])
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        if mode == "whole":
            sock.sendto(first, (dst, 0))
        sock.sendto(rest, (dst, 0))
    print("sent")
    return 0


def fragcount(window: str) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.bind(("eth0", 0))
    stop = _until(window)
    print("ready", flush=True)
    seen: dict[str, int] = {}
    for frame in _receive(sock, stop):
        ident, frag = struct.unpack("!HH", frame[18:22])
        if frag & 0x1FFF:
            seen[str(ident)] = seen.get(str(ident), 0) + 1
    print(json.dumps(seen))
    return 0


def synspray(src: str, dst: str, dport: int, count: int) -> int:
    header = bytearray(_ipv4(src, dst, socket.IPPROTO_TCP, 0, 0, bytes(20)))
    header[20 + 12] = 5 << 4  # data offset
    header[20 + 13] = 0x02  # SYN
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for i in range(count):
            struct.pack_into("!HH", header, 20, 1024 + i % 64000, dport + i // 64000)
            # twice, as a retransmission: an entry looked up once counts as used to the
            # kernel's LRU, which would otherwise evict the spray's own entries first
            sock.sendto(header, (dst, 0))
            sock.sendto(header, (dst, 0))
    print(count)
    return 0


def echo2(port: int) -> None:
    sock = _bind_udp(port)
    print("ready", flush=True)
    peers: list[tuple[str, int]] = []
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(b"pong " + data, peer)
        if peer not in peers:
            for earlier in peers:
                sock.sendto(b"late " + data, earlier)
            peers.append(peer)


def udplate(ip: str, port: int, sport: int, seconds: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", sport))
        sock.connect((ip, port))
        sock.settimeout(TIMEOUT)
        sock.send(b"ping")
        try:
            sock.recv(2048)
        except OSError as exc:
            print(f"no answer: {exc}", flush=True)
            return 1
        print("answered", flush=True)
        sock.settimeout(seconds)
        try:
            print(sock.recv(2048).decode())
            return 0
        except OSError as exc:
            print(f"no second answer: {exc}")
            return 1


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "serve":
        serve(rest[0], int(rest[1]))
    if command == "tcp":
        return tcp(rest[0], int(rest[1]))
    if command == "udp":
        return udp(rest[0], int(rest[1]))
    if command == "udpflood":
        return udpflood(rest[0], int(rest[1]), int(rest[2]))
    if command == "udpc":
        return udp_connected(rest[0], int(rest[1]))
    if command == "stream":
        return stream(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    if command == "count":
        return count(int(rest[0]), rest[1])
    if command == "matrix":
        print(json.dumps(matrix(float(rest[0]), rest[1:])))
        return 0
    if command == "whoami":
        whoami(rest[0], int(rest[1]))
    if command == "ask":
        sport = int(rest[4]) if len(rest) > 4 else 0
        gap = float(rest[5]) if len(rest) > 5 else 0.0
        return ask(rest[0], rest[1], int(rest[2]), int(rest[3]), sport, gap)
    if command == "spoof":
        return spoof(rest[0], rest[1], int(rest[2]), rest[3].encode())
    if command == "udpwait":
        return udpwait(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    if command == "icmperr":
        return icmperr(rest[0], rest[1], int(rest[2]), int(rest[3]))
    if command == "rawcount":
        return rawcount(int(rest[0]), rest[1])
    if command == "rawsend":
        return rawsend(int(rest[0]), rest[1], int(rest[2]))
    if command == "frags":
        return frags(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
    if command == "fragcount":
        return fragcount(rest[0])
    if command == "synspray":
        return synspray(rest[0], rest[1], int(rest[2]), int(rest[3]))
    if command == "echo2":
        echo2(int(rest[0]))
    if command == "udplate":
        return udplate(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    if command == "peer":
        peer(rest[0], int(rest[1]))
    if command == "bigecho":
        bigecho(int(rest[0]))
    if command == "bigudp":
        return bigudp(rest[0], int(rest[1]), int(rest[2]))
    if command == "agent":
        return agent(rest)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
