"""The policy resolver: identities and policies in; one ResolvedPolicy per subject identity and
one PeerSet per peer in use out.

Pure logic, no NATS: the service feeds it the ``identities`` bucket and the applied policies and
publishes what each call says changed (subjects returned, peer sets taken with
:meth:`Resolver.take_peer_set_changes`).

How work follows the change:

- :class:`~services.policy.selector_cache.SelectorCache` keeps selector -> identities, evaluating
  a new identity only against the selectors filed under its labels, and a new selector only
  against the identities carrying its indexed label.
- :class:`~services.policy.cidr_table.CIDRTable` keeps the node-local CIDR identities and what
  each CIDR rule selects, offering a new network only to the rules whose network contains it.
- Each spec (``(policy key, spec index)``) is registered as a user of its subject selector and
  of every peer its rules depend on: a selector, a CIDR rule, or the classes "every cluster
  identity" and "every CIDR identity" (entities). Every such peer is a *peer set* with a stable
  id, and entries name the set, not its members (as Cilium's selector cache does). When a
  peer's members change, only its peer set is dirty: no subject is resolved again. A policy
  change resolves only the subjects its old and new specs select, and opens or closes the peer
  sets its rules name.
- A subject's result (and a peer set's members) is compared with the previous one; only a real
  change bumps its revision and is reported.

Resolution of one subject (Cilium's and Kubernetes' semantics, see :mod:`services.policy.model`):
the union of every spec selecting it; a direction is enforced if any of them enforces it; each
rule gives one entry per (peer, port rule), where a peer is a peer set, a reserved identity, or
0 for a wildcard, and protocol/port 0 when the rule has no ports; deny rules give deny entries
(the datapath makes deny win). Where deny rules apply in a direction no spec enforces, the
direction is flagged enforced and an allow-all entry (peer 0, any protocol and port, rule id 0)
keeps everything else allowed. Policies in audit mode are resolved apart: a direction only they
govern is enforced in audit mode (the datapath reports what it would drop and drops nothing).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from services.policy.cidr_table import CIDRChange, CIDRTable
from services.policy.fqdn_table import FQDNChange, FQDNTable
from services.policy.model import (
    CLUSTER_MIN,
    LOCAL_BASE,
    CIDRRule,
    Direction,
    L7Rules,
    Policy,
    PolicySpec,
    Rule,
    Selector,
)
from services.policy.selector_cache import SelectorCache
from shared import identities, protocols
from shared.errors import AlreadyExists
from shared.fqdn import NameMatch
from shared.labels import SOURCE_RESERVED, Label, LabelSet
from shared.messages import PeerSet, PolicyEntry, ResolvedPolicy
from shared.peer_sets import expand, referenced

PORT_PROTOCOLS = tuple(protocols.PORT_PROTOCOLS.values())

__all__ = ["PeerClass", "Resolver", "is_subject_range"]


class PeerClass(enum.Enum):
    """Dependencies of entities: every cluster identity, every node-local CIDR identity."""

    CLUSTER = "cluster"
    CIDR = "cidr"


Dependency = Selector | CIDRRule | PeerClass | NameMatch
SpecRef = tuple[str, int]  # (policy key, index of the spec in policy.specs)
# (peer, peer set, protocol, port, end_port, port_name, deny, rule id, l7 protocol, l7 JSON)
EntryKey = tuple[int, int, int, int, int, str, bool, int, str, str]
ALLOW_ALL: EntryKey = (0, 0, 0, 0, 0, "", False, 0, "", "")


@dataclass(frozen=True)
class _Result:
    ingress_enforced: bool
    egress_enforced: bool
    ingress: tuple[EntryKey, ...]
    egress: tuple[EntryKey, ...]
    ingress_audit: bool = False
    egress_audit: bool = False


def is_subject_range(identity: int) -> bool:
    """Pod identities (cluster-local, cluster-mesh included) are the only possible subjects."""
    return CLUSTER_MIN <= identity < LOCAL_BASE


def _dependencies(spec: PolicySpec) -> set[Dependency]:
    deps: set[Dependency] = set()
    for rule in spec.rules:
        for peer in rule.peers:
            if peer.selector is not None:
                deps.add(peer.selector)
            elif peer.cidr is not None:
                deps.add(peer.cidr)
            elif peer.fqdn is not None:
                deps.add(peer.fqdn)
            elif peer.entity is not None:
                targets = peer.entity.targets
                if targets.wildcard:
                    continue
                if targets.cluster:
                    deps.add(PeerClass.CLUSTER)
                if targets.cidr:
                    deps.add(PeerClass.CIDR)
    return deps


def peer_set_id(dep: Dependency) -> int:
    """A peer set's stable id: 48 bits of blake2s over what it selects, never 0.

    The same in every replica and after restarts, so that subjects and peer sets published by
    different processes agree without coordination.
    """
    if isinstance(dep, Selector):
        text = f"selector/{dep}"
    elif isinstance(dep, CIDRRule):
        text = f"cidr/{dep}"
    elif isinstance(dep, NameMatch):
        text = f"fqdn/{'name' if dep.match_name else 'pattern'}/{dep}"
    else:
        text = f"class/{dep.value}"
    digest = hashlib.blake2s(text.encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big") or 1


def describe_peer_set(dep: Dependency) -> str:
    if isinstance(dep, PeerClass):
        return f"every {dep.value} identity"
    if isinstance(dep, NameMatch):
        return f"toFQDNs {'matchName' if dep.match_name else 'matchPattern'} {dep}"
    return str(dep)


def _port_protocols(protocol: int) -> tuple[int, ...]:
    return PORT_PROTOCOLS if protocol == protocols.ANY else (protocol,)


def _entry(key: EntryKey) -> PolicyEntry:
    peer, selector, protocol, port, end_port, port_name, deny, rule_id, l7_proto, l7_json = key
    entry = PolicyEntry(
        peer=peer,
        selector=selector,
        protocol=protocol,
        port=port,
        end_port=end_port,
        port_name=port_name,
        deny=deny,
        rule_id=rule_id,
    )
    if l7_proto:
        entry.l7 = L7Rules(l7_proto, l7_json).entries()
    return entry


class Resolver:
    def __init__(self) -> None:
        self._cache = SelectorCache()
        self._cidrs = CIDRTable()
        self._fqdns = FQDNTable()
        self._cluster: set[int] = set()
        self._policies: dict[str, Policy] = {}
        self._subject_users: dict[Dependency, set[SpecRef]] = {}
        self._peer_users: dict[Dependency, set[SpecRef]] = {}
        self._rule_names: dict[int, tuple[str, str]] = {}  # rule id -> (policy key, rule name)
        self._results: dict[int, _Result] = {}
        self._resolved: dict[int, ResolvedPolicy] = {}
        self._revisions: dict[int, int] = {}
        # a rule's entries name peer sets, not their members: they change only with the policy
        self._rule_memo: dict[str, dict[int, frozenset[EntryKey]]] = {}
        self._set_ids: dict[Dependency, int] = {}  # peers in use -> peer set id
        self._set_owner: dict[int, Dependency] = {}
        self._peer_sets: dict[int, PeerSet] = {}  # as last taken
        self._dirty_sets: set[Dependency] = set()
        self._gone_sets: set[int] = set()
        # the reserved identities exist implicitly, with their one label ("unknown", 0, is none)
        for number, name in identities.BY_ID.items():
            if number:
                self._cache.add_identity(number, LabelSet([Label(SOURCE_RESERVED, name)]))

    # --- inputs --------------------------------------------------------------------------------

    def set_identity(self, identity: int, labels: Iterable[str]) -> set[int]:
        """Adds or relabels an identity; returns the subjects whose ResolvedPolicy changed."""
        label_set = LabelSet.parse(labels)
        if self._cache.labels(identity) == label_set:
            return set()
        dirty = self._drop_identity(identity)
        deps: set[Dependency] = set(self._cache.add_identity(identity, label_set))
        if is_subject_range(identity):
            self._cluster.add(identity)
            deps.add(PeerClass.CLUSTER)
            dirty.add(identity)
        # as a peer, the identity changes the peer sets it joins, never the subjects using them
        self._mark_sets(deps)
        return self._settle(dirty)

    def remove_identity(self, identity: int) -> set[int]:
        dirty = self._drop_identity(identity)
        changed = self._settle(dirty)
        self._revisions.pop(identity, None)
        return changed

    def set_policy(self, policy: Policy) -> set[int]:
        """Adds a policy or replaces the one with the same key."""
        key = policy.key
        self._check_ids(policy)
        old = self._policies.get(key)
        dirty: set[int] = set()
        change = CIDRChange(set(), False)
        # take the new references before dropping the old ones: shared selectors and networks
        # stay cached instead of being evaluated again
        for spec in policy.specs:
            self._acquire(spec.subject, change)
            for dep in _dependencies(spec):
                self._acquire(dep, change)
        if old is not None:
            dirty |= self._policy_subjects(old)
            self._unregister(old, change)
        self._policies[key] = policy
        self._rule_memo.pop(key, None)
        for index, spec in enumerate(policy.specs):
            self._subject_users.setdefault(spec.subject, set()).add((key, index))
            for dep in _dependencies(spec):
                users = self._peer_users.setdefault(dep, set())
                if not users:
                    self._open_set(dep)
                users.add((key, index))
        for rule in policy.rules:
            self._rule_names[rule.id] = (key, rule.name)
        dirty |= self._policy_subjects(policy)
        self._mark_cidr_sets(change)
        return self._settle(dirty)

    def remove_policy(self, key: str) -> set[int]:
        old = self._policies.get(key)
        if old is None:
            return set()
        dirty = self._policy_subjects(old)
        change = CIDRChange(set(), False)
        self._unregister(old, change)
        del self._policies[key]
        self._rule_memo.pop(key, None)
        self._mark_cidr_sets(change)
        return self._settle(dirty)

    def set_fqdn_cache(self, key: str, names: dict[str, list[IPv4Address]] | None) -> None:
        """One endpoint's learned names (None: gone). Changes only peer sets and CIDR
        identities (taken with :meth:`take_peer_set_changes` and :meth:`take_cidr_changes`):
        entries name the toFQDNs peer sets, never their addresses."""
        change = CIDRChange(set(), False)
        self._apply_fqdn(self._fqdns.set_cache(key, names), change)
        self._mark_cidr_sets(change)

    def fqdn_names(self, address: str) -> list[str]:
        """The learned names resolving to ``address``."""
        return self._fqdns.names_of(IPv4Address(address))

    def outside_identity(self, address: str) -> int:
        """The identity of an address outside the cluster, as the datapath's ipcache finds it:
        its most specific policy network's, else ``world``."""
        ip = IPv4Address(address)
        for prefixlen in range(32, 0, -1):
            number = self._cidrs.identity_of(IPv4Network((ip, prefixlen), strict=False))
            if number is not None:
                return number
        return identities.WORLD

    def fqdn_reasons(self, address: str) -> list[str]:
        """Why toFQDNs selectors hold ``address``: the names answered with it, per selector."""
        ip = IPv4Address(address)
        return [
            f"{address} was answered for {', '.join(names)}: {describe_peer_set(dep)}"
            for dep in sorted(self._set_ids, key=str)
            if isinstance(dep, NameMatch) and (names := self._fqdns.selected_by(dep, ip))
        ]

    # --- outputs -------------------------------------------------------------------------------

    def resolved(self, identity: int) -> ResolvedPolicy | None:
        """None when no (enforcing or not) spec selects the identity."""
        return self._resolved.get(identity)

    def subjects(self) -> set[int]:
        return set(self._resolved)

    def published(self, identity: int) -> ResolvedPolicy | None:
        """What the ``resolved`` bucket holds for an identity: its resolved policy, or for a pod
        identity no policy selects an explicit entry enforcing nothing -- an endpoint denies
        until its identity has one or the other (docs/datapath.md) --, None for an identity
        that does not exist."""
        found = self._resolved.get(identity)
        if found is None and identity in self._cluster:
            return ResolvedPolicy(identity=identity, revision=self._revisions.get(identity, 0))
        return found

    def published_subjects(self) -> set[int]:
        """Every identity :meth:`published` has an entry for."""
        return set(self._resolved) | self._cluster

    def expanded(
        self, identity: int, *, peer: int | None = None, address: int = 0
    ) -> ResolvedPolicy | None:
        """The resolved policy with one entry per peer identity, as the datapath compiles it;
        with ``peer``, only the entries that could apply to that one peer and to its address's
        slot ``address`` (for ``explain``)."""
        policy = self._resolved.get(identity)
        if policy is None:
            return None
        members: dict[int, Collection[int]] = {}
        for set_id in referenced(policy):
            found = self._members(self._set_owner[set_id])
            members[set_id] = found if peer is None else ({peer, address} & found)
        return expand(policy, members)

    def address_identity(self, ip: str, peer: int) -> int:
        """The policy slot of a pod's address, as the datapath finds it (``address_identity``
        in bpf/datapath.c): ``ADDRESS |`` the identity of the most specific policy prefix
        holding ``ip``, or of ``world``; 0 when ``peer`` is not a pod or ``ip`` is not given."""
        if not ip or not is_subject_range(peer):
            return 0
        address = IPv4Address(ip)
        for prefixlen in range(32, 0, -1):
            number = self._cidrs.identity_of(IPv4Network((address, prefixlen), strict=False))
            if number is not None:
                return identities.ADDRESS | number
        return identities.ADDRESS | identities.WORLD

    def peer_sets(self) -> dict[int, PeerSet]:
        """Every peer set as last taken (:meth:`take_peer_set_changes`)."""
        return dict(self._peer_sets)

    def peer_set(self, set_id: int) -> PeerSet | None:
        """One peer set as last taken; None when no rule uses it (any more)."""
        return self._peer_sets.get(set_id)

    def take_peer_set_changes(self) -> tuple[list[PeerSet], list[int]]:
        """Peer sets new or with other members since the last call, and those no rule uses."""
        changed: list[PeerSet] = []
        for dep in self._dirty_sets:
            set_id = self._set_ids[dep]
            members = sorted(self._members(dep))
            old = self._peer_sets.get(set_id)
            if old is not None and old.identities == members:
                continue
            peer_set = PeerSet(
                id=set_id,
                revision=1 if old is None else old.revision + 1,
                description=describe_peer_set(dep),
                identities=members,
                fqdn=dep.to_dict() if isinstance(dep, NameMatch) else None,
            )
            self._peer_sets[set_id] = peer_set
            changed.append(peer_set)
        removed = sorted(i for i in self._gone_sets if self._peer_sets.pop(i, None) is not None)
        self._dirty_sets.clear()
        self._gone_sets.clear()
        return sorted(changed, key=lambda s: s.id), removed

    def cidr_identities(self) -> dict[IPv4Network, int]:
        return self._cidrs.identities()

    def take_cidr_changes(self) -> tuple[dict[IPv4Network, int], list[IPv4Network]]:
        return self._cidrs.take_changes()

    def stats(self) -> dict[str, int]:
        return {
            "policies": len(self._policies),
            "rules": sum(len(policy.rules) for policy in self._policies.values()),
            "selectors": len(self._cache),
            "identities": sum(1 for _ in self._cache.identities()),
            "subjects": len(self._resolved),
            "peer_sets": len(self._set_ids),
            "cidr_identities": len(self._cidrs),
            "selector_evaluations": self._cache.evaluations,
        }

    # --- lookups for explain and the service ---------------------------------------------------

    def policy(self, key: str) -> Policy | None:
        return self._policies.get(key)

    def policies(self) -> list[Policy]:
        return [self._policies[key] for key in sorted(self._policies)]

    def labels(self, identity: int) -> LabelSet | None:
        return self._cache.labels(identity)

    def selecting(self, identity: int) -> list[tuple[Policy, PolicySpec]]:
        """Every spec selecting the identity (audit policies included), in key order."""
        if not is_subject_range(identity):
            return []
        refs = self._selecting_refs(identity)
        return [(self._policies[key], self._policies[key].specs[index]) for key, index in refs]

    def subjects_of(self, key: str) -> set[int]:
        """The identities a policy's specs select now (whether or not it is in audit mode)."""
        policy = self._policies.get(key)
        return set() if policy is None else self._policy_subjects(policy)

    def rule_name(self, rule_id: int) -> str:
        owner = self._rule_names.get(rule_id)
        return owner[1] if owner else ""

    @contextlib.contextmanager
    def trial(self, policies: Sequence[Policy]) -> Iterator[set[int]]:
        """Applies ``policies`` (added, or replacing those with the same key) for the block and
        yields the subjects whose resolved policy they change; afterwards everything is as it
        was: policies, results, revisions, and the changes still to be taken by the service.

        For ``policy diff``: the work is the change's, not a second resolver's. The block must
        not await: nothing else may see the trial.
        """
        saved = (
            dict(self._results),
            dict(self._resolved),
            dict(self._revisions),
            set(self._dirty_sets),
            set(self._gone_sets),
            dict(self._rule_names),
            self._cidrs.pending(),
        )
        applied: list[tuple[str, Policy | None]] = []
        changed: set[int] = set()
        try:
            for policy in policies:
                previous = self._policies.get(policy.key)
                changed |= self.set_policy(policy)
                applied.append((policy.key, previous))
            yield changed
        finally:
            for key, previous in reversed(applied):
                if previous is None:
                    self.remove_policy(key)
                else:
                    self.set_policy(previous)
            self._results, self._resolved, self._revisions = saved[0], saved[1], saved[2]
            self._dirty_sets, self._gone_sets, self._rule_names = saved[3], saved[4], saved[5]
            self._cidrs.restore_pending(saved[6])

    def cidr_identity(self, network: IPv4Network) -> int | None:
        return self._cidrs.identity_of(network)

    @property
    def selector_evaluations(self) -> int:
        return self._cache.evaluations

    # --- bookkeeping ---------------------------------------------------------------------------

    def _check_ids(self, policy: Policy) -> None:
        for spec in policy.specs:
            for dep in _dependencies(spec):
                holder = self._set_owner.get(peer_set_id(dep))
                if holder is not None and holder != dep:
                    raise AlreadyExists(
                        f"peer {describe_peer_set(dep)} has the same peer set id as "
                        f"{describe_peer_set(holder)}: rewrite one of them",
                        field="spec",
                    )
        seen: dict[int, str] = {}
        for rule in policy.rules:
            other = seen.get(rule.id)
            owner = self._rule_names.get(rule.id)
            if other is None and owner is not None and owner[0] != policy.key:
                other = owner[1]
            if other is not None:
                raise AlreadyExists(
                    f"rule {rule.name} has the same id ({rule.id}) as rule {other}: "
                    "rename the policy",
                    field="metadata.name",
                )
            seen[rule.id] = rule.name

    def _acquire(self, dep: Dependency, change: CIDRChange) -> None:
        if isinstance(dep, Selector):
            self._cache.acquire(dep)
        elif isinstance(dep, CIDRRule):
            self._merge(change, self._cidrs.acquire(dep))
        elif isinstance(dep, NameMatch):
            self._apply_fqdn(self._fqdns.acquire(dep), change)

    def _release(self, dep: Dependency, change: CIDRChange) -> None:
        if isinstance(dep, Selector):
            self._cache.release(dep)
        elif isinstance(dep, CIDRRule):
            self._merge(change, self._cidrs.release(dep))
        elif isinstance(dep, NameMatch):
            self._apply_fqdn(self._fqdns.release(dep), change)

    def _apply_fqdn(self, fqdn: FQDNChange, change: CIDRChange) -> None:
        """Addresses a toFQDNs selector holds get the CIDR identity of their /32."""
        for address in fqdn.held:
            self._merge(change, self._cidrs.acquire(_host_rule(address)))
        for address in fqdn.released:
            self._merge(change, self._cidrs.release(_host_rule(address)))
        self._mark_sets(fqdn.selectors)

    @staticmethod
    def _merge(into: CIDRChange, change: CIDRChange) -> None:
        into.rules |= change.rules
        into.table_changed |= change.table_changed

    def _unregister(self, policy: Policy, change: CIDRChange) -> None:
        key = policy.key
        for index, spec in enumerate(policy.specs):
            self._discard_user(self._subject_users, spec.subject, (key, index))
            self._release(spec.subject, change)
            for dep in _dependencies(spec):
                if self._discard_user(self._peer_users, dep, (key, index)):
                    self._close_set(dep)
                self._release(dep, change)
        for rule in policy.rules:
            if self._rule_names.get(rule.id, ("", ""))[0] == key:
                del self._rule_names[rule.id]

    @staticmethod
    def _discard_user(users: dict[Dependency, set[SpecRef]], dep: Dependency, ref: SpecRef) -> bool:
        """True when that was the dependency's last user."""
        holders = users[dep]
        holders.discard(ref)
        if holders:
            return False
        del users[dep]
        return True

    def _open_set(self, dep: Dependency) -> None:
        set_id = peer_set_id(dep)
        self._set_ids[dep] = set_id
        self._set_owner[set_id] = dep
        self._gone_sets.discard(set_id)
        self._dirty_sets.add(dep)

    def _close_set(self, dep: Dependency) -> None:
        set_id = self._set_ids.pop(dep)
        del self._set_owner[set_id]
        self._dirty_sets.discard(dep)
        self._gone_sets.add(set_id)

    def _mark_sets(self, deps: Iterable[Dependency]) -> None:
        self._dirty_sets.update(dep for dep in deps if dep in self._set_ids)

    def _mark_cidr_sets(self, change: CIDRChange) -> None:
        deps: set[Dependency] = set(change.rules)
        if change.table_changed:
            deps.add(PeerClass.CIDR)
        self._mark_sets(deps)

    def _members(self, dep: Dependency) -> set[int]:
        if isinstance(dep, Selector):
            return self._cache.matches(dep)
        if isinstance(dep, CIDRRule):
            return self._cidrs.matches(dep)
        if isinstance(dep, NameMatch):
            found = (self._cidrs.identity_of(_host(a)) for a in self._fqdns.addresses(dep))
            return {number for number in found if number is not None}
        return set(self._cluster) if dep is PeerClass.CLUSTER else self._cidrs.all_ids()

    def _drop_identity(self, identity: int) -> set[int]:
        """Removes an identity from every cache; returns the subjects to resolve again."""
        if self._cache.labels(identity) is None:
            return set()
        deps: set[Dependency] = set(self._cache.remove_identity(identity))
        if identity in self._cluster:
            self._cluster.discard(identity)
            deps.add(PeerClass.CLUSTER)
        self._mark_sets(deps)
        return {identity}

    def _selecting_refs(self, identity: int) -> list[SpecRef]:
        return sorted(
            ref
            for selector in self._cache.selectors_of(identity)
            for ref in self._subject_users.get(selector, ())
        )

    def _policy_subjects(self, policy: Policy) -> set[int]:
        found: set[int] = set()
        for spec in policy.specs:
            found.update(i for i in self._cache.matches(spec.subject) if is_subject_range(i))
        return found

    # --- resolution ----------------------------------------------------------------------------

    def _settle(self, dirty: set[int]) -> set[int]:
        """Resolves the dirty subjects again; returns those whose result changed."""
        changed: set[int] = set()
        for identity in sorted(dirty):
            result = self._resolve(identity)
            if result == self._results.get(identity):
                continue
            changed.add(identity)
            if result is None:
                del self._results[identity]
                del self._resolved[identity]
                continue
            revision = self._revisions.get(identity, 0) + 1
            self._revisions[identity] = revision
            self._results[identity] = result
            self._resolved[identity] = self._message(identity, revision, result)
        return changed

    def _message(self, identity: int, revision: int, result: _Result) -> ResolvedPolicy:
        rule_ids = {key[7] for key in (*result.ingress, *result.egress) if key[7]}
        return ResolvedPolicy(
            identity=identity,
            revision=revision,
            ingress_enforced=result.ingress_enforced,
            egress_enforced=result.egress_enforced,
            ingress_audit=result.ingress_audit,
            egress_audit=result.egress_audit,
            ingress=[_entry(key) for key in result.ingress],
            egress=[_entry(key) for key in result.egress],
            rules={rule_id: self._rule_names[rule_id][1] for rule_id in sorted(rule_ids)},
        )

    def _resolve(self, identity: int) -> _Result | None:
        if identity not in self._cluster:
            return None
        refs = self._selecting_refs(identity)
        # enforcing policies and audit-mode ones, resolved apart: in a direction that any
        # enforcing policy governs, audit policies change nothing; in one that only audit
        # policies govern, their verdicts are reported (AUDIT) but never applied
        found = {audit: self._union(refs, audit=audit) for audit in (False, True)}
        if found[False] is None and found[True] is None:
            return None
        enforced: dict[Direction, bool] = {}
        audit: dict[Direction, bool] = {}
        entries: dict[Direction, tuple[EntryKey, ...]] = {}
        for direction in (Direction.INGRESS, Direction.EGRESS):
            for is_audit in (False, True):
                union = found[is_audit]
                if union is not None and (union[0][direction] or union[1][direction]):
                    enforced[direction] = union[0][direction]
                    entries[direction] = tuple(sorted(union[1][direction]))
                    audit[direction] = is_audit and union[0][direction]
                    break
            else:
                enforced[direction], audit[direction], entries[direction] = False, False, ()
        return _Result(
            ingress_enforced=enforced[Direction.INGRESS],
            egress_enforced=enforced[Direction.EGRESS],
            ingress=entries[Direction.INGRESS],
            egress=entries[Direction.EGRESS],
            ingress_audit=audit[Direction.INGRESS],
            egress_audit=audit[Direction.EGRESS],
        )

    def _union(
        self, refs: Iterable[tuple[str, int]], *, audit: bool
    ) -> tuple[dict[Direction, bool], dict[Direction, set[EntryKey]]] | None:
        """Enforcement and entries of the selecting specs of (non-)audit policies; None when
        no such spec selects the identity."""
        selected = False
        enforced = {Direction.INGRESS: False, Direction.EGRESS: False}
        entries: dict[Direction, set[EntryKey]] = {
            Direction.INGRESS: set(),
            Direction.EGRESS: set(),
        }
        for key, index in refs:
            policy = self._policies[key]
            if policy.audit != audit:
                continue
            selected = True
            spec = policy.specs[index]
            enforced[Direction.INGRESS] |= spec.enforces_ingress
            enforced[Direction.EGRESS] |= spec.enforces_egress
            for rule in spec.rules:
                entries[rule.direction] |= self._rule_entries(key, rule)
        if not selected:
            return None
        for direction, found in entries.items():
            if not enforced[direction] and any(entry[6] for entry in found):
                enforced[direction] = True
                found.add(ALLOW_ALL)
        return enforced, entries

    def _rule_entries(self, key: str, rule: Rule) -> frozenset[EntryKey]:
        """A rule's entries name peer sets, not their members: kept until the policy changes."""
        memo = self._rule_memo.setdefault(key, {})
        cached = memo.get(rule.index)
        if cached is not None:
            return cached
        out: set[EntryKey] = set()
        for peer, selector in self._rule_peers(rule):
            if not rule.ports:
                out.add((peer, selector, 0, 0, 0, "", rule.deny, rule.id, "", ""))
            for port in rule.ports:
                l7_proto, l7_json = (port.l7.protocol, port.l7.canonical) if port.l7 else ("", "")
                # a port rule without a protocol is TCP, UDP and SCTP (port 0 included), never
                # the any-protocol entry of a rule without ports: that would admit ICMP, GRE...
                for protocol in _port_protocols(port.protocol):
                    out.add(
                        (
                            peer,
                            selector,
                            protocol,
                            port.port,
                            port.end_port,
                            port.port_name,
                            rule.deny,
                            rule.id,
                            l7_proto,
                            l7_json,
                        )
                    )
        entries = frozenset(out)
        memo[rule.index] = entries
        return entries

    def _rule_peers(self, rule: Rule) -> set[tuple[int, int]]:
        """(peer identity, 0) for reserved identities, (0, peer set id) for selected ones,
        {(0, 0)} for any identity."""
        found: set[tuple[int, int]] = set()
        for peer in rule.peers:
            if peer.selector is not None:
                found.add((0, self._set_ids[peer.selector]))
            elif peer.cidr is not None:
                found.add((0, self._set_ids[peer.cidr]))
            elif peer.fqdn is not None:
                found.add((0, self._set_ids[peer.fqdn]))
            elif peer.entity is not None:
                targets = peer.entity.targets
                if targets.wildcard:
                    return {(0, 0)}
                found.update((reserved, 0) for reserved in targets.reserved)
                if targets.cluster:
                    found.add((0, self._set_ids[PeerClass.CLUSTER]))
                if targets.cidr:
                    found.add((0, self._set_ids[PeerClass.CIDR]))
        return found


def _host(address: IPv4Address) -> IPv4Network:
    return IPv4Network((address, 32))


def _host_rule(address: IPv4Address) -> CIDRRule:
    return CIDRRule(_host(address))
