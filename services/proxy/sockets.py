"""The proxy's transparent sockets: listeners the datapath assigns packets to, and the sockets
that answer as the original destination."""

from __future__ import annotations

import errno
import socket
import time

from shared.proxy import PROXY_LISTEN_ADDR

IP_TRANSPARENT = 19  # linux/in.h; the socket module does not name it
IP_RECVORIGDSTADDR = 20  # linux/in.h: IP_ORIGDSTADDR ancillary data on each datagram
BACKLOG = 4096  # to create_server, which listens (with 100 unless told)
BIND_WAIT_S = 10.0


def listener(port: int, wait_s: float = 0.0) -> socket.socket:
    """TCP, on the loopback address (``PROXY_LISTEN_ADDR``): ``bpf_sk_assign`` does not care
    where a listener is bound, and a pod connecting to one of the node's addresses on this port
    finds nothing (it would hand the proxy a connection to an address of its choosing).
    ``IP_TRANSPARENT`` so that it answers as the address the client connected to; no
    ``SO_REUSEPORT`` (``bpf_sk_assign`` refuses reuseport sockets).

    Bound, not listening: the first process to have its view whole listens
    (``create_server``); until then the datapath finds no listener here. The bind waits up to
    ``wait_s`` for the port, sleeping (so only before an event loop runs): a restarted proxy
    can start while the workers of the one before are still being killed, their listener
    open (``BIND_WAIT_S``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    # accepted once the client's first bytes are in (every protocol here speaks first): the
    # accept and the first read are one wake-up of the proxy, not two
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock.bind((PROXY_LISTEN_ADDR, port))
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.05)
    sock.setblocking(False)
    return sock


def datagram_listener(port: int) -> socket.socket:
    """UDP, telling each datagram's original destination; on the loopback address, as the TCP
    listener and for the same reason: a pod's datagram to one of the node's addresses on this
    port would otherwise be taken for a query to that address, which the proxy forwarded to
    itself, again and again (a socket each time)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((PROXY_LISTEN_ADDR, port))
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
