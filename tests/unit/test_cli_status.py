"""``membrane status``'s monitor part: replicas named as the supervisor named them."""

from __future__ import annotations

from membrane.cli_status import monitor_entry
from shared.bus import ServiceInfo
from shared.flow_api import MonitorStatus

COUNTS = dict.fromkeys(
    (
        "ring_size",
        "ring_capacity",
        "flows_seen",
        "flows_lost",
        "malformed_batches",
        "identities",
        "endpoints",
        "policies",
        "rules",
        "services",
        "nodes",
    ),
    1,
)


def test_a_monitor_is_shown_by_its_replica_name_not_its_micro_id() -> None:
    info = ServiceInfo(
        name="membrane-monitor", id="yYTlS31t", version="0", metadata={"replica": "monitor-1"}
    )
    entry = monitor_entry(info, MonitorStatus(replica="yYTlS31t", **COUNTS))
    assert (entry["replica"], entry["id"], entry["flows_seen"]) == ("monitor-1", "yYTlS31t", 1)
    failed = monitor_entry(info, None, "timed out")
    assert (failed["replica"], failed["error"]) == ("monitor-1", "timed out")


def test_a_monitor_without_a_replica_name_is_shown_by_its_id() -> None:
    info = ServiceInfo(
        name="membrane-monitor", id="yYTlS31t", version="0", metadata={"replica": ""}
    )
    assert monitor_entry(info, MonitorStatus(replica="yYTlS31t", **COUNTS))["replica"] == "yYTlS31t"
