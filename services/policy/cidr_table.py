"""Node-local CIDR identities, and which of them each CIDR rule selects.

The approach (the same as Cilium's CIDR identities):

- Every distinct network a policy names, as a ``cidr`` or as an ``except``, gets one identity
  ``LOCAL_BASE | n`` while some policy references it. The datapath's ipcache maps an address by
  longest-prefix match, so an address gets the identity of the most specific known network
  containing it, and ``world`` (2) when none does. A prefix of length 0 gets no identity: it
  would hide ``world``, which such a rule selects instead (``CIDRRule.selects_world``).
- ``n`` is a hash of the network (24 bits, never 0), probing upwards on the rare collision, so
  that a network keeps its number across restarts and a rebuilt table agrees with the old one:
  the ipcache and the policy maps do not churn when the policy service restarts.
- A rule ``(network P, excepts E)`` selects the identity of every known network N inside P and
  inside no except, plus ``world`` when P is a /0. Known networks either nest or are disjoint,
  so this is exact: the addresses that get N's identity all lie in N; an except gets its own,
  unselected identity, so longest-prefix match carves it out of P; and a more specific network
  that another policy added inside P is selected by P's rule too, so that adding it does not
  take addresses away from P's rule.
- The selection of each rule is cached and maintained incrementally: a new network N is offered
  only to the rules whose network is one of N's at most 33 (IPv4) / 129 (IPv6) supernets.
- A rule with the NetworkPolicy meaning (``CIDRRule.pods``) also selects ``ADDRESS | id`` for
  every identity it selects: the slots the datapath consults with a pod address's own most
  specific policy prefix (``shared.identities.ADDRESS``). The same nesting argument makes that
  exact per address: a pod address gets the identity of the most specific known network holding
  it, or ``world``, exactly as an address outside the cluster would.

IPv6 networks get identities too (so rules naming them resolve), but the ipcache is IPv4 only
(``services.datapath.ipcache_sync``), so :meth:`CIDRTable.identities` and
:meth:`CIDRTable.take_changes` report IPv4 networks only.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

from services.policy.model import LOCAL_BASE, RESERVED_WORLD, CIDRRule, Network
from shared.identities import ADDRESS, LOCAL_SPAN, cidr_slot


def _excluded(rule: CIDRRule, network: Network) -> bool:
    return any(
        network.version == exc.version and network.subnet_of(exc)  # type: ignore[arg-type]
        for exc in rule.excepts
    )


def _selected(rule: CIDRRule, ident: int) -> tuple[int, ...]:
    """What selecting ``ident`` means for ``rule``: the identity, and its address slot too."""
    return (ident, ADDRESS | ident) if rule.pods else (ident,)


def _within(rule: CIDRRule, network: Network) -> bool:
    if network.version != rule.network.version:
        return False
    return network.subnet_of(rule.network) and not _excluded(rule, network)  # type: ignore[arg-type]


@dataclass
class CIDRChange:
    """What one acquire/release did to other rules: their selections, and the table itself."""

    rules: set[CIDRRule]
    table_changed: bool


class CIDRTable:
    def __init__(self) -> None:
        self._ids: dict[Network, int] = {}
        self._taken: set[int] = set()
        self._net_refs: dict[Network, int] = {}
        self._rule_refs: dict[CIDRRule, int] = {}
        self._rules_by_network: dict[Network, set[CIDRRule]] = {}
        self._matches: dict[CIDRRule, set[int]] = {}
        self._dirty: set[Network] = set()
        self._published: dict[IPv4Network, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def all_ids(self) -> set[int]:
        return self._taken

    def identity_of(self, network: Network) -> int | None:
        return self._ids.get(network)

    def matches(self, rule: CIDRRule) -> set[int]:
        """The identities a referenced rule selects (the table's own set: do not modify)."""
        return self._matches[rule]

    def identities(self) -> dict[IPv4Network, int]:
        return {net: ident for net, ident in self._ids.items() if isinstance(net, IPv4Network)}

    def take_changes(self) -> tuple[dict[IPv4Network, int], list[IPv4Network]]:
        """(networks added or renumbered, networks removed) since the last call, IPv4 only."""
        added: dict[IPv4Network, int] = {}
        removed: list[IPv4Network] = []
        for net in sorted(n for n in self._dirty if isinstance(n, IPv4Network)):
            ident = self._ids.get(net)
            if ident is None:
                if self._published.pop(net, None) is not None:
                    removed.append(net)
            elif self._published.get(net) != ident:
                self._published[net] = ident
                added[net] = ident
        self._dirty.clear()
        return added, removed

    def pending(self) -> set[Network]:
        """The networks :meth:`take_changes` would look at (for a trial to put back)."""
        return set(self._dirty)

    def restore_pending(self, dirty: set[Network]) -> None:
        self._dirty = dirty

    # --- references ----------------------------------------------------------------------------

    def acquire(self, rule: CIDRRule) -> CIDRChange:
        count = self._rule_refs.get(rule, 0)
        self._rule_refs[rule] = count + 1
        change = CIDRChange(set(), False)
        if count:
            return change
        for net in self._networks(rule):
            self._add_network(net, change)
        self._rules_by_network.setdefault(rule.network, set()).add(rule)
        selected = {
            number
            for net, ident in self._ids.items()
            if _within(rule, net)
            for number in _selected(rule, ident)
        }
        if rule.selects_world:
            selected.update(_selected(rule, RESERVED_WORLD))
        self._matches[rule] = selected
        return change

    def release(self, rule: CIDRRule) -> CIDRChange:
        change = CIDRChange(set(), False)
        count = self._rule_refs[rule] - 1
        if count:
            self._rule_refs[rule] = count
            return change
        del self._rule_refs[rule]
        del self._matches[rule]
        holders = self._rules_by_network[rule.network]
        holders.discard(rule)
        if not holders:
            del self._rules_by_network[rule.network]
        for net in self._networks(rule):
            self._release_network(net, change)
        return change

    @staticmethod
    def _networks(rule: CIDRRule) -> list[Network]:
        nets = [] if rule.selects_world else [rule.network]
        return nets + list(rule.excepts)

    def _containing_rules(self, network: Network) -> list[CIDRRule]:
        found: list[CIDRRule] = []
        for prefixlen in range(network.prefixlen + 1):
            found.extend(self._rules_by_network.get(network.supernet(new_prefix=prefixlen), ()))
        return found

    def _add_network(self, network: Network, change: CIDRChange) -> None:
        count = self._net_refs.get(network, 0)
        self._net_refs[network] = count + 1
        if count:
            return
        slot = cidr_slot(network)
        while LOCAL_BASE | slot in self._taken:
            slot = slot % (LOCAL_SPAN - 1) + 1
        ident = LOCAL_BASE | slot
        self._ids[network] = ident
        self._taken.add(ident)
        self._dirty.add(network)
        change.table_changed = True
        for rule in self._containing_rules(network):
            if not _excluded(rule, network):
                self._matches[rule].update(_selected(rule, ident))
                change.rules.add(rule)

    def _release_network(self, network: Network, change: CIDRChange) -> None:
        count = self._net_refs[network] - 1
        if count:
            self._net_refs[network] = count
            return
        del self._net_refs[network]
        ident = self._ids.pop(network)
        self._taken.discard(ident)
        self._dirty.add(network)
        change.table_changed = True
        for rule in self._containing_rules(network):
            if ident in self._matches[rule]:
                self._matches[rule].difference_update(_selected(rule, ident))
                change.rules.add(rule)
