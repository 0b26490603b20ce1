"""The agent's datapath metrics, read from the kernel at scrape time (no per-packet Python).

Packets and bytes by reason and direction come from the per-CPU ``metrics`` array the BPF
programs count into; lost events from ``lost_events``; map pressure (entries / capacity) from
the maps themselves, counted at most every ``PRESSURE_EVERY_S`` since a count walks the map.
Label sets are bounded: a reason is one of Cilium's ~80 names, a direction one of two.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.datapath.maps import percpu_sum
from shared.reasons import reason_name

PRESSURE_EVERY_S: Final = 15.0
DIRECTIONS: Final = {1: "ingress", 2: "egress"}

POLICY_IMPLEMENTATION = Histogram(
    "membrane_datapath_policy_implementation_seconds",
    "From a resolved policy change arriving at the agent to its map entries written",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)


class DatapathCollector(Collector):
    def __init__(self, datapath: Any) -> None:
        self._datapath = datapath
        self._lock = threading.Lock()  # scrapes may overlap
        self._pressure: list[tuple[str, int, int]] = []
        self._pressure_read = -PRESSURE_EVERY_S

    def collect(self) -> Iterator[Any]:
        packets = CounterMetricFamily(
            "membrane_datapath_packets",
            "Packets the datapath forwarded (reason Forwarded) or dropped, by reason and direction",
            labels=["reason", "direction"],
        )
        nbytes = CounterMetricFamily(
            "membrane_datapath_bytes",
            "Bytes the datapath forwarded or dropped, by reason and direction",
            labels=["reason", "direction"],
        )
        for index, values in self._datapath.metrics.items():
            count, size = percpu_sum(values, ("packets", "bytes"))
            if not count:
                continue
            reason, direction = divmod(int(index.value), 4)
            labels = [
                "Forwarded" if reason == 0 else reason_name(reason),
                DIRECTIONS.get(direction, "unknown"),
            ]
            packets.add_metric(labels, count)
            nbytes.add_metric(labels, size)
        yield packets
        yield nbytes
        lost = CounterMetricFamily(
            "membrane_datapath_lost_events",
            "Flow events the BPF ring buffer could not take (it was full)",
        )
        lost.add_metric([], self._datapath.lost_event_count())
        yield lost
        entries = GaugeMetricFamily(
            "membrane_datapath_map_entries", "Entries in a BPF map", labels=["map"]
        )
        capacity = GaugeMetricFamily(
            "membrane_datapath_map_capacity", "Capacity of a BPF map", labels=["map"]
        )
        for name, used, size in self._map_pressure():
            entries.add_metric([name], used)
            capacity.add_metric([name], size)
        yield entries
        yield capacity

    def _map_pressure(self) -> list[tuple[str, int, int]]:
        with self._lock:
            now = time.monotonic()
            if now - self._pressure_read >= PRESSURE_EVERY_S:
                self._pressure = [
                    (name, _count(table), int(table.max_entries))
                    for name, table in self._tables().items()
                ]
                self._pressure_read = now
            return self._pressure

    def _tables(self) -> dict[str, Any]:
        d = self._datapath
        return {
            "endpoints": d.endpoints.table,
            "lxc": d.lxc.table,
            "ipcache": d.ipcache.table,
            "policy": d.policy.table,
            "ct": d.ct,
            "ct_new": d.ct_new,
        }


def _count(table: Any) -> int:
    return sum(1 for _ in table)
