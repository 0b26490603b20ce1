"""Idle HTTP/1.1 upstream connections, kept for the next client connection's requests.

A client that opens a new connection per request cost the proxy two TCP connections each time:
its own, and the proxy's to the server (the handshake in the connect's softirq, the server's
accept, both ends' close). Envoy, which Cilium uses, keeps its upstream HTTP/1.1 connections
in a pool; so does this proxy, for the upstreams it opens from the node's own address (those
bound to the client's address and port, towards a pod on another node, are never pooled: they
carry the client's tuple). An upstream is handed back here only between answers: every request
sent on it answered, the last answer keep-alive, the requests all HTTP/1.1 and none an upgrade,
nothing half written or half read.

The key is what the upstream stands for: the client's address, the identity its mark carries
(the datapath judges the upstream by it), the original destination. An idle connection is
kept with the view's generation when it was handed back and is never reused once the view has
changed since (a policy or ipcache change: the datapath judged it under the policy then, and an
established connection is not judged again), nor after ``IDLE_S`` (servers close idle
keep-alive connections after a few seconds: gunicorn 2, uvicorn and Node 5); one the server
closes, or that says anything while idle, leaves the pool at once. The verdict is per request
anyway: what goes over a reused connection was judged like any other request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

IDLE_S = 1.0  # below every common server keep-alive timeout
PER_KEY = 16  # idle connections kept per key (as many as the client's connections in flight)
TOTAL = 512  # idle connections kept in all (a file descriptor each)

Key = tuple[str, int, str, int]  # client address, identity (the mark), destination, port


class _Idle(asyncio.Protocol):
    """An idle upstream's protocol: whatever it says, or its end, takes it out of the pool."""

    __slots__ = ("key", "pool", "transport")

    def __init__(self, pool: UpstreamPool, key: Key, transport: asyncio.Transport) -> None:
        self.pool = pool
        self.key = key
        self.transport = transport

    def data_received(self, data: bytes) -> None:  # nothing was asked: not usable any more
        self.pool.drop(self)

    def eof_received(self) -> bool:
        self.pool.drop(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.drop(self)


class UpstreamPool:
    def __init__(self) -> None:
        # per key, (idle protocol, view generation, monotonic time) in the order handed back
        self.idle: dict[Key, deque[tuple[_Idle, int, float]]] = {}
        self.size = 0
        self.sweeping: asyncio.TimerHandle | None = None
        self.reused = 0  # upstreams taken from the pool (the count a test or benchmark reads)

    def take(self, key: Key, generation: int) -> asyncio.Transport | None:
        """The most recently idle upstream for ``key`` made under ``generation``, taken out of
        the pool (its protocol is the caller's to set), or ``None``."""
        entries = self.idle.get(key)
        if not entries:
            return None
        deadline = time.monotonic() - IDLE_S
        while entries:
            idle, made, since = entries.pop()
            self.size -= 1
            transport = idle.transport
            if made == generation and since > deadline and not transport.is_closing():
                if not entries:
                    del self.idle[key]
                self.reused += 1
                return transport
            _close(transport)
        del self.idle[key]
        return None

    def put(self, key: Key, transport: asyncio.Transport, generation: int) -> None:
        """An upstream between answers, kept for ``key`` (or closed if the pool is full)."""
        entries = self.idle.get(key)
        if entries is None:
            entries = self.idle[key] = deque()
        if len(entries) >= PER_KEY or self.size >= TOTAL:
            _close(transport)
            return
        idle = _Idle(self, key, transport)
        transport.set_protocol(idle)
        entries.append((idle, generation, time.monotonic()))
        self.size += 1
        if self.sweeping is None:
            self.sweeping = asyncio.get_running_loop().call_later(IDLE_S, self._sweep)

    def drop(self, idle: _Idle) -> None:
        """An idle upstream that ended or spoke: closed and forgotten."""
        _close(idle.transport)
        entries = self.idle.get(idle.key)
        if entries is None:
            return
        for i, (other, _, _) in enumerate(entries):
            if other is idle:
                del entries[i]
                self.size -= 1
                if not entries:
                    del self.idle[idle.key]
                return

    def _sweep(self) -> None:
        """Those idle longer than ``IDLE_S`` closed; again later while any is kept."""
        self.sweeping = None
        deadline = time.monotonic() - IDLE_S
        for key in list(self.idle):
            entries = self.idle[key]
            while entries and entries[0][2] <= deadline:  # oldest first
                idle = entries.popleft()[0]
                self.size -= 1
                _close(idle.transport)
            if not entries:
                del self.idle[key]
        if self.size:
            self.sweeping = asyncio.get_running_loop().call_later(IDLE_S / 2, self._sweep)

    def close(self) -> None:
        for entries in self.idle.values():
            for idle, _, _ in entries:
                _close(idle.transport)
        self.idle.clear()
        self.size = 0
        if self.sweeping is not None:
            self.sweeping.cancel()
            self.sweeping = None


_SPENT = asyncio.Protocol()


def _close(transport: asyncio.Transport) -> None:
    """Closed, its protocol let go (uvloop's transports keep theirs after ``connection_lost``:
    a cycle with the idle protocol, which holds the transport)."""
    transport.set_protocol(_SPENT)
    transport.close()
