"""The node's proxy in several processes, all accepting on the one listening socket.

One process was a link in every proxied request's chain (client -> proxy -> server -> proxy ->
client): with both CPUs busy, it waited for a CPU a third of its time while the other CPU was
partly idle. ``bpf_sk_assign`` refuses ``SO_REUSEPORT`` listeners, so the processes share one
socket the way servers did before reuseport (nginx, gunicorn): the process the supervisor
started (the leader) binds it, then forks the workers before its event loop exists.

Each process watches the buckets on its own connection to the bus, keeps its own view and
publishes its own flow batches, and takes connections only once its own view is whole: the
socket is bound, not listening, until the first process is ready (until then the datapath
finds no listener and drops, as before), and a process not ready yet does not accept from it.
What there is once per node stays in the leader: the DNS proxy, FQDN, the micro service and
``/metrics``, where each worker's counts arrive over its channel (:mod:`services.proxy.tally`).
What one process learns that the others need goes through the leader to them: Kafka topic ids,
which a client may learn from a Metadata answer on one connection and use on another.

Fail closed across processes: a worker dies with its leader (``PR_SET_PDEATHSIG``: SIGKILL),
and a leader whose worker ended exits, so that its supervisor starts the node's proxy again
whole. No process serves that its leader does not know of.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address

from prometheus_client import Counter

from services.proxy.kafka import Broker, TopicIds
from services.proxy.tally import Recorder, Tally
from shared import log

PR_SET_PDEATHSIG = 1  # linux/prctl.h
MOST_BY_DEFAULT = 4
CHANNEL_BUFFER = 1 << 20  # a tally message is at most ~80 KiB (MOST_VALUES), most a few KiB
RECEIVE = 256 << 10  # bytes read per message: more than a tally's largest
STOP_S = 5.0  # a worker's time to close after SIGTERM, then SIGKILL
# what a message on a channel is, its first byte
TALLY = b"T"  # worker -> leader: counts for /metrics
TOPICS = b"K"  # either way: Kafka topic ids learned (services/proxy/kafka.py TopicIds)
TOPICS_PER_MESSAGE = 1000  # about 80 KiB of JSON at most

UNSHARED = Counter(
    "membrane_proxy_topic_ids_unshared_total",
    "Kafka topic id messages the leader could not pass on to a worker (its channel full): "
    "that worker refuses those ids until the client asks for metadata again",
)


def encode_topics(broker: Broker, pairs: list[tuple[uuid.UUID, str]]) -> list[bytes]:
    return [
        TOPICS
        + json.dumps(
            {
                "broker": [str(broker[0]), broker[1]],
                "pairs": [[str(i), n] for i, n in pairs[at : at + TOPICS_PER_MESSAGE]],
            },
            separators=(",", ":"),
        ).encode()
        for at in range(0, len(pairs), TOPICS_PER_MESSAGE)
    ]


def decode_topics(data: bytes) -> tuple[Broker, list[tuple[uuid.UUID, str]]]:
    """Raises ``ValueError`` on anything but what :func:`encode_topics` makes."""
    try:
        body = json.loads(data[len(TOPICS) :])
        address, port = body["broker"]
        if type(port) is not int:
            raise ValueError(f"port {port!r}")
        pairs = [(uuid.UUID(i), n) for i, n in body["pairs"]]
        if not all(type(n) is str for _, n in pairs):
            raise ValueError("a name not a string")
        return (IPv4Address(address), port), pairs
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"not topic ids: {exc}") from None


def _send_now(channel: socket.socket, messages: list[bytes]) -> None:
    """From synchronous code, without waiting: a message the channel has no room for is
    counted, not queued (the process that misses it fails closed)."""
    for message in messages:
        try:
            channel.send(message)
        except OSError:
            UNSHARED.inc()


def process_count(asked: int) -> int:
    """``asked``, or when 0 one per CPU this process may run on, at most ``MOST_BY_DEFAULT``:
    each process holds a whole view and a bus connection, and a node of 64 CPUs does not
    proxy 64 times more than one of 4 (ask for more where it does)."""
    if asked > 0:
        return asked
    return max(1, min(len(os.sched_getaffinity(0)), MOST_BY_DEFAULT))


@dataclasses.dataclass
class Worker:
    """This process, forked: ``index`` from 1; ``channel`` to the leader."""

    index: int
    channel: socket.socket

    async def forward(self, tally: Tally) -> None:
        loop = asyncio.get_running_loop()
        for message in tally.encode():
            await loop.sock_sendall(self.channel, TALLY + message)

    def share(self, broker: Broker, pairs: list[tuple[uuid.UUID, str]]) -> None:
        """Topic ids learned here, to the leader for the others."""
        _send_now(self.channel, encode_topics(broker, pairs))

    async def listen(self, topic_ids: TopicIds) -> None:
        """What the others learned, into ``topic_ids``; returns when the leader is gone (and
        this process with it: ``PR_SET_PDEATHSIG``)."""
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(self.channel, RECEIVE):
            try:
                broker, pairs = decode_topics(data)
            except ValueError:
                log.get("proxy").error("malformed message from the leader", kind=data[:1])
                continue
            topic_ids.learn(broker, pairs, share=False)


@dataclasses.dataclass
class Child:
    """A worker, as its leader knows it."""

    index: int
    pid: int
    channel: socket.socket


@dataclasses.dataclass
class Leader:
    children: list[Child]


def fork(count: int) -> Leader | Worker:
    """``count - 1`` workers forked from this process; in each, its :class:`Worker`; here, the
    :class:`Leader`. Call it before an event loop or a thread exists: a fork copies neither
    threads nor, safely, an event loop's state."""
    leader = os.getpid()
    children: list[Child] = []
    for index in range(1, count):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHANNEL_BUFFER)
        pid = os.fork()
        if pid == 0:
            _die_with(leader)
            ours.close()
            for child in children:  # the leader's ends of the earlier workers' channels
                child.channel.close()
            theirs.setblocking(False)
            return Worker(index, theirs)
        theirs.close()
        ours.setblocking(False)
        children.append(Child(index, pid, ours))
    return Leader(children)


