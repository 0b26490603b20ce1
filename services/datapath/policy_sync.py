"""Keep the policy map and the endpoints' enforcement flags equal to the resolved policy.

Work is proportional to the change: a resolved-policy update for identity X recompiles only the
local endpoints that have identity X, and writes only the entries that differ from what is
installed. The installed state is read back from the map when the agent starts, so a restarted
agent adopts what its predecessor left and corrects only the difference.

Fail closed: when entries cannot be written (map full, kernel error), the endpoint is marked
``EP_POLICY_FAILED`` and the datapath denies its new connections until a retry succeeds.

Pending: the policy service publishes an entry for every pod identity, one that enforces nothing
when no policy selects it. Until a pod identity's entry is in, its endpoints are
``EP_POLICY_PENDING``: the datapath drops their new connections (203), so a new or re-identified
endpoint never runs unenforced while its policy is on the way. Reserved identities (health) have
no entry and are not pending.

Peer sets: a resolved policy names the identities of a selector by peer set id, whose members
come from the ``selectors`` bucket. A peer set that changes recompiles only the local endpoints
whose policy names it. When a policy names a peer set the agent has not seen yet (the two
buckets are watched apart), the endpoint keeps what it has installed until the set arrives; an
endpoint that has nothing installed yet denies meanwhile.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

from msgspec.structs import replace as replace_struct
from prometheus_client import Counter, Gauge

from services.datapath.maps import (
    EP_AUDIT_EGRESS,
    EP_AUDIT_INGRESS,
    EP_ENFORCE_EGRESS,
    EP_ENFORCE_INGRESS,
    EP_POLICY_FAILED,
    EP_POLICY_PENDING,
    EndpointInfo,
)
from shared import identities, log
from shared.messages import ContainerPort, PolicyEntry, ResolvedPolicy
from shared.peer_sets import expand, referenced
from shared.policy_map import PolicyKey, PolicyValue, compile_endpoint, diff

PEERS_AT_ONCE = 8  # more members changing at once: the endpoint is recompiled whole

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
PENDING_ENDPOINTS = Gauge(
    "membrane_datapath_policy_pending_endpoints",
    "Endpoints whose identity's resolved policy has not arrived (they drop new connections)",
)
WAITING_ENDPOINTS = Gauge(
    "membrane_datapath_policy_waiting_endpoints",
    "Endpoints whose new policy names a peer set not received yet (the old policy stays)",
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
        self.members: dict[int, frozenset[int]] = {}  # peer set id -> identities
        # members the DNS fast path added before the policy service did (fqdn_fast.py)
        self.learned: dict[int, set[int]] = {}
        self.set_users: dict[int, set[int]] = defaultdict(set)  # peer set id -> subjects
        self.waiting: set[int] = set()  # endpoints waiting for a peer set
        self.unreadable: set[int] = set()  # peer sets whose value did not decode
        self.installed_once: set[int] = set()  # endpoints that had a policy installed
        self.pending: set[int] = set()  # endpoints whose identity's policy has not arrived
        # egress named ports resolve against the destination: each identity's container ports
        self.peer_ports: dict[int, tuple[ContainerPort, ...]] = {}
        self.egress_named: set[int] = set()  # subjects with an egress named-port entry
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
        old = self.resolved.pop(identity, None)
        for set_id in referenced(old) if old is not None else ():
            users = self.set_users[set_id]
            users.discard(identity)
            if not users:
                del self.set_users[set_id]
        self.egress_named.discard(identity)
        if policy is not None:
            self.resolved[identity] = policy
            for set_id in referenced(policy):
                self.set_users[set_id].add(identity)
            if any(entry.port_name for entry in policy.egress):
                self.egress_named.add(identity)
        for ifindex in sorted(self.by_identity.get(identity, ())):
            self.sync(ifindex)

    def set_peer_set(
        self, set_id: int, identities: Iterable[int] | None, *, unreadable: bool = False
    ) -> None:
        """A peer set's members (None: deleted); recompiles the endpoints naming it. An
        unreadable set makes them deny: its members might be a deny rule's."""
        old = self.members.get(set_id)
        was_unreadable = set_id in self.unreadable
        if identities is None:
            self.members.pop(set_id, None)
        else:
            self.members[set_id] = frozenset(identities)
        if unreadable:
            self.unreadable.add(set_id)
        else:
            self.unreadable.discard(set_id)
        new = self.members.get(set_id)
        if old is None or new is None or was_unreadable or unreadable:
            self._sync_users(set_id)
        else:
            # a toFQDNs set gains an address at a time: only that peer's entries change
            learned = self.learned.get(set_id, set())
            self._sync_users(set_id, {i for i in old ^ new if i not in learned})

    def add_learned(self, set_id: int, identity: int) -> None:
        """The DNS fast path: ``identity`` is a member of ``set_id`` on this node until the
        policy service's set has it or :meth:`remove_learned`; recompiles its endpoints."""
        learned = self.learned.setdefault(set_id, set())
        if identity in learned:
            return
        learned.add(identity)
        if identity not in self.members.get(set_id, ()):
            self._sync_users(set_id, {identity})

    def remove_learned(self, set_id: int, identity: int) -> None:
        learned = self.learned.get(set_id)
        if learned is None or identity not in learned:
            return
        learned.discard(identity)
        if not learned:
            del self.learned[set_id]
        if identity not in self.members.get(set_id, ()):
            self._sync_users(set_id, {identity})

    def _sync_users(self, set_id: int, peers: set[int] | None = None) -> None:
        """Recompile the endpoints naming the set: only the entries of ``peers`` (the members
        that came or went) when few did, else whole."""
        incremental = peers is not None and len(peers) <= PEERS_AT_ONCE
        for subject in sorted(self.set_users.get(set_id, ())):
            for ifindex in sorted(self.by_identity.get(subject, ())):
                if not incremental or not all(self._sync_peer(ifindex, p) for p in peers or ()):
                    self.sync(ifindex)

    def _sync_peer(self, ifindex: int, peer: int) -> bool:
        """Bring the entries of one peer identity to what the policy says, leaving the others
        alone: their compiled value depends only on the entries naming that peer (directly or
        by a set holding it) and the any-peer ones (``compile_endpoint``). False: the endpoint
        is not in a steady state (failed, waiting, pending, never installed) and needs
        :meth:`sync`."""
        endpoint = self.endpoints[ifindex]
        policy = self.resolved.get(endpoint.identity)
        if (
            policy is None
            or ifindex in self.failed
            or ifindex in self.waiting
            or ifindex in self.pending
            or ifindex not in self.installed_once
        ):
            return False
        names = referenced(policy)
        if names & self.unreadable or names - self.members.keys():
            return False
        members = self._members(names)
        holding = {s for s in names if peer in members[s]}

        def concerns(entry: PolicyEntry) -> bool:
            if entry.selector:
                return entry.selector in holding
            return entry.peer in (0, peer)

        only = replace_struct(
            policy,
            ingress=[e for e in policy.ingress if concerns(e)],
            egress=[e for e in policy.egress if concerns(e)],
        )
        only = expand(only, {s: (peer,) for s in holding})
        compiled = compile_endpoint(ifindex, only, endpoint.ports, self.peer_ports)
        desired = {k: v for k, v in compiled.items() if k.identity == peer}
        installed = {k: v for k, v in self.installed.get(ifindex, {}).items() if k.identity == peer}
        upserts, deletes = diff(installed, desired)
        try:
            self._apply(ifindex, upserts, deletes)
        except OSError as exc:
            self._fail(ifindex, endpoint, str(exc))
        return True

    def _members(self, names: set[int]) -> Mapping[int, Collection[int]]:
        """The sets' members, with what the DNS fast path added."""
        if not self.learned or not names & self.learned.keys():
            return self.members
        return {
            s: self.members[s] | self.learned[s] if s in self.learned else self.members[s]
            for s in names
        }

    def set_peer_ports(self, identity: int, ports: Sequence[ContainerPort]) -> None:
        """The container ports the pods of an identity declare, cluster-wide; recompiles the
        endpoints whose egress names a port."""
        if tuple(ports) == self.peer_ports.get(identity, ()):
            return
        if ports:
            self.peer_ports[identity] = tuple(ports)
        else:
            self.peer_ports.pop(identity, None)
        for subject in sorted(self.egress_named):
            for ifindex in sorted(self.by_identity.get(subject, ())):
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
        self.waiting.discard(ifindex)
        self.pending.discard(ifindex)
        self.installed_once.discard(ifindex)
        PENDING_ENDPOINTS.set(len(self.pending))
        FAILED_ENDPOINTS.set(len(self.failed))
        WAITING_ENDPOINTS.set(len(self.waiting))
        self._apply(ifindex, {}, [*self.installed.get(ifindex, {})])

    def forget_strays(self) -> int:
        """Delete entries of endpoints that no longer exist (after adoption)."""
        strays = [ifindex for ifindex in self.installed if ifindex not in self.endpoints]
        for ifindex in strays:
            self._apply(ifindex, {}, [*self.installed[ifindex]])
        return len(strays)

    def has_policy(self, identity: int) -> bool:
        """The identity's resolved policy is in (its endpoints are not pending)."""
        return identity in self.resolved

    def retry_failed(self) -> None:
        for ifindex in sorted(self.failed):
            if ifindex in self.endpoints:
                self.sync(ifindex)

    # --- the one place that touches the maps -------------------------------------------------

    def sync(self, ifindex: int) -> None:
        endpoint = self.endpoints[ifindex]
        policy = self.resolved.get(endpoint.identity)
        if policy is not None:
            names = referenced(policy)
            if names & self.unreadable:
                self._fail(ifindex, endpoint, "a peer set it names is unreadable")
                return
            missing = names - self.members.keys()
            if missing:
                self._wait(ifindex, endpoint, missing)
                return
            policy = expand(policy, self._members(names))
        if ifindex in self.waiting:
            self.waiting.discard(ifindex)
            WAITING_ENDPOINTS.set(len(self.waiting))
        desired = compile_endpoint(ifindex, policy, endpoint.ports, self.peer_ports)
        upserts, deletes = diff(self.installed.get(ifindex, {}), desired)
        flags = 0
        if policy is None and identities.CLUSTER_MIN <= endpoint.identity < identities.LOCAL_BASE:
            flags = EP_POLICY_PENDING
            self.pending.add(ifindex)
        else:
            self.pending.discard(ifindex)
        PENDING_ENDPOINTS.set(len(self.pending))
        if policy is not None:
            flags |= EP_ENFORCE_INGRESS if policy.ingress_enforced else 0
            flags |= EP_ENFORCE_EGRESS if policy.egress_enforced else 0
            flags |= EP_AUDIT_INGRESS if policy.ingress_audit else 0
            flags |= EP_AUDIT_EGRESS if policy.egress_audit else 0
        try:
            # entries first: until the flag is set they change nothing, so no window opens
            self._apply(ifindex, upserts, deletes)
        except OSError as exc:
            self._fail(ifindex, endpoint, str(exc))
            return
        if ifindex in self.failed:
            self.failed.discard(ifindex)
            FAILED_ENDPOINTS.set(len(self.failed))
            self.log.info("policy installed after earlier failure", endpoint=ifindex)
        self.installed_once.add(ifindex)
        self._set_flags(ifindex, flags)

    def _fail(self, ifindex: int, endpoint: LocalEndpoint, error: str) -> None:
        POLICY_FAILURES.inc()
        self.failed.add(ifindex)
        FAILED_ENDPOINTS.set(len(self.failed))
        self.log.error(
            "cannot install policy; endpoint denies until a retry succeeds",
            endpoint=ifindex,
            identity=endpoint.identity,
            error=error,
        )
        info = self.endpoint_map.get(ifindex)
        flags = EP_POLICY_FAILED | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS
        self._set_flags(ifindex, flags if info is None else info.flags | flags)

    def _wait(self, ifindex: int, endpoint: LocalEndpoint, missing: set[int]) -> None:
        """The policy names peer sets not received yet: keep the policy installed before it,
        or deny if there is none."""
        if ifindex not in self.waiting:
            self.waiting.add(ifindex)
            WAITING_ENDPOINTS.set(len(self.waiting))
            self.log.info(
                "policy waits for peer sets",
                endpoint=ifindex,
                identity=endpoint.identity,
                peer_sets=sorted(missing),
            )
        if ifindex not in self.installed_once:
            self._fail(ifindex, endpoint, "no policy installed yet, and it waits for peer sets")

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
