"""A cluster as a user runs it (`membrane up --nodes 2` in a temp state dir), for the e2e tests.

The module-scoped ``cluster`` fixture (in ``conftest.py``) starts one per test module; tests
drive it through the CLI (:meth:`Cluster.run`) and run ``netprobe.py`` inside its pods.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from membrane.state import StateDir
from tests.conftest import membrane_command

T = TypeVar("T")
PROBE = Path(__file__).with_name("netprobe.py")


@dataclass
class Cluster:
    state: Path
    name: str
    nats_url: str
    node_count: int = 2
    # settings for every process `membrane up` starts (its environment is theirs)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return [f"{self.name}-node-{i}" for i in range(1, self.node_count + 1)]

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "MEMBRANE_STATE_DIR": str(self.state)}
        env.pop("MEMBRANE_NATS_URL", None)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            membrane_command(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"membrane {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        """The command's ``-o json``: one object, or a list's items (the CLI wraps lists in
        ``{"items": [...]}`` as kubectl does; tests/e2e/test_cli.py checks the wrapper)."""
        value = json.loads(self.run(*args, "-o", "json").stdout)
        return value["items"] if isinstance(value, dict) and set(value) == {"items"} else value

    def probe(self, pod: str, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return self.run(
            "pod",
            "exec",
            pod,
            "--",
            sys.executable,
            str(PROBE),
            *args,
            check=False,
            timeout=timeout,
        )

    def background(self, pod: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            membrane_command("pod", "exec", pod, "--", sys.executable, str(PROBE), *args),
            env=self.env(),
            stdin=subprocess.PIPE if args[-1] == "eof" else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline() if args[0] in ("serve", "count") and args[1] != "udp" else ""
        assert args[0] != "count" or line.strip() == "ready", line
        return proc


def started_in_pod(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until ``background``'s ``pod exec`` has become the probe itself: the CLI looked the pod
    up on the bus and exec'd through nsenter. A fault test that breaks the bus must not do
    so while the CLI is still reading it (under load that lookup takes seconds)."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + timeout
    while True:
        argv = cmdline.read_bytes().split(b"\0") if proc.poll() is None else []
        if argv and not argv[0].endswith(b"nsenter") and str(PROBE).encode() in argv[:2]:
            return
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{proc.args} not running after {timeout:g}s"
        time.sleep(0.05)


def counted(
    senders: list[subprocess.Popen[str]], counters: list[subprocess.Popen[str]]
) -> list[int]:
    """What each ``count PORT eof`` counter received once every sender has finished."""
    for sender in senders:
        sender.communicate(timeout=60)
    time.sleep(0.5)  # the last datagrams are in flight, within this machine
    return [int(counter.communicate("", timeout=30)[0].split()[-1]) for counter in counters]


def until(probe: Callable[[], T], what: str, timeout: float = 30) -> T:
    """``probe()``'s result once it stops raising AssertionError (its last one after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe()
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {what} within {timeout:g}s: {exc}") from exc
            time.sleep(0.3)


def free_octet() -> int:
    """X for a cluster's 172.31.X.0/24, 10.X.0.0/16 and 10.(X+1).0.0/16: none routed in the
    root namespace yet, and X from this pytest worker's share of 100..197 (`make test` runs
    two workers; an even X each, dealt out by worker, so two workers' clusters never overlap
    even when both choose at the same moment)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    mine = list(range(100, 198, 2))[int(worker.removeprefix("gw")) :: count]
    words = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout.split()
    free = [
        x
        for x in mine
        if not any(w.startswith((f"172.31.{x}.", f"10.{x}.", f"10.{x + 1}.")) for w in words)
    ]
    if not free:
        raise RuntimeError(f"no free address range among {mine} (left by an earlier run?)")
    return secrets.choice(free)


def up(cluster: Cluster, octet: int, routing: str = "", timeout: float = 240) -> None:
    """``membrane up`` of ``cluster`` on address ranges of its own (172.31.<octet>.0/24,
    10.<octet>.0.0/16 for pods, 10.<octet+1>.0.0/16 for services); its NATS URL learned."""
    args = ["up", "--name", cluster.name, "--nodes", str(cluster.node_count)]
    args += ["--identity-replicas", "1"]
    if routing:
        args += ["--routing", routing]
    args += ["--underlay-cidr", f"172.31.{octet}.0/24", "--cluster-cidr", f"10.{octet}.0.0/16"]
    args += ["--service-cidr", f"10.{octet + 1}.0.0/16"]
    try:
        cluster.run(*args, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{service_log_tails(cluster)}") from None
    info = StateDir(cluster.state).read_cluster()
    assert info is not None and info.routing == (routing or info.routing)
    cluster.nats_url = info.nats_url


def service_log_tails(cluster: Cluster, lines: int = 25) -> str:
    """The last lines of every service's log and the supervisor's: what a failed ``up`` in
    CI leaves to read once the machine and its temp directory are gone."""
    logs = StateDir(cluster.state).logs
    parts = []
    for path in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        if path.name.startswith(("nats-server", "redis-server")):
            continue
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no logs under {logs})"


def down_leaving_nothing(cluster: Cluster) -> None:
    """``membrane down --purge``, and no namespace, pin or link of the cluster is left."""
    down = cluster.run("down", "--purge", check=False, timeout=120)
    leftovers = [p.name for p in Path("/run/netns").glob(f"{cluster.name}*")]
    pins = list(Path("/sys/fs/bpf/membrane").glob(f"{cluster.name}*"))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert down.returncode == 0, down.stderr
    assert not leftovers, leftovers
    assert not pins, pins
    assert f"{cluster.name}-" not in links


def pod_info(cluster: Cluster, name: str) -> dict[str, Any]:
    pods = cluster.json("pod", "list", "-A")
    assert isinstance(pods, list)
    (found,) = [p for p in pods if p["name"] == name]
    return dict(found)


def create_pod(cluster: Cluster, name: str, labels: str, node: int = 1) -> dict[str, Any]:
    cluster.run("pod", "create", name, "--labels", labels, "--node", cluster.nodes[node - 1])
    return pod_info(cluster, name)
