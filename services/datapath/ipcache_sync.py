"""Keep the ipcache map equal to the ``ipcache`` KV bucket plus this node's own addresses.

Each KV change becomes at most one map write; at start the bucket's snapshot is applied entry
by entry (unchanged entries are not rewritten) and then whatever a previous agent left that
nobody wants is pruned, so nothing is ever flushed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from ipaddress import IPv4Address, IPv4Network

from prometheus_client import Counter

from services.datapath.maps import IPCacheValue
from shared import log
from shared.messages import IPCacheEntry

UPDATES = Counter(
    "membrane_datapath_ipcache_updates_total", "ipcache map writes, by operation", ["operation"]
)


def entry_value(entry: IPCacheEntry) -> tuple[IPv4Network, IPCacheValue]:
    tunnel = IPv4Address(entry.host_ip) if entry.host_ip else IPv4Address(0)
    return IPv4Network(entry.cidr), IPCacheValue(entry.identity, tunnel)


class IPCacheSync:
    def __init__(self, ipcache_map: MutableMapping[IPv4Network, IPCacheValue]) -> None:
        self.map = ipcache_map
        # the bucket's view (KV key -> address, address -> value) and the addresses this node
        # pins itself (its own host and router addresses), which win over the bucket
        self.keys: dict[str, IPv4Network] = {}
        self.from_kv: dict[IPv4Network, IPCacheValue] = {}
        self.local: dict[IPv4Network, IPCacheValue] = {}
        self.log = log.get("datapath.ipcache")

    def desired(self) -> dict[IPv4Network, IPCacheValue]:
        return {**self.from_kv, **self.local}

    def prune(self) -> int:
        """Delete map entries nothing wants (left by a previous agent); after the snapshot."""
        wanted = self.desired()
        stale = [net for net in self.map if net not in wanted]
        for net in stale:
            self.map.pop(net, None)
        UPDATES.labels("delete").inc(len(stale))
        return len(stale)

    def set_local(self, net: IPv4Network, value: IPCacheValue) -> None:
        self.local[net] = value
        self._write(net)

    def remove_local(self, net: IPv4Network) -> None:
        """Stop pinning ``net``; what the bucket says about it (if anything) takes over."""
        self.local.pop(net, None)
        self._write(net)

    def apply(self, key: str, entry: IPCacheEntry | None) -> None:
        """One KV change: write or delete the single affected entry."""
        old = self.keys.pop(key, None)
        if old is not None:
            self.from_kv.pop(old, None)
        if entry is not None:
            net, value = entry_value(entry)
            self.keys[key] = net
            self.from_kv[net] = value
            self._write(net)
        if old is not None and old not in self.from_kv:
            self._write(old)

    def _write(self, net: IPv4Network) -> None:
        value = self.local.get(net) or self.from_kv.get(net)
        if value is None:
            if self.map.pop(net, None) is not None:
                UPDATES.labels("delete").inc()
        elif self.map.get(net) != value:
            self.map[net] = value
            UPDATES.labels("update").inc()
