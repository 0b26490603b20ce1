"""The services ``membrane run`` can start, and how the local cluster runs them."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from services.datapath import service as datapath
from services.identity import service as identity
from services.lb import service as lb
from services.monitor import service as monitor
from services.policy import service as policy
from shared import subjects


@dataclass(frozen=True)
class ServiceEntry:
    settings: type[Any]
    run: Callable[[Any], Coroutine[Any, Any, None]]
    micro_name: str
    default_replicas: int
    summary: str
    per_node: bool = False  # one instance per node (in its namespace), not replicas


SERVICES: dict[str, ServiceEntry] = {
    "identity": ServiceEntry(
        settings=identity.IdentitySettings,
        run=identity.run,
        micro_name=subjects.IDENTITY_SERVICE,
        default_replicas=2,
        summary="security identities from labels; cluster-pool IPAM",
    ),
    "policy": ServiceEntry(
        settings=policy.PolicySettings,
        run=policy.run,
        micro_name=subjects.POLICY_SERVICE,
        default_replicas=1,
        summary="CiliumNetworkPolicy/NetworkPolicy resolved into per-identity entries",
    ),
    "monitor": ServiceEntry(
        settings=monitor.MonitorSettings,
        run=monitor.run,
        micro_name=subjects.MONITOR_SERVICE,
        default_replicas=1,
        summary="enriched flows, flow queries, metrics and event subscriptions",
    ),
    "lb": ServiceEntry(
        settings=lb.LBSettings,
        run=lb.run,
        micro_name=subjects.LB_SERVICE,
        default_replicas=1,
        summary="Services and EndpointSlices into frontends, backends and Maglev tables",
    ),
    "datapath": ServiceEntry(
        settings=datapath.DatapathSettings,
        run=datapath.run,
        micro_name=subjects.DATAPATH_SERVICE,
        default_replicas=0,
        summary="node agent: pods, BPF programs and maps, flows",
        per_node=True,
    ),
}