def _die_with(leader: int) -> None:
    """SIGKILL when the leader ends, however it ends; at once if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != leader:
        os._exit(1)


class Workers:
    """The leader's side: each worker's tallies into Prometheus, topic ids learned anywhere
    to every other process, and a worker's end noticed."""

    def __init__(self, children: list[Child], topic_ids: TopicIds | None = None) -> None:
        self.children = children
        self.recorder = Recorder()
        self.malformed = 0
        self.stopping = False  # their ends from now on are ours, not news
        self.topic_ids = topic_ids or TopicIds()
        if children:
            self.topic_ids.shared = lambda broker, pairs: self.share(broker, pairs, None)

    def share(
        self, broker: Broker, pairs: list[tuple[uuid.UUID, str]], source: Child | None
    ) -> None:
        """Topic ids learned by ``source`` (None: here) to every other worker."""
        messages = encode_topics(broker, pairs)
        for child in self.children:
            if child is not source:
                _send_now(child.channel, messages)

    def _received(self, child: Child, data: bytes) -> None:
        try:
            if data[:1] == TALLY:
                self.recorder.record(Tally.decode(data[1:]), child.index)
                return
            broker, pairs = decode_topics(data)
        except ValueError:
            self.malformed += 1
            log.get("proxy").error("malformed message from a worker", worker=child.index)
            return
        self.topic_ids.learn(broker, pairs, share=False)
        self.share(broker, pairs, child)

    async def watch(self, ended: Callable[[Child, str], None]) -> None:
        """Until a worker's channel ends; then ``ended(child, how)`` and return."""
        if not self.children:
            await asyncio.Event().wait()  # nothing to watch: until cancelled
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def read(child: Child) -> None:
            while True:
                try:
                    data = await loop.sock_recv(child.channel, RECEIVE)
                except OSError as exc:
                    data, error = b"", str(exc)
                else:
                    error = ""
                if not data:
                    if not done.done() and not self.stopping:
                        done.set_result((child, error or await self._status(child)))
                    return
                self._received(child, data)

        readers = [asyncio.ensure_future(read(child)) for child in self.children]
        try:
            child, how = await done
        finally:
            for reader in readers:
                reader.cancel()
        ended(child, how)

    async def _status(self, child: Child) -> str:
        """How a worker whose channel closed ended (it may take a moment to become a
        zombie after its descriptors closed)."""
        deadline = time.monotonic() + 1.0
        while True:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(child.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG)
                if pid:
                    if os.WIFSIGNALED(status):
                        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                    return f"exited with {os.waitstatus_to_exitcode(status)}"
            if time.monotonic() > deadline:
                return "closed its channel"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """SIGTERM to each worker still there, SIGKILL to those not gone in ``STOP_S``."""
        self.stopping = True
        waiting = {child.pid for child in self.children}
        for pid in waiting:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + STOP_S, False
        while waiting:
            for pid in list(waiting):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:  # noqa: ASYNC222 (WNOHANG: never blocks)
                        waiting.discard(pid)
                except ChildProcessError:
                    waiting.discard(pid)
            if not waiting or (killed and time.monotonic() > deadline):
                break  # (SIGKILLed and still there: stuck in the kernel; it dies with us)
            if time.monotonic() > deadline:
                for pid in waiting:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + STOP_S, True
            await asyncio.sleep(0.02)
        for child in self.children:
            child.channel.close()
