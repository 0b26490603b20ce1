"""Every control-plane service honours --log-format and --log-level (shared/startup.py).

Each runs as ``membrane run <service>`` would run it, against real NATS and Redis: with
``--log-format json`` every line it writes is a JSON object naming the service, and
``--log-level warning`` silences its "ready" line. (The datapath agent, which needs a node,
is covered by tests/e2e/test_datapath.py reading the local cluster's logs; the k8s bridge
needs a Kubernetes API and takes its logging from the same start-up.)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import selectors
import signal
import socket
import subprocess
import time

import pytest

from membrane.servers import ServerProcess
from tests.conftest import membrane_command

SERVICES = ("identity", "policy", "lb", "monitor", "proxy", "ui")


def run_until_ready(args: list[str], env: dict[str, str], timeout: float = 60) -> list[str]:
    """Start a service, read its stderr until its "... ready" line (or ``timeout``), stop it
    with SIGTERM, and return every line it wrote."""
    proc = subprocess.Popen(
        membrane_command("run", *args),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline and not any("ready" in line for line in lines):
            if sel.select(timeout=0.5):
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line.rstrip("\n"))
    proc.send_signal(signal.SIGTERM)
    try:
        _, rest = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # how it stops is not this test's business
        proc.kill()
        _, rest = proc.communicate()
    lines.extend(rest.splitlines())
    return [line for line in lines if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def extra_args(service: str) -> list[str]:
    if service != "proxy":
        return []
    if os.geteuid() != 0:
        pytest.skip("the proxy's transparent listener needs root")
    # a proxy in the root namespace: its listener on a free port, for a node nobody runs
    return ["--node", "log-flags", "--proxy-port", str(free_port())]


def env_of(nats: ServerProcess, redis: ServerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBRANE_")}
    env.update(MEMBRANE_NATS_URL=nats.url, MEMBRANE_REDIS_URL=redis.url)
    return env


@pytest.mark.parametrize("service", SERVICES)
def test_json_lines_at_the_level_asked(
    service: str, nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    env = env_of(nats_server, redis_server)
    extra = extra_args(service)
    lines = run_until_ready([service, *extra, "--log-format", "json", "--log-level", "debug"], env)
    assert any("ready" in line for line in lines), f"{service} never said it was ready: {lines}"
    for line in lines:
        record = json.loads(line)  # the console format would not parse
        assert record["service"] == service, line


def test_warning_level_silences_debug_and_info(
    nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    # A quiet service never says it is ready, so each run lasts the whole 6 s: the six run
    # side by side (one wait instead of six).
    env = env_of(nats_server, redis_server)
    args = {
        s: [s, *extra_args(s), "--log-format", "json", "--log-level", "warning"] for s in SERVICES
    }
    with concurrent.futures.ThreadPoolExecutor(len(SERVICES)) as pool:
        runs = {s: pool.submit(run_until_ready, a, env, 6) for s, a in args.items()}
        quiet = {s: run.result() for s, run in runs.items()}
    for service, lines in quiet.items():
        loud = [line for line in lines if json.loads(line)["level"] in ("debug", "info")]
        assert not loud, (service, loud)
