"""Processes that share one log file (the proxy's leader and its workers write to the stderr
the supervisor gave them) never run two JSON lines together: each line goes out in one write,
its newline with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

WRITER = """
import sys
from shared import log
log.configure("info", "json", service="t")
logger = log.get("t")
for i in range(3000):
    logger.info("line", process=int(sys.argv[1]), i=i, pad="x" * 100)
"""


def test_concurrent_writers_to_one_file_keep_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    with path.open("ab") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(n)], cwd=REPO, stderr=shared)
            for n in range(3)
        ]
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    lines = path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # a line holding two objects fails here
    assert len(parsed) == 9000
    for n in range(3):
        assert [p["i"] for p in parsed if p["process"] == n] == list(range(3000))
