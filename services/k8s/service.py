"""The k8s bridge's face: a Lease decides who writes, reflectors feed the apply paths.

Every replica registers on NATS (``membrane.k8s.status``) and competes for the Lease; only the
holder runs the reflectors (one per watched kind) and so writes to membrane. A replica that
loses the Lease stops its reflectors at once; the next holder lists everything again, applies
what differs and deletes what is gone (objects deleted while no bridge ran included: it lists
what membrane holds and compares). Until every first list is applied the leader reports
``synced: false`` per kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket

from services.k8s.kubeclient import WATCHED, KubeClient
from services.k8s.leader import LeaderElector, LeaseConfig
from services.k8s.reflector import Reflector
from services.k8s.resync import forget_vanished
from services.k8s.sink import Sink
from shared import __version__, log, startup, subjects
from shared.bus import Bus, redact
from shared.config import CommonSettings, env_name, require_at_least, setting
from shared.errors import InvalidArgument
from shared.messages import Empty, K8sStatus
from shared.runtime import TaskGroup, periodically


@dataclasses.dataclass(frozen=True)
class K8sSettings(CommonSettings):
    kubeconfig: str = setting("", "kubeconfig file (empty: the pod's service account)")
    lease_namespace: str = setting("membrane", "namespace of the leader-election Lease")
    lease_name: str = setting("membrane-k8s-bridge", "name of the leader-election Lease")
    lease_duration: float = setting(15.0, "seconds a Lease holds without renewal")
    renew_deadline: float = setting(10.0, "seconds a leader keeps trying to renew")
    retry_period: float = setting(2.0, "seconds between Lease attempts")
    watch_timeout: int = setting(300, "minimum timeoutSeconds of a watch (up to twice it)")

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise InvalidArgument(
                "need 0 < retry period < renew deadline < lease duration",
                field=env_name("renew_deadline"),
            )
        require_at_least(self, 1, "watch_timeout")


class Bridge:
    def __init__(self, bus: Bus, kube: KubeClient, settings: K8sSettings, replica: str) -> None:
        self.bus = bus
        self.kube = kube
        self.settings = settings
        self.replica = replica
        self.sink = Sink(bus, kube)
        self.reflectors: list[Reflector] = []
        self.tasks: TaskGroup | None = None
        self.elector = LeaderElector(
            kube,
            LeaseConfig(
                settings.lease_namespace,
                settings.lease_name,
                replica,
                settings.lease_duration,
                settings.renew_deadline,
                settings.retry_period,
            ),
            self.start_reflectors,
            self.stop_reflectors,
        )
        self.log = log.get("k8s", replica=replica)

    async def start_reflectors(self) -> None:
        self.reflectors = [
            Reflector(self.kube, kind, self.sink, min_watch_timeout=self.settings.watch_timeout)
            for kind in WATCHED
        ]
        tasks = TaskGroup()
        for reflector in self.reflectors:
            tasks.spawn(f"reflect-{reflector.kind.plural}", reflector.run)
            tasks.spawn(
                f"retry-{reflector.kind.plural}",
                lambda r=reflector: periodically(1.0, r.retry_pending),  # type: ignore[misc]
            )
        tasks.spawn("forget-vanished", self.forget_vanished)
        self.tasks = tasks

    async def forget_vanished(self) -> None:
        """Once every kind is synced: delete from membrane what the API server no longer has
        (deleted while no bridge was watching: a reflector only knows what it listed)."""
        for reflector in self.reflectors:
            await reflector.synced.wait()
        await forget_vanished(self.bus, {r.kind.kind: set(r.known) for r in self.reflectors})
        self.log.info("synced", kinds=len(self.reflectors))

    async def stop_reflectors(self) -> None:
        if self.tasks is not None:
            await self.tasks.close()
        self.tasks = None
        self.reflectors = []

    async def status(self, _: Empty) -> K8sStatus:
        return K8sStatus(
            replica=self.replica,
            leader=self.elector.leading,
            holder=self.elector.holder,
            synced={r.kind.kind: r.synced.is_set() for r in self.reflectors},
            objects={r.kind.kind: len(r.known) for r in self.reflectors},
            pending=sum(len(r.pending) for r in self.reflectors),
            rejected=self.sink.rejected,
        )

    async def register(self, metadata: dict[str, str]) -> None:
        micro = await self.bus.add_service(
            subjects.K8S_SERVICE,
            __version__,
            "the Kubernetes API into membrane",
            metadata,
            queue_group=subjects.K8S_QUEUE,
        )
        await micro.endpoint("status", subjects.K8S_STATUS, Empty, self.status)


async def run(settings: K8sSettings) -> None:
    # in a pod the host name is the pod's name: unique among the replicas, as a Lease needs
    replica = settings.replica or os.environ.get("POD_NAME") or socket.gethostname()
    started = await startup.start(settings, "k8s", replica=replica)
    bus = started.bus
    kube = await KubeClient.connect(settings.kubeconfig)
    bridge = Bridge(bus, kube, settings, replica)
    await bridge.register(started.metadata)
    election = asyncio.create_task(bridge.elector.run())
    started.log.info("k8s bridge ready", nats=redact(settings.nats_url), replica=replica)
    await started.until_signalled()
    election.cancel()
    await asyncio.gather(election, return_exceptions=True)
    await bridge.elector.release()
    await kube.close()
    await bus.close()
