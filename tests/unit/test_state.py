"""The local cluster's state directory: who is the supervisor, and what stays private."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from membrane.servers import write_secret
from membrane.state import ClusterInfo, StateDir


def test_a_stale_pid_file_naming_another_process_is_ignored(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.run.mkdir()
    state.pid_file.write_text(str(os.getpid()))  # alive, but not a supervisor
    assert state.supervisor_pid() is None
    state.pid_file.write_text("999999999")  # no such process
    assert state.supervisor_pid() is None


def test_the_supervisor_is_recognised_by_its_command_line(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.run.mkdir()
    # a stand-in with the supervisor's command line: python -c ... membrane.supervisor ROOT
    fake = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(30)",
            "membrane.supervisor",
            str(state.root),
        ]
    )
    try:
        state.pid_file.write_text(str(fake.pid))
        # on a loaded machine the child's command line can show up a moment after Popen returns
        deadline = time.monotonic() + 5
        while state.supervisor_pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.supervisor_pid() == fake.pid
        other = StateDir(tmp_path / "elsewhere")
        other.run.mkdir(parents=True)
        other.pid_file.write_text(str(fake.pid))
        assert other.supervisor_pid() is None  # a supervisor, but of another cluster
    finally:
        fake.kill()
        fake.wait()


def test_credentials_are_written_private_from_the_first_byte(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.write_cluster(ClusterInfo(nats_url="nats://u:secret@h:1", redis_url="redis://h"))
    assert state.cluster_file.stat().st_mode & 0o777 == 0o600
    assert state.read_cluster() == ClusterInfo(
        nats_url="nats://u:secret@h:1", redis_url="redis://h"
    )
    loose = tmp_path / "loose"
    loose.write_text("old")
    loose.chmod(0o644)
    write_secret(loose, "new")
    assert loose.stat().st_mode & 0o777 == 0o600 and loose.read_text() == "new"
