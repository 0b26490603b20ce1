"""Keep the ipcache map equal to the ``ipcache`` KV bucket plus this node's own addresses.

Addresses keep their owner (Cilium's ipcache precedence): for one prefix, this node's own
addresses (``local``) beat the bucket's owned entries (an endpoint, a node, the health
endpoint: any identity below ``LOCAL_BASE``), which beat the CIDR identities policies publish.
A policy naming a pod's ``/32`` (an ``ipBlock.except``, say) therefore never changes who the
address belongs to, and deleting it leaves the pod's entry as it was. Prefixes of policies
still reach the map for addresses nobody owns, with the map's longest-prefix match.

The ``prefixes`` map holds every policy prefix whoever owns its addresses: the datapath asks it
which policy prefix holds a pod's address, for the NetworkPolicy meaning of CIDR rules
(``address_identity`` in bpf/datapath.c).

Addresses the node's DNS proxy just learned (``fqdn.learn``, services/datapath/fqdn_fast.py)
are a layer below the bucket: used only while the bucket says nothing of the address, so the
policy service's entry for it, when it comes, takes over without a write (same value) or
replaces it (the service's number wins).

What reaches ``apply`` has passed the agent's ``IPCacheGuard`` (shared/ipcache_guard.py): a
node's entry only for an address inside the pod CIDR the identity service gave that node, a
policy key only with a CIDR identity.

Each KV change becomes at most one write per map; at start the bucket's snapshot is applied entry
by entry (unchanged entries are not rewritten) and then whatever a previous agent left that
nobody wants is pruned, so nothing is ever flushed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

from prometheus_client import Counter

from services.datapath.maps import IPCacheValue
from shared import identities, log
from shared.messages import IPCacheEntry

V = TypeVar("V")

UPDATES = Counter(
    "membrane_datapath_ipcache_updates_total", "ipcache map writes, by operation", ["operation"]
)


def entry_value(entry: IPCacheEntry) -> tuple[IPv4Network, IPCacheValue]:
    tunnel = IPv4Address(entry.host_ip) if entry.host_ip else IPv4Address(0)
    return IPv4Network(entry.cidr), IPCacheValue(entry.identity, tunnel)


def is_prefix(value: IPCacheValue) -> bool:
    """A policy's CIDR identity (node-local), not an address someone owns."""
    return value.identity >= identities.LOCAL_BASE


class IPCacheSync:
    def __init__(
        self,
        ipcache_map: MutableMapping[IPv4Network, IPCacheValue],
        prefixes_map: MutableMapping[IPv4Network, int] | None = None,
    ) -> None:
        self.map = ipcache_map
        self.prefixes = prefixes_map if prefixes_map is not None else {}
        # the bucket's view: KV key -> address, and per address the value of each key naming
        # it (an owner's key and a policy prefix's key can name the same /32); and the
        # addresses this node pins itself (its own host and router addresses), which win
        self.keys: dict[str, IPv4Network] = {}
        self.from_kv: dict[IPv4Network, dict[str, IPCacheValue]] = {}
        self.local: dict[IPv4Network, IPCacheValue] = {}
        self.learned: dict[IPv4Network, IPCacheValue] = {}  # the DNS fast path's, below all
        self.prefix_nets: dict[int, set[IPv4Network]] = {}  # CIDR identity -> its networks
        self.log = log.get("datapath.ipcache")

    def value_of(self, key: str) -> tuple[IPv4Network, IPCacheValue] | None:
        """What the bucket's ``key`` says now, if anything."""
        net = self.keys.get(key)
        return None if net is None else (net, self.from_kv[net][key])

    def chosen(self, net: IPv4Network) -> IPCacheValue | None:
        """The value the map holds for ``net``: local, else an owner, else a policy prefix."""
        if (value := self.local.get(net)) is not None:
            return value
        named = self.from_kv.get(net)
        if not named:
            return self.learned.get(net)
        # owners before prefixes; among equals the smallest key, so every agent agrees
        return min(named.items(), key=lambda kv: (is_prefix(kv[1]), kv[0]))[1]

    def prefix(self, net: IPv4Network) -> int | None:
        """The CIDR identity of ``net`` if a policy names it (what ``prefixes`` holds)."""
        numbers = [v.identity for v in self.from_kv.get(net, {}).values() if is_prefix(v)]
        if numbers:
            return min(numbers)
        learned = self.learned.get(net)
        return None if learned is None else learned.identity

    def desired(self) -> dict[IPv4Network, IPCacheValue]:
        nets = set(self.from_kv) | set(self.local) | set(self.learned)
        return {net: value for net in nets if (value := self.chosen(net)) is not None}

    def prune(self) -> int:
        """Delete map entries nothing wants (left by a previous agent); after the snapshot."""
        wanted = self.desired()
        stale = [net for net in self.map if net not in wanted]
        for net in stale:
            self.map.pop(net, None)
        stale_prefixes = [net for net in self.prefixes if self.prefix(net) is None]
        for net in stale_prefixes:
            self.prefixes.pop(net, None)
        UPDATES.labels("delete").inc(len(stale) + len(stale_prefixes))
        return len(stale) + len(stale_prefixes)

    def set_local(self, net: IPv4Network, value: IPCacheValue) -> None:
        self.local[net] = value
        self._write(net)

    def remove_local(self, net: IPv4Network) -> None:
        """Stop pinning ``net``; what the bucket says about it (if anything) takes over."""
        self.local.pop(net, None)
        self._write(net)

    def set_learned(self, net: IPv4Network, value: IPCacheValue) -> None:
        self.learned[net] = value
        self._write(net)

    def remove_learned(self, net: IPv4Network) -> None:
        if self.learned.pop(net, None) is not None:
            self._write(net)

    def apply(self, key: str, entry: IPCacheEntry | None) -> None:
        """One KV change: write or delete the single affected entry."""
        old = self.keys.pop(key, None)
        if old is not None:
            named = self.from_kv[old]
            gone = named.pop(key)
            if is_prefix(gone):
                _discard(self.prefix_nets, gone.identity, old)
            if not named:
                del self.from_kv[old]
        if entry is not None:
            net, value = entry_value(entry)
            self.keys[key] = net
            self.from_kv.setdefault(net, {})[key] = value
            if is_prefix(value):
                self.prefix_nets.setdefault(value.identity, set()).add(net)
            self._write(net)
        if old is not None and (entry is None or old != self.keys[key]):
            self._write(old)

    def _write(self, net: IPv4Network) -> None:
        _put(self.prefixes, net, self.prefix(net))
        _put(self.map, net, self.chosen(net))


def _discard(index: dict[int, set[IPv4Network]], number: int, net: IPv4Network) -> None:
    nets = index.get(number)
    if nets is not None:
        nets.discard(net)
        if not nets:
            del index[number]


def _put(bpf_map: MutableMapping[IPv4Network, V], net: IPv4Network, value: V | None) -> None:
    """Make ``bpf_map[net]`` be ``value`` (None: absent), writing only on a change."""
    if value is None:
        if bpf_map.pop(net, None) is not None:
            UPDATES.labels("delete").inc()
    elif bpf_map.get(net) != value:
        bpf_map[net] = value
        UPDATES.labels("update").inc()
