"""Keep the ipcache map equal to the ``ipcache`` KV bucket plus this node's own addresses.

Each KV change becomes at most one map write; at start the map (possibly left by a previous
agent) is diffed against the bucket's snapshot, so stale entries go and nothing is flushed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
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

    def resync(self, snapshot: Mapping[str, IPCacheEntry]) -> tuple[int, int]:
        """Replace the KV view wholesale and write the difference; returns (written, deleted)."""
        self.keys.clear()
        self.from_kv.clear()
        for key, entry in snapshot.items():
            net, value = entry_value(entry)
            self.keys[key] = net
            self.from_kv[net] = value
        wanted = self.desired()
        written = deleted = 0
        for net, value in wanted.items():
            if self.map.get(net) != value:
                self.map[net] = value
                written += 1
        for net in [net for net in self.map if net not in wanted]:
            self.map.pop(net, None)
            deleted += 1
        UPDATES.labels("update").inc(written)
        UPDATES.labels("delete").inc(deleted)
        return written, deleted

    def set_local(self, net: IPv4Network, value: IPCacheValue) -> None:
        self.local[net] = value
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
