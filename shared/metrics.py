"""Prometheus helpers: one /metrics HTTP endpoint per process, bounded label sets."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve /metrics on ``host:port`` in a background thread; returns the bound port.

    Port 0 binds any free port, which is what replicas started side by side want.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, at once: each value's bucket found by
    bisection, each bucket and the sum incremented once (a hot path keeps its values and
    hands them over now and then, instead of a lock and a bucket walk per value). A histogram
    without prometheus_client's internals (another version) is observed value by value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[min(bisect_left(bounds, value), len(bounds) - 1)] += 1
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    total.inc(math.fsum(values))
