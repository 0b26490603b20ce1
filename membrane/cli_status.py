"""The cluster part of ``membrane status``: nodes, object counts, monitor and map pressure.

Everything comes over the bus (KV buckets, request/reply, NATS micro metadata) plus each
agent's /metrics endpoint for map pressure, so it works against any cluster the CLI can reach.
A part that cannot be read shows as ``-``; status never fails because one part is down.
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from prometheus_client.parser import text_string_to_metric_families

from membrane import output
from membrane.client import policy
from shared import services_bucket, subjects
from shared.bus import Bus, ServiceInfo
from shared.errors import MembraneError
from shared.flow_api import MonitorStatus
from shared.messages import Empty

SCRAPE_TIMEOUT_S = 2.0


async def _count_keys(bus: Bus, bucket: str) -> int | None:
    """Keys in a bucket (services: the services its shards hold); None when it does not
    exist (the CLI never creates buckets)."""
    try:
        kv = await bus.js.key_value(bucket)
        found = await Bus.snapshot(kv)
        if bucket == subjects.KV_SERVICES:
            return services_bucket.count_services(found)
        return len(found)
    except nats.js.errors.BucketNotFoundError:
        return None
    except (nats.errors.Error, TimeoutError):
        return None


def _scrape_pressure(address: str) -> dict[str, list[int]]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S).read()
    pressure: dict[str, list[int]] = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name in ("membrane_datapath_map_entries", "membrane_datapath_map_capacity"):
            slot = 0 if family.name.endswith("entries") else 1
            for sample in family.samples:
                pressure.setdefault(sample.labels["map"], [0, 0])[slot] = int(sample.value)
    return pressure


async def _pressure(agents: list[ServiceInfo]) -> dict[str, dict[str, list[int]] | None]:
    async def one(info: ServiceInfo) -> dict[str, list[int]] | None:
        address = info.metadata.get("metrics", "")
        if not address:
            return None
        try:
            return await asyncio.to_thread(_scrape_pressure, address)
        except (OSError, ValueError):
            return None

    results = await asyncio.gather(*(one(a) for a in agents))
    return {a.metadata.get("node", a.id): r for a, r in zip(agents, results, strict=True)}


def monitor_entry(
    info: ServiceInfo, status: MonitorStatus | None, error: str = ""
) -> dict[str, Any]:
    """One monitor replica in ``status``: named as the supervisor named it (``monitor-1``, as
    every other replica is shown), not by the NATS micro id its MonitorStatus carries."""
    name = info.metadata.get("replica") or info.id
    if status is None:
        return {"replica": name, "id": info.id, "error": error}
    return {**msgspec.to_builtins(status), "replica": name, "id": info.id}


async def _monitors(bus: Bus, replicas: list[ServiceInfo]) -> list[dict[str, Any]]:
    async def one(info: ServiceInfo) -> dict[str, Any]:
        try:
            status = await bus.request(
                subjects.monitor_status(info.id), Empty(), MonitorStatus, timeout=2
            )
        except MembraneError as exc:
            return monitor_entry(info, None, str(exc))
        return monitor_entry(info, status)

    return list(await asyncio.gather(*(one(r) for r in replicas)))


async def _policies(bus: Bus) -> int | None:
    try:
        return len(await policy.list_policies(bus, timeout=2))
    except MembraneError:
        return None


async def gather(bus: Bus, found: list[ServiceInfo]) -> dict[str, Any]:
    """Counts, monitor counters and map pressure; ``found``: the replicas discovered."""
    agents = [i for i in found if i.name == subjects.DATAPATH_SERVICE]
    monitors = [i for i in found if i.name == subjects.MONITOR_SERVICE]
    identities, endpoints, services, policies, monitor, pressure = await asyncio.gather(
        _count_keys(bus, subjects.KV_IDENTITIES),
        _count_keys(bus, subjects.KV_ENDPOINTS),
        _count_keys(bus, subjects.KV_SERVICES),
        _policies(bus),
        _monitors(bus, monitors),
        _pressure(agents),
    )
    # nodes, their health and the latency matrix: membrane.cli_nodes
    return {
        "counts": {
            "identities": identities,
            "endpoints": endpoints,
            "policies": policies,
            "services": services,
        },
        "monitor": monitor,
        "map_pressure": pressure,
    }


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def print_cluster(summary: dict[str, Any]) -> None:
    """The cluster part of ``membrane status`` (:func:`gather`), as tables."""
    print()
    counts = summary["counts"]
    print(
        output.table(
            ["IDENTITIES", "ENDPOINTS", "POLICIES", "SERVICES"],
            [[_or_dash(counts[k]) for k in ("identities", "endpoints", "policies", "services")]],
        )
    )
    if summary["monitor"]:
        print()
        print(
            output.table(
                ["MONITOR", "FLOWS SEEN", "LOST", "MALFORMED", "RING"],
                [
                    [
                        m["replica"],
                        m.get("flows_seen", "-"),
                        m.get("flows_lost", "-"),
                        m.get("malformed_batches", "-"),
                        f"{m['ring_size']}/{m['ring_capacity']}" if "ring_size" in m else "-",
                    ]
                    for m in summary["monitor"]
                ],
            )
        )
    rows = []
    for node, maps in sorted(summary["map_pressure"].items()):
        if maps is None:
            rows.append([node, "-", "-", "-"])
            continue
        for name, (used, size) in sorted(maps.items()):
            rows.append(
                [node, name, f"{used}/{size}", f"{100 * used / size:.1f}%" if size else "-"]
            )
    if rows:
        print()
        print(output.table(["NODE", "MAP", "ENTRIES", "PRESSURE"], rows))
