"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does.

One replica holds the Lease and writes; the others wait. Every write of the Lease is guarded by
its resourceVersion, so two replicas racing for it cannot both win (the API server answers the
loser 409). Expiry is judged by this replica's own clock from when it last saw the record
change, never by comparing ``renewTime`` with the local clock (clock skew between nodes).
A leader that cannot renew within ``renew_deadline`` stops leading before its Lease can expire
for the others; on shutdown it releases the Lease so that a successor need not wait it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.k8s.kubeclient import ApiError, ConnectionLost, KubeClient
from shared import log

Obj = dict[str, Any]


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: KubeClient,
        config: LeaseConfig,
        on_started: Callable[[], Awaitable[None]],
        on_stopped: Callable[[], Awaitable[None]],
    ) -> None:
        self.kube = kube
        self.config = config
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.leading = False
        self.holder = ""
        self._observed: Obj | None = None  # the spec last read
        self._observed_at = 0.0  # monotonic time it was first seen
        self._renewed_at = 0.0
        self.log = log.get("k8s", lease=f"{config.namespace}/{config.name}")

    async def run(self) -> None:
        try:
            while True:
                acquired = await self.try_acquire_or_renew()
                now = time.monotonic()
                if acquired:
                    self._renewed_at = now
                    if not self.leading:
                        self.leading = True
                        self.log.info("leading", identity=self.config.identity)
                        await self.on_started()
                elif self.leading and now - self._renewed_at > self.config.renew_deadline:
                    self.leading = False
                    self.log.warning("lost the lease", holder=self.holder)
                    await self.on_stopped()
                await asyncio.sleep(self.config.retry_period)
        finally:
            if self.leading:
                self.leading = False
                await self.on_stopped()

    async def try_acquire_or_renew(self) -> bool:
        config = self.config
        try:
            lease = await self.kube.read_lease(config.namespace, config.name)
        except ApiError as exc:
            if exc.status != 404:
                self.log.warning("cannot read the lease", error=str(exc))
                return False
            return await self._write(None)
        except ConnectionLost as exc:
            self.log.warning("cannot read the lease", error=str(exc))
            return False
        spec = lease.get("spec") or {}
        if spec != self._observed:
            self._observed = spec
            self._observed_at = time.monotonic()
        self.holder = str(spec.get("holderIdentity") or "")
        duration = float(spec.get("leaseDurationSeconds") or config.lease_duration)
        expired = time.monotonic() > self._observed_at + duration
        if self.holder and self.holder != config.identity and not expired:
            return False
        return await self._write(lease)

    async def _write(self, current: Obj | None) -> bool:
        config = self.config
        now = _micro_time()
        spec: Obj = {
            "holderIdentity": config.identity,
            "leaseDurationSeconds": int(config.lease_duration),
            "renewTime": now,
        }
        body: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": config.name, "namespace": config.namespace},
            "spec": spec,
        }
        try:
            if current is None:
                spec.update(acquireTime=now, leaseTransitions=0)
                written = await self.kube.create_lease(config.namespace, body)
            else:
                old = current.get("spec") or {}
                transitions = int(old.get("leaseTransitions") or 0)
                if old.get("holderIdentity") == config.identity:
                    spec.update(acquireTime=old.get("acquireTime") or now)
                else:
                    spec.update(acquireTime=now)
                    transitions += 1
                spec["leaseTransitions"] = transitions
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                written = await self.kube.replace_lease(config.namespace, config.name, body)
        except ApiError as exc:
            if exc.status != 409:  # 409: another replica wrote first
                self.log.warning("cannot write the lease", error=str(exc))
            return False
        except ConnectionLost as exc:
            self.log.warning("cannot write the lease", error=str(exc))
            return False
        self._observed = written.get("spec") or {}
        self._observed_at = time.monotonic()
        self.holder = config.identity
        return True

    async def release(self) -> None:
        """Give the Lease up (shutdown), so that another replica takes over at once."""
        if not self.leading and self.holder != self.config.identity:
            return
        try:
            lease = await self.kube.read_lease(self.config.namespace, self.config.name)
            if (lease.get("spec") or {}).get("holderIdentity") != self.config.identity:
                return
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(),
            }
            await self.kube.replace_lease(self.config.namespace, self.config.name, lease)
        except (ApiError, ConnectionLost) as exc:
            self.log.warning("lease not released; it expires by itself", error=str(exc))
