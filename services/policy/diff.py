"""``policy diff``: which recorded flows would change verdict if some documents were applied.

Both sides are decided by :func:`services.policy.explain.explain` — the datapath's compiler and
lookup on the resolver's output, the same code ``policy explain`` uses — on the live resolver,
once as it is and once with the documents applied for the duration of the call
(:meth:`services.policy.resolver.Resolver.trial`: the work of applying them, not of a second
resolver). Nothing here knows policy semantics.

Only flows with an end whose policy the documents change are replayed twice: the verdict of a
flow depends on the egress policy of its source and the ingress policy of its destination, and
a document changes the policy of exactly the identities it (or the policy it replaces) selects.
An address outside the cluster is given, on each side, the identity its ipcache would give it
(longest-prefix match over the CIDR identities), since a document naming a new CIDR creates one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from services.policy.explain import Explanation, SideVerdict, explain
from services.policy.model import PROTOCOL_NAMES, Policy
from services.policy.resolver import Resolver
from shared import identities
from shared.flow_api import FlowGroup, VerdictChange
from shared.messages import ContainerPort

ALLOWED = "allowed"
AUDIT = "audit"
DROPPED = "dropped"
_PROTOCOLS = {name.upper(): number for number, name in PROTOCOL_NAMES.items()}

ExplainKey = tuple[int, int, int, int]


class _AddressIdentities:
    """Address -> identity as the ipcache gives it: the longest known CIDR, else world."""

    def __init__(self, resolver: Resolver) -> None:
        self._by_length: list[tuple[int, dict[int, int]]] = []
        by_length: dict[int, dict[int, int]] = {}
        for network, number in resolver.cidr_identities().items():
            by_length.setdefault(network.prefixlen, {})[int(network.network_address)] = number
        self._by_length = sorted(by_length.items(), reverse=True)

    def __call__(self, address: str) -> int:
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return identities.WORLD
        for length, networks in self._by_length:
            mask = ((1 << length) - 1) << (32 - length) if length else 0
            found = networks.get(value & mask)
            if found is not None:
                return found
        return identities.WORLD


class _Replay:
    """One resolver's verdicts, memoized by (source, destination, protocol, port)."""

    def __init__(self, resolver: Resolver, ports: Mapping[int, Sequence[ContainerPort]]) -> None:
        self.resolver = resolver
        self.ports = ports
        self.address_identity = _AddressIdentities(resolver)
        self.memo: dict[ExplainKey, Explanation] = {}

    def identity(self, number: int, address: str) -> int:
        outside = number == identities.WORLD or number >= identities.LOCAL_BASE
        return self.address_identity(address) if outside and address else number

    def explain(self, group: FlowGroup, protocol: int) -> Explanation:
        src = self.identity(group.src_identity, group.src_ip)
        dst = self.identity(group.dst_identity, group.dst_ip)
        key = (src, dst, protocol, group.port)
        found = self.memo.get(key)
        if found is None:
            found = explain(
                self.resolver,
                src,
                dst,
                protocol,
                group.port,
                src_ports=self.ports.get(src, ()),
                dst_ports=self.ports.get(dst, ()),
            )
            self.memo[key] = found
        return found


def outcome(explanation: Explanation) -> str:
    if not explanation.allowed:
        return DROPPED
    sides = (explanation.egress, explanation.ingress)
    return AUDIT if any(side.verdict == "audit" for side in sides) else ALLOWED


def protocol_number(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    return _PROTOCOLS.get(text.upper())


def diff(
    live: Resolver,
    documents: Sequence[Policy],
    groups: Sequence[FlowGroup],
    ports: Mapping[int, Sequence[ContainerPort]],
) -> tuple[list[VerdictChange], set[int]]:
    """The groups whose verdict changes with ``documents`` applied, and the identities whose
    policy they change. The documents are applied to ``live`` only for the call
    (:meth:`Resolver.trial`)."""
    before = _Replay(live, ports)
    replayed: list[tuple[FlowGroup, int]] = []
    will: list[Explanation] = []
    with live.trial(documents) as affected:
        after = _Replay(live, ports)
        for group in groups:
            protocol = protocol_number(group.protocol)
            if protocol is None:
                continue
            ends = (
                before.identity(group.src_identity, group.src_ip),
                before.identity(group.dst_identity, group.dst_ip),
            )
            moved = ends != (
                after.identity(group.src_identity, group.src_ip),
                after.identity(group.dst_identity, group.dst_ip),
            )
            if moved or not affected.isdisjoint(ends):
                replayed.append((group, protocol))
                will.append(after.explain(group, protocol))
        affected = set(affected)
    changes: list[VerdictChange] = []
    for (group, protocol), new in zip(replayed, will, strict=True):
        old = before.explain(group, protocol)
        was_outcome, will_outcome = outcome(old), outcome(new)
        if was_outcome == will_outcome:
            continue
        side = _deciding(old, new)
        changes.append(
            VerdictChange(
                group=group,
                before=was_outcome,
                after=will_outcome,
                direction=side.direction,
                policy=_policy_of(side),
                rule=side.rule,
                reason=side.reason,
            )
        )
    return changes, affected


def _deciding(was: Explanation, will: Explanation) -> SideVerdict:
    """The side of the new verdict that changed: the one now dropping, or the one that opened."""
    pairs = ((was.egress, will.egress), (was.ingress, will.ingress))
    if not will.allowed:
        dropping = [new for old, new in pairs if not new.allowed]
        changed = [new for old, new in pairs if not new.allowed and old.verdict != new.verdict]
        return (changed or dropping)[0]
    opened = [new for old, new in pairs if old.verdict != new.verdict]
    return (opened or [will.ingress])[0]


def _policy_of(side: SideVerdict) -> str:
    """The deciding rule's policy (a rule is named ``<policy>[<index>]``), else the policies
    selecting the subject: a default deny is theirs."""
    if side.rule:
        return side.rule.rpartition("[")[0]
    return ", ".join(side.selected_by)
