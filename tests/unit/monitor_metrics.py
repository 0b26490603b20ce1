"""What a call moves in the monitor's counters (shared by the metrics differential tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def counters() -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for metric in REGISTRY.collect()
        if metric.name.startswith("membrane_monitor_")
        for s in metric.samples
        if s.name.endswith("_total")
    }


def moved(count: Callable[[], None]) -> Samples:
    """Every ``membrane_monitor_*_total`` sample ``count()`` changed, by how much."""
    before = counters()
    count()
    return {k: v - before.get(k, 0.0) for k, v in counters().items() if v != before.get(k)}
