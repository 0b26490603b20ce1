"""The services ``membrane run`` can start, and how the local cluster runs them.

A service's module is imported when its settings or entry point are asked for, not with this
registry: every CLI command reads the registry, and importing all five services (pyroute2,
Redis, the BPF loader) took a quarter of a second of each ``membrane`` invocation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shared import subjects


@dataclass(frozen=True)
class ServiceEntry:
    module: str  # defines run(settings) (or main(settings), see run) and the settings class
    settings_class: str
    micro_name: str
    default_replicas: int
    summary: str
    per_node: bool = False  # one instance per node (in its namespace), not replicas
    # needs a Kubernetes API server: the local cluster does not start it, status does not miss it
    kubernetes_only: bool = False

    @property
    def settings(self) -> type[Any]:
        return getattr(importlib.import_module(self.module), self.settings_class)  # type: ignore[no-any-return]

    @property
    def run(self) -> Callable[[Any], Coroutine[Any, Any, None]]:
        """What serves, given the settings: the module's ``main`` if it has one (work to do
        before the event loop exists, such as forking), else its ``run``."""
        module = importlib.import_module(self.module)
        return getattr(module, "main", module.run)  # type: ignore[no-any-return]


SERVICES: dict[str, ServiceEntry] = {
    "identity": ServiceEntry(
        module="services.identity.service",
        settings_class="IdentitySettings",
        micro_name=subjects.IDENTITY_SERVICE,
        default_replicas=2,
        summary="security identities from labels; cluster-pool IPAM",
    ),
    "policy": ServiceEntry(
        module="services.policy.service",
        settings_class="PolicySettings",
        micro_name=subjects.POLICY_SERVICE,
        default_replicas=1,
        summary="CiliumNetworkPolicy/NetworkPolicy resolved into per-identity entries",
    ),
    "monitor": ServiceEntry(
        module="services.monitor.service",
        settings_class="MonitorSettings",
        micro_name=subjects.MONITOR_SERVICE,
        default_replicas=1,
        summary="enriched flows, flow queries, metrics and event subscriptions",
    ),
    "ui": ServiceEntry(
        module="services.ui.service",
        settings_class="UISettings",
        micro_name=subjects.UI_SERVICE,
        default_replicas=1,
        summary="the web UI: service map, flows, nodes (`membrane ui` prints its URL)",
    ),
    "lb": ServiceEntry(
        module="services.lb.service",
        settings_class="LBSettings",
        micro_name=subjects.LB_SERVICE,
        default_replicas=1,
        summary="Services and EndpointSlices into frontends, backends and Maglev tables",
    ),
    "datapath": ServiceEntry(
        module="services.datapath.service",
        settings_class="DatapathSettings",
        micro_name=subjects.DATAPATH_SERVICE,
        default_replicas=0,
        summary="node agent: pods, BPF programs and maps, flows",
        per_node=True,
    ),
    "k8s": ServiceEntry(
        module="services.k8s.service",
        settings_class="K8sSettings",
        micro_name=subjects.K8S_SERVICE,
        default_replicas=0,
        summary="the Kubernetes bridge: API objects into membrane (leader-elected)",
        kubernetes_only=True,
    ),
    "proxy": ServiceEntry(
        module="services.proxy.service",
        settings_class="ProxySettings",
        micro_name=subjects.PROXY_SERVICE,
        default_replicas=0,
        summary="node L7 proxy: HTTP rules of the policy, per request",
        per_node=True,
    ),
}
