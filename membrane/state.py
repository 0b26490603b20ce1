"""Where the local cluster keeps its state, and how the CLI finds the cluster it talks to.

Layout of the state directory:

- ``cluster.json`` — addresses and credentials of NATS and Redis (mode 0600), kept across
  ``down``/``up`` so that identities persist;
- ``nats/``, ``redis/`` — their data (JetStream store, AOF);
- ``logs/<process>.log`` — one log per supervised process;
- ``run/`` — the supervisor's pid, plan and process table; exists only while the cluster runs.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network
from pathlib import Path

import msgspec

from membrane.servers import write_secret
from shared.errors import Unavailable

ENV_STATE_DIR = "MEMBRANE_STATE_DIR"

# underlay, cluster (pod) and service ranges of a default local cluster
DEFAULT_RANGES = (
    IPv4Network("172.31.0.0/24"),
    IPv4Network("10.244.0.0/16"),
    IPv4Network("10.96.0.0/12"),
)


class ClusterInfo(msgspec.Struct, kw_only=True):
    """What ``membrane up`` started and how to reach it (``cluster.json``, 0600)."""

    nats_url: str
    redis_url: str
    nats_external: bool = False
    redis_external: bool = False
    nats_port: int = 0
    redis_port: int = 0
    nats_password: str = ""
    redis_password: str = ""
    # the nodes: network namespaces on an underlay bridge, each with its datapath agent
    name: str = "membrane"
    nodes: int = 0
    underlay_cidr: str = "172.31.0.0/24"
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    routing: str = "tunnel"  # pod traffic between nodes: tunnel (VXLAN) or native
    # NATS and Redis speak TLS only, with the CA and certificate in <state>/tls (membrane/tls.py)
    tls: bool = False
    # the web UI's port on loopback: fixed for the cluster, so a restarted UI is where the
    # browser reconnects to
    ui_port: int = 0


class ProcessState(msgspec.Struct, kw_only=True):
    name: str
    pid: int
    restarts: int
    started_at: float
    log: str
    running: bool = True
    held: bool = False  # stopped on request (``down`` stops the agents first), not restarted


class ProcessSpec(msgspec.Struct, kw_only=True):
    name: str
    command: list[str]
    env: dict[str, str] = {}
    ready_port: int = 0
    ready_host: str = "127.0.0.1"
    node: str = ""  # the node a datapath agent serves; ``down`` stops these first


class Plan(msgspec.Struct, kw_only=True):
    """What the supervisor runs, in start order; ``ready_port`` gates the next process."""

    processes: list[ProcessSpec]


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/membrane")
    return Path.home() / ".local" / "state" / "membrane"


class StateDir:
    def __init__(self, root: Path) -> None:
        # absolute, because the supervisor is recognised by the path on its command line
        self.root = root.absolute()
        self.run = root / "run"
        self.logs = root / "logs"
        self.cluster_file = root / "cluster.json"
        self.pid_file = self.run / "supervisor.pid"
        self.plan_file = self.run / "plan.json"
        self.status_file = self.run / "processes.json"

    def read_cluster(self) -> ClusterInfo | None:
        try:
            return msgspec.json.decode(self.cluster_file.read_bytes(), type=ClusterInfo)
        except FileNotFoundError:
            return None

    def write_cluster(self, info: ClusterInfo) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_secret(self.cluster_file, msgspec.json.format(msgspec.json.encode(info)))

    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid, or None (a stale pid file counts as none)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        # a pid file left by a killed supervisor may name a process that reuses the pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if b"membrane.supervisor" not in cmdline or str(self.root).encode() not in cmdline:
            return None
        return pid

    def processes(self) -> list[ProcessState]:
        try:
            return msgspec.json.decode(self.status_file.read_bytes(), type=list[ProcessState])
        except (FileNotFoundError, msgspec.DecodeError):
            return []


def resolve_nats_url(flag: str | None, state: StateDir) -> str:
    """The NATS URL to use: the flag, else MEMBRANE_NATS_URL, else the local cluster's."""
    if flag:
        return flag
    env = os.environ.get("MEMBRANE_NATS_URL")
    if env:
        return env
    info = state.read_cluster()
    if info is None or (state.supervisor_pid() is None and not info.nats_external):
        raise Unavailable(
            f"no local cluster is running (state directory {state.root}); start one with "
            "`membrane up`, or point at NATS with --nats-url or MEMBRANE_NATS_URL"
        )
    return info.nats_url
