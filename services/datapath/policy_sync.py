"""Keep the policy map and the endpoints' enforcement flags equal to the resolved policy.

Work is proportional to the change: a resolved-policy update for identity X recompiles only the
local endpoints that have identity X, and writes only the entries that differ from what is
installed. The installed state is read back from the map when the agent starts, so a restarted
agent adopts what its predecessor left and corrects only the difference.

Fail closed: when entries cannot be written (map full, kernel error), the endpoint is marked
``EP_POLICY_FAILED`` and the datapath denies its new connections until a retry succeeds.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, replace

from prometheus_client import Counter, Gauge

from services.datapath.maps import (
    EP_AUDIT_EGRESS,
    EP_AUDIT_INGRESS,
    EP_ENFORCE_EGRESS,
    EP_ENFORCE_INGRESS,
    EP_POLICY_FAILED,
    EndpointInfo,
)
from services.datapath.policy_compiler import PolicyKey, PolicyValue, compile_endpoint, diff
from shared import log
from shared.messages import ContainerPort, ResolvedPolicy

MAP_UPDATES = Counter(
    "membrane_datapath_policy_map_updates_total",
    "Policy map entries written or deleted, by operation",
    ["operation"],
)
POLICY_FAILURES = Counter(
    "membrane_datapath_policy_failures_total",
    "Endpoint policy installs that failed (the endpoint denies until a retry succeeds)",
)
FAILED_ENDPOINTS = Gauge(
    "membrane_datapath_policy_failed_endpoints", "Endpoints currently denying for lack of policy"
)


@dataclass(frozen=True)
class LocalEndpoint:
    ifindex: int
    identity: int
    ports: tuple[ContainerPort, ...] = ()


class PolicySync:
    def __init__(
        self,
        policy_map: MutableMapping[PolicyKey, PolicyValue],
        endpoint_map: MutableMapping[int, EndpointInfo],
    ) -> None:
        self.policy_map = policy_map
        self.endpoint_map = endpoint_map
        self.resolved: dict[int, ResolvedPolicy] = {}
        self.endpoints: dict[int, LocalEndpoint] = {}
        self.by_identity: dict[int, set[int]] = defaultdict(set)
        self.installed: dict[int, dict[PolicyKey, PolicyValue]] = defaultdict(dict)
        self.failed: set[int] = set()
        self.log = log.get("datapath.policy")

    def adopt(self) -> int:
        """Index what the map holds (left by a previous agent); returns the entry count."""
        count = 0
        for key in list(self.policy_map):
            try:
                self.installed[key.endpoint][key] = self.policy_map[key]
            except KeyError:
                continue
            count += 1
        return count

    # --- changes ---------------------------------------------------------------------------

    def set_resolved(self, identity: int, policy: ResolvedPolicy | None) -> None:
        if policy is None:
            self.resolved.pop(identity, None)
        else:
            self.resolved[identity] = policy
        for ifindex in sorted(self.by_identity.get(identity, ())):
            self.sync(ifindex)

    def upsert_endpoint(self, endpoint: LocalEndpoint) -> None:
        old = self.endpoints.get(endpoint.ifindex)
        if old is not None:
            self.by_identity[old.identity].discard(endpoint.ifindex)
        self.endpoints[endpoint.ifindex] = endpoint
        self.by_identity[endpoint.identity].add(endpoint.ifindex)
        self.sync(endpoint.ifindex)

    def remove_endpoint(self, ifindex: int) -> None:
        endpoint = self.endpoints.pop(ifindex, None)
        if endpoint is not None:
            self.by_identity[endpoint.identity].discard(ifindex)
        self.failed.discard(ifindex)
        FAILED_ENDPOINTS.set(len(self.failed))
        self._apply(ifindex, {}, [*self.installed.get(ifindex, {})])

    def forget_strays(self) -> int:
        """Delete entries of endpoints that no longer exist (after adoption)."""
        strays = [ifindex for ifindex in self.installed if ifindex not in self.endpoints]
        for ifindex in strays:
            self._apply(ifindex, {}, [*self.installed[ifindex]])
        return len(strays)

    def retry_failed(self) -> None:
        for ifindex in sorted(self.failed):
            if ifindex in self.endpoints:
                self.sync(ifindex)

    # --- the one place that touches the maps -------------------------------------------------

    def sync(self, ifindex: int) -> None:
        endpoint = self.endpoints[ifindex]
        policy = self.resolved.get(endpoint.identity)
        desired = compile_endpoint(ifindex, policy, endpoint.ports)
        upserts, deletes = diff(self.installed.get(ifindex, {}), desired)
        flags = 0
        if policy is not None:
            flags |= EP_ENFORCE_INGRESS if policy.ingress_enforced else 0
            flags |= EP_ENFORCE_EGRESS if policy.egress_enforced else 0
            flags |= EP_AUDIT_INGRESS if policy.ingress_audit else 0
            flags |= EP_AUDIT_EGRESS if policy.egress_audit else 0
        try:
            # entries first: until the flag is set they change nothing, so no window opens
            self._apply(ifindex, upserts, deletes)
        except OSError as exc:
            POLICY_FAILURES.inc()
            self.failed.add(ifindex)
            FAILED_ENDPOINTS.set(len(self.failed))
            self.log.error(
                "cannot install policy; endpoint denies until a retry succeeds",
                endpoint=ifindex,
                identity=endpoint.identity,
                error=str(exc),
            )
            self._set_flags(ifindex, EP_POLICY_FAILED | flags)
            return
        if ifindex in self.failed:
            self.failed.discard(ifindex)
            FAILED_ENDPOINTS.set(len(self.failed))
            self.log.info("policy installed after earlier failure", endpoint=ifindex)
        self._set_flags(ifindex, flags)

    def _set_flags(self, ifindex: int, flags: int) -> None:
        info = self.endpoint_map.get(ifindex)
        if info is not None and info.flags != flags:
            self.endpoint_map[ifindex] = replace(info, flags=flags)

    def _apply(
        self,
        ifindex: int,
        upserts: dict[PolicyKey, PolicyValue],
        deletes: Sequence[PolicyKey],
    ) -> None:
        """Write a diff so that no moment allows more than before or after: new denies go in
        first, old allows go out before new allows come in, old denies go out last."""
        installed = self.installed[ifindex]
        deny_in = [k for k, v in upserts.items() if v.deny]
        allow_in = [k for k, v in upserts.items() if not v.deny]
        allow_out = [k for k in deletes if not installed.get(k, PolicyValue(0, False)).deny]
        deny_out = [k for k in deletes if installed.get(k, PolicyValue(0, False)).deny]
        for key in deny_in:
            self._write(installed, key, upserts[key])
        for key in allow_out:
            self._delete(installed, key)
        for key in allow_in:
            self._write(installed, key, upserts[key])
        for key in deny_out:
            self._delete(installed, key)
        if not installed:
            self.installed.pop(ifindex, None)

    def _write(
        self, installed: dict[PolicyKey, PolicyValue], key: PolicyKey, value: PolicyValue
    ) -> None:
        self.policy_map[key] = value
        installed[key] = value
        MAP_UPDATES.labels("update").inc()

    def _delete(self, installed: dict[PolicyKey, PolicyValue], key: PolicyKey) -> None:
        with contextlib.suppress(KeyError):
            del self.policy_map[key]
        installed.pop(key, None)
        MAP_UPDATES.labels("delete").inc()
