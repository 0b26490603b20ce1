"""TLS as `membrane up` runs it (membrane/tls.py): a CA of the cluster's own, NATS and Redis
TLS only; a client that verifies with the CA gets in, one without it and a plain-text one do not."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from membrane import tls
from membrane.servers import LOOPBACK, NatsServer, RedisServer, ServerProcess, ServerTLS
from shared import subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.redis_store import make_redis


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    return tls.ensure(tmp_path_factory.mktemp("tls") / "tls", [LOOPBACK])


@pytest.fixture(scope="module")
def nats_tls(tmp_path_factory: pytest.TempPathFactory, files: ServerTLS) -> Iterator[ServerProcess]:
    proc = ServerProcess("nats-server", NatsServer(tmp_path_factory.mktemp("n"), tls=files))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redis_tls(
    tmp_path_factory: pytest.TempPathFactory, files: ServerTLS
) -> Iterator[ServerProcess]:
    proc = ServerProcess("redis-server", RedisServer(tmp_path_factory.mktemp("r"), tls=files))
    proc.start()
    yield proc
    proc.stop()


def test_the_ca_and_keys_are_made_once_and_private(files: ServerTLS) -> None:
    for key in (files.key, files.ca.parent / "ca-key.pem"):
        assert key.stat().st_mode & 0o077 == 0, key
    assert files.ca.parent.stat().st_mode & 0o077 == 0
    ca, cert = files.ca.read_bytes(), files.cert.read_bytes()
    again = tls.ensure(files.ca.parent, [LOOPBACK])
    assert (again.ca.read_bytes(), again.cert.read_bytes()) == (ca, cert)  # nothing re-made
    moved = tls.ensure(files.ca.parent, [LOOPBACK, "172.31.9.1"])  # the underlay moved
    assert moved.ca.read_bytes() == ca and moved.cert.read_bytes() != cert
    tls.ensure(files.ca.parent, [LOOPBACK])  # as the module's servers were started


async def test_nats_verifies_with_the_ca_and_refuses_the_rest(nats_tls: ServerProcess) -> None:
    assert nats_tls.url.startswith("tls://") and "?ca=" in nats_tls.url
    bus = await Bus.connect(nats_tls.url, "test-tls", retry_for=5)
    try:
        kv = await bus.kv(subjects.KV_NODES)
        await kv.put("n1", b"over tls")
        assert (await kv.get("n1")).value == b"over tls"
    finally:
        await bus.close()
    # without the CA (the system's CAs do not know the cluster's): refused, and said why
    without_ca = nats_tls.url.partition("?")[0]
    with pytest.raises(Unavailable, match="certificate verify failed"):
        await Bus.connect(without_ca, "test-no-ca", retry_for=1, connect_timeout=1)
    # plain text: the server wants the handshake first and never answers a plain PING
    with socket.create_connection((LOOPBACK, nats_tls.port), timeout=5) as plain:
        info = plain.recv(4096)
        assert b'"tls_required":true' in info
        plain.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        assert b"PONG" not in _read_until_closed(plain)


async def test_a_handshake_the_server_timed_out_is_retried_not_hung(
    nats_tls: ServerProcess,
) -> None:
    """Processes starved of CPU past the server's TLS timeout (2 s) mid-handshake, as 20
    simulated agents on two busy cores were (bench/fleet.py): nats-py's clean-up of that
    attempt waited for the TLS transport to close, which it never did, so Bus.connect hung
    with no deadline. Now the first error ends the attempt and the next one connects."""

    async def connect(i: int) -> Bus:
        return await Bus.connect(nats_tls.url, f"test-starved-{i}", retry_for=30)

    attempts = [asyncio.ensure_future(connect(i)) for i in range(20)]
    for _ in range(3):  # the event loop held past the server's handshake timeout
        await asyncio.sleep(0.003)
        time.sleep(2.2)  # noqa: ASYNC251 (on purpose: the loop starved)
    done, hung = await asyncio.wait(attempts, timeout=25)
    for attempt in hung:
        attempt.cancel()
    for attempt in done:
        await attempt.result().close()
    assert not hung, f"{len(hung)} of 20 connects hung"


async def test_redis_verifies_with_the_ca_and_refuses_the_rest(
    redis_tls: ServerProcess, files: ServerTLS
) -> None:
    assert redis_tls.url.startswith("rediss://")
    client = make_redis(redis_tls.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    password = redis_tls.server.password  # type: ignore[union-attr]
    for url in (
        f"rediss://:{password}@{LOOPBACK}:{redis_tls.port}/0",  # no CA
        f"redis://:{password}@{LOOPBACK}:{redis_tls.port}/0",  # plain text
    ):
        plain = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await plain.ping()
        finally:
            await plain.aclose()


def _read_until_closed(sock: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got
