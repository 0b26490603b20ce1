"""The CLI as a user runs it, against `membrane up` in a state directory of the test's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.servers import ServerProcess, port_open
from membrane.state import StateDir
from tests.conftest import membrane_command

pytestmark = pytest.mark.e2e


def membrane(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMBRANE_STATE_DIR": str(state)}
    env.pop("MEMBRANE_NATS_URL", None)
    result = subprocess.run(
        membrane_command(*args), env=env, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"membrane {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "state"
    yield root
    membrane(root, "down", check=False)


def test_up_allocate_down_up_again(state: Path) -> None:
    up = membrane(state, "up", "--nodes", "0", "--identity-replicas", "2")
    assert "cluster is up" in up.stdout
    assert "identity: 2 replica(s) ready" in up.stdout

    first = membrane(state, "identity", "allocate", "app=web")
    second = membrane(state, "identity", "allocate", "app=web", "pod-template-hash=abc")
    number, kind, labels = first.stdout.split("\t")
    assert int(number) >= 256 and kind == "new" and labels.strip() == "k8s:app=web"
    assert second.stdout.split("\t")[:2] == [number, "existing"]

    bad = membrane(state, "identity", "allocate", "app=-bad", check=False)
    assert bad.returncode == 1
    assert "labels['app=-bad']" in bad.stderr and "Traceback" not in bad.stderr

    # lists are {"items": [...]} and one object is itself, as kubectl prints them (issue 21:
    # this test read a bare list, and a one-element list from get)
    listed = json.loads(membrane(state, "identity", "list", "-o", "json").stdout)["items"]
    assert {"id": int(number), "kind": "cluster", "labels": ["k8s:app=web"], "v": 1} in listed
    assert {i["id"] for i in listed if i["kind"] == "reserved"} == set(range(1, 9))
    got = json.loads(membrane(state, "identity", "get", number, "-o", "json").stdout)
    assert got["labels"] == ["k8s:app=web"]
    missing = membrane(state, "identity", "get", "60000", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr

    secrets = ("cluster.json", "run/plan.json", "nats/nats.conf", "redis/redis.conf", "tls")
    for secret in (*secrets, "tls/ca-key.pem", "tls/server-key.pem"):
        assert (state / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    # TLS by default, every service verifying the cluster's CA (tests/integration/test_tls.py)
    info = StateDir(state).read_cluster()
    assert info is not None and info.tls
    ca = f"{state / 'tls' / 'ca.pem'}"
    assert info.nats_url.startswith("tls://") and info.nats_url.endswith(f"?ca={ca}")
    assert info.redis_url.startswith("rediss://") and info.redis_url.endswith(f"ssl_ca_certs={ca}")

    status = json.loads(membrane(state, "status", "-o", "json").stdout)
    replicas = [s for s in status["services"] if s["name"] == "membrane-identity"]
    assert len(replicas) == 2
    table = membrane(state, "status").stdout
    assert "membrane-identity" in table and "identity-1" in table
    # every replica is shown by the name the supervisor gave it, not by its NATS micro id
    # (the UI announced no name and was listed by id)
    supervised = {p.name for p in StateDir(state).processes()}
    unnamed = [s for s in status["services"] if s["metadata"].get("replica") not in supervised]
    assert not unnamed, unnamed

    # the supervisor restarts a crashed replica
    processes = StateDir(state).processes()
    victim = next(p for p in processes if p.name == "identity-1")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = {p.name: p for p in StateDir(state).processes()}
        if now["identity-1"].restarts >= 1 and now["identity-1"].running:
            break
        assert time.monotonic() < deadline, "identity-1 was not restarted"
        time.sleep(0.2)

    info = StateDir(state).read_cluster()
    assert info is not None
    pids = [p.pid for p in StateDir(state).processes()]
    down = membrane(state, "down")
    assert "stopped" in down.stdout
    assert not any(alive(pid) for pid in pids), "a process survived `membrane down`"
    assert not (state / "run").exists()
    assert not port_open("127.0.0.1", info.nats_port)
    assert not port_open("127.0.0.1", info.redis_port)
    assert "not running" in membrane(state, "down").stdout  # idempotent

    # identities persist across down/up (Redis AOF in the state directory)
    membrane(state, "up", "--nodes", "0", "--identity-replicas", "1")
    again = membrane(state, "identity", "allocate", "app=web")
    assert again.stdout.split("\t")[:2] == [number, "existing"]
    membrane(state, "down", "--purge")
    assert not state.exists()


def test_commands_without_a_cluster_say_what_to_do(tmp_path: Path) -> None:
    result = membrane(tmp_path / "none", "identity", "list", check=False)
    assert result.returncode == 1
    assert "no local cluster is running" in result.stderr and "membrane up" in result.stderr
    unreachable = membrane(
        tmp_path / "none",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--timeout",
        "1",
        "identity",
        "list",
        check=False,
    )
    assert unreachable.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in unreachable.stderr


def test_a_wrong_nats_password_is_named(nats_server: ServerProcess, tmp_path: Path) -> None:
    url = f"nats://membrane:wrong@127.0.0.1:{nats_server.port}"
    result = membrane(tmp_path, "--nats-url", url, "--timeout", "3", "status", check=False)
    assert result.returncode == 1
    assert "Authorization Violation" in result.stderr
    assert "wrong" not in result.stderr  # the password is never printed
