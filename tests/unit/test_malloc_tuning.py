"""The allocator settings of long-running services are ones glibc takes (a threshold above its
limit is refused silently: mallopt returns 0), and they do what they are for: a process
building and dropping 600 KiB buffers stops mapping and zeroing fresh pages for each."""

from __future__ import annotations

import subprocess
import sys

from shared import malloc_tuning

CHURN = """
import resource, sys
from shared import malloc_tuning
if sys.argv[1] == "tuned":
    assert malloc_tuning.tune_for_service()
lines = [b"x" * 800 + b"\\n" for _ in range(768)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    data = b"".join(lines)
    out = b"".join([data[i : i + 131072] for i in range(0, len(data), 131072)])
    del data, out
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_glibc_takes_the_settings() -> None:
    assert malloc_tuning.tune_for_service() is True


def test_large_buffers_stop_costing_fresh_pages() -> None:
    plain, tuned = _page_faults("plain"), _page_faults("tuned")
    # as glibc starts: each 600 KiB buffer is new pages (about 150 faults each, 2,000 times)
    assert plain > 100_000, plain
    assert tuned < plain / 20, (plain, tuned)
