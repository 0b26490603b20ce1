"""The node's proxy in several processes (services/proxy/prefork.py), as ``membrane run proxy``
starts it, against a real nats-server: every process answers on the one listener, a worker's
counts reach the leader's /metrics, and a proxy process never outlives the others (a worker's
end stops the leader, the leader's end kills the workers). On free loopback ports of this
namespace (the proxy's listener is only reachable through the datapath's redirect on a node,
but here nothing else is in the way). Root: the transparent listener."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrane.servers import ServerProcess, free_port
from tests.conftest import membrane_command, service_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT: root")


class Proxy:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ports: dict[str, int]) -> None:
        self.proc, self.log, self.ports = proc, log, ports

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.lines() if line.get("event") == event) < count:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"{event!r} x{count}: {self.log.read_text()}"
            time.sleep(0.05)

    def workers(self) -> list[int]:
        pid = self.proc.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def ask(self) -> bytes:
        """A malformed request on a new connection to the listener: answered by the proxy
        itself (here the original destination is the listener; a request it forwarded would
        come back to it)."""
        address = ("127.0.0.1", self.ports["proxy_port"])
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost a\r\n\r\n")
            return sock.recv(4096)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.ports['metrics_port']}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("membrane_proxy_")
        }


@pytest.fixture
def proxy(
    nats_server: ServerProcess, redis_server: ServerProcess, tmp_path: Path
) -> Iterator[Proxy]:
    log = tmp_path / "proxy.log"
    ports = {
        "proxy_port": free_port(),
        "dns_proxy_port": free_port(),
        "metrics_port": free_port(),
    }
    env = service_env(
        nats_server, redis_server,
        node="n1", proxy_processes="3", fqdn_fast="false",
        **{name: str(port) for name, port in ports.items()},
    )  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            membrane_command("run", "proxy"), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    running = Proxy(proc, log, ports)
    try:
        running.wait_for("proxy ready")
        running.wait_for("proxy worker ready", 2)
        yield running
    finally:
        workers = running.workers() if proc.poll() is None else []
        proc.kill()
        proc.wait()
        for pid in workers:
            _gone(pid)


def _gone(pid: int, timeout: float = 5) -> None:
    """``pid`` ended (and reaped: not even a zombie is left)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still there"
        time.sleep(0.02)


def _connections(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        dict(labels)["process"]: value
        for (name, labels), value in metrics.items()
        if name == "membrane_proxy_connections_total"
    }


def test_every_process_answers_and_the_leader_reports_for_all(proxy: Proxy) -> None:
    workers = proxy.workers()
    assert len(workers) == 2, workers
    # each process alone: the others stopped, so nobody else can take the connections
    everyone = [proxy.proc.pid, *workers]
    for serving in everyone:
        for pid in everyone:
            if pid != serving:
                os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                assert proxy.ask().startswith(b"HTTP/1.1 400 Bad Request"), serving
        finally:
            for pid in everyone:
                os.kill(pid, signal.SIGCONT)

    deadline = time.monotonic() + 10
    while _connections(proxy.metrics()) != {"0": 5, "1": 5, "2": 5}:
        assert time.monotonic() < deadline, proxy.metrics()
        time.sleep(0.1)


def test_a_worker_ended_stops_the_whole_proxy(proxy: Proxy) -> None:
    killed, other = proxy.workers()
    os.kill(killed, signal.SIGKILL)
    assert proxy.proc.wait(timeout=15) == 1
    _gone(other)  # it died with its leader
    (ended,) = [
        line for line in proxy.lines() if str(line.get("event")).startswith("a proxy worker")
    ]
    assert ended["how"] == "killed by SIGKILL" and ended["pid"] == killed, ended


def test_the_leader_killed_takes_its_workers_and_frees_the_port(proxy: Proxy) -> None:
    workers = proxy.workers()
    os.kill(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait(timeout=5)
    for pid in workers:
        _gone(pid)

    def refused() -> bool:
        try:
            proxy.ask()
        except ConnectionRefusedError:
            return True
        return False

    assert refused()  # nothing listens: the datapath would drop (reason 178)


def test_sigterm_stops_every_process_cleanly(proxy: Proxy) -> None:
    workers = proxy.workers()
    os.kill(proxy.proc.pid, signal.SIGTERM)
    assert proxy.proc.wait(timeout=15) == 0
    for pid in workers:
        _gone(pid)
    assert not [line for line in proxy.lines() if line.get("level") == "error"], proxy.lines()
