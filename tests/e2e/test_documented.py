"""Every concrete command line of the documentation, run as written against a cluster, in
document order (tests/documented.py extracts them; the unit tests check that all of them and
every synopsis parse). A command that needs state no test cluster has (`down`, `run`,
`--follow`, a file the reader writes) is left to the parse check. Also what `up` says when the
cluster already runs, and that `status` right after `up` shows no healthy node unreachable."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import membrane_command
from tests.documented import REPO, Command, concrete
from tests.e2e.cluster import Cluster


def needs_other_state(command: Command) -> str:
    """Why a documented command is only parsed, or "" when it runs."""
    argv = command.argv
    if argv[0] in ("down", "run") or (argv[0] == "up" and "--nodes" not in argv):
        return "it starts or stops services"
    if ("-f" in argv and argv[0] == "observe") or "--follow" in argv:
        return "it follows until interrupted"
    if "--open" in argv:
        return "it starts a browser"
    if "-f" in argv and argv[0] != "observe":
        path = argv[argv.index("-f") + 1]
        if not (REPO / path).exists():
            return f"{path} is the reader's file"
    return ""


def test_status_right_after_up_and_up_again(cluster: Cluster) -> None:
    status = cluster.run("status").stdout
    assert "UNREACHABLE" not in status, status
    health = cluster.json("status")["health"]
    assert health and all(p["reachable"] for h in health for p in h["peers"]), health
    again = cluster.run("up", "--nodes", "2")
    assert "already up" in again.stdout
    more = cluster.run("up", "--nodes", "3", check=False)
    assert more.returncode == 1 and "--nodes 3 (it runs 2)" in more.stderr, more.stderr
    assert "membrane down" in more.stderr and len(cluster.json("get", "nodes")) == 2
    native = cluster.run("up", "--routing", "native", check=False)
    assert native.returncode == 1 and "--routing native (it runs tunnel)" in native.stderr


def test_documented_commands_run_as_written(cluster: Cluster) -> None:
    ran = []
    for command in concrete():
        if needs_other_state(command):
            continue
        result = subprocess.run(
            membrane_command(*command.argv),
            env=cluster.env(),
            cwd=REPO,  # the docs' paths are the checkout's
            capture_output=True,
            text=True,
            timeout=60,
        )
        shown = f"{command.where}: membrane {' '.join(command.argv)}"
        assert result.returncode == command.exit_code, (
            f"{shown} exited {result.returncode}, the text says {command.exit_code}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
        assert "Traceback" not in result.stderr, f"{shown}:\n{result.stderr}"
        ran.append(command.where)
    assert len(ran) >= 20, ran


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["down"], "it starts or stops services"),
        (["observe", "-f", "--not", "--verdict", "FORWARDED"], "it follows until interrupted"),
        (["policy", "diff", "-f", "lockdown.yaml"], "lockdown.yaml is the reader's file"),
        (["apply", "-f", "examples/empire-only.yaml"], ""),
    ],
)
def test_what_is_only_parsed(argv: list[str], why: str) -> None:
    assert needs_other_state(Command("x", argv)) == why
