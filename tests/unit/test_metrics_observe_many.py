"""shared.metrics.observe_many: the same histogram as observe() value by value."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from shared import metrics

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_counts_as_observe_does() -> None:
    rng = random.Random(12)
    values = [rng.choice((0.0, 0.0005, 0.001, 5.0, 7.5)) for _ in range(50)]
    values += [rng.expovariate(200) for _ in range(2000)]
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("t", "t", ["p"], buckets=BUCKETS, registry=one)
    by_many = Histogram("t", "t", ["p"], buckets=BUCKETS, registry=many)
    for value in values:
        by_one.labels("http").observe(value)
    metrics.observe_many(by_many.labels("http"), values[:1000])
    metrics.observe_many(by_many.labels("http"), values[1000:])
    metrics.observe_many(by_many.labels("http"), [])
    expected, got = _samples(one), _samples(many)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-9, key


def test_without_the_internals_it_observes_one_by_one() -> None:
    seen: list[float] = []

    class Plain:
        def observe(self, value: float) -> None:
            seen.append(value)

    metrics.observe_many(Plain(), [0.1, 0.2])
    assert seen == [0.1, 0.2]
