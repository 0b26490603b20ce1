"""How many processes the node's proxy serves from (services/proxy/prefork.py)."""

from __future__ import annotations

import os

from services.proxy import prefork


def test_as_many_as_asked_else_one_per_cpu_up_to_four() -> None:
    assert prefork.process_count(1) == 1
    assert prefork.process_count(6) == 6  # asked: more than the default's cap is allowed
    cpus = len(os.sched_getaffinity(0))
    assert prefork.process_count(0) == min(cpus, prefork.MOST_BY_DEFAULT) >= 1
    assert prefork.MOST_BY_DEFAULT == 4
