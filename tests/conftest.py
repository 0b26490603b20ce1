"""Fixtures that start real nats-server and redis-server processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from membrane.servers import NatsServer, RedisServer, wait_for_port
from shared.bus import Bus

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """A real server process the test can stop and start again on the same port and data."""

    def __init__(self, name: str, server: NatsServer | RedisServer) -> None:
        self.name = name
        self.server = server
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        command = self.server.command()  # writes the config, creating the directory
        log = open(self.server.directory / f"{self.name}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(self.server.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.server.host, self.server.port, self.name, process=self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


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
async def bus(nats_server: ServerProcess) -> AsyncIterator[Bus]:
    client = await Bus.connect(nats_server.url, "test", retry_for=5)
    yield client
    await client.close()


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
