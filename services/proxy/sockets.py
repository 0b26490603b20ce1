"""The proxy's transparent sockets: listeners the datapath assigns packets to, and the sockets
that answer as the original destination."""

from __future__ import annotations

import socket

IP_TRANSPARENT = 19  # linux/in.h; the socket module does not name it
IP_RECVORIGDSTADDR = 20  # linux/in.h: IP_ORIGDSTADDR ancillary data on each datagram


def listener(port: int) -> socket.socket:
    """TCP, on every address: ``IP_TRANSPARENT`` so that it answers as the address the client
    connected to; no ``SO_REUSEPORT`` (``bpf_sk_assign`` refuses reuseport sockets)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def datagram_listener(port: int) -> socket.socket:
    """UDP, on every address, telling each datagram's original destination."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


def answering(address: str, port: int) -> socket.socket:
    """UDP bound to an address that is not the node's (a DNS server's): answers from it reach
    the pod as if the server sent them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.setblocking(False)
    return sock


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The ``IP_ORIGDSTADDR`` of a datagram (a ``struct sockaddr_in``)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntoa(data[4:8]), int.from_bytes(data[2:4], "big")
    return None
