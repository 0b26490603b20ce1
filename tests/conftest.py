"""Fixtures that start real nats-server and redis-server processes on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrane.servers import NatsServer, RedisServer, ServerProcess
from shared.bus import Bus
from tests.kubeapi.server import FakeKubeAPI

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess("nats-server", NatsServer(tmp_path / "nats"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess("redis-server", RedisServer(tmp_path / "redis"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    """A fake Kubernetes API server (tests/kubeapi), bookmarks every 0.1 s when asked."""
    server = FakeKubeAPI(bookmark_interval=0.1).start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: ServerProcess) -> AsyncIterator[Bus]:
    client = await Bus.connect(nats_server.url, "test", retry_for=5)
    yield client
    await client.close()


async def scrape(address: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """Read a /metrics endpoint: (sample name, label values sorted by label name) -> value."""
    url = f"http://{address}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    return {
        (sample.name, tuple(v for _, v in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    what: str,
    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """Call ``probe`` until it returns instead of raising one of ``retry_on``; its result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await probe()
        except retry_on as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {what} within {timeout:g}s: {exc!r}") from exc
            await asyncio.sleep(0.1)


def membrane_command(*args: str) -> list[str]:
    """The CLI as a user runs it, from this interpreter's environment."""
    return [sys.executable, "-m", "membrane", *args]


def service_env(nats: ServerProcess, redis: ServerProcess, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MEMBRANE_NATS_URL=nats.url,
        MEMBRANE_REDIS_URL=redis.url,
        MEMBRANE_LOG_FORMAT="json",
        **{f"MEMBRANE_{k.upper()}": v for k, v in extra.items()},
    )
    return env
