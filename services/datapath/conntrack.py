"""Conntrack cleanup for one node: expired entries, and those of addresses that changed hands.

The node's connections are in two maps (``ct``: answered, ``ct_new``: not answered yet; see
bpf/maps.h); every operation here covers both.

The kernel's LRU map evicts only under pressure, so the agent sweeps it: periodically for
expired entries and for pod addresses no local endpoint holds any more, and shortly after an
address changes identity or goes (its old connections must not outlive the policy that allowed
them). The scans run in a worker thread; the sets they read are taken on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from services.datapath.maps import CTEntry, decode_ct


class Conntrack:
    """The node's conntrack map and what its sweeps must know."""

    def __init__(self, tables: Sequence[Any], pod_cidr: IPv4Network) -> None:
        self.tables = tables  # the bcc tables of the pinned ``ct`` and ``ct_new`` maps
        self.pod_cidr = pod_cidr
        # addresses whose identity changed or went: their connections are purged shortly
        self.stale: set[str] = set()
        # local addresses that are not pods' (the health endpoint): their connections are not
        # swept as those of a pod gone
        self.keep: set[str] = set()

    def collect(self, live: set[str]) -> int:
        """Delete expired entries, and those of pod addresses no local endpoint holds
        (``live``, taken on the event loop). Runs in a thread."""
        cidr = self.pod_cidr

        def doomed(entry: CTEntry) -> bool:
            gone = (
                ip for ip in (entry.src, entry.dst) if IPv4Address(ip) in cidr and ip not in live
            )
            return entry.expires_in < 0 or any(gone)

        return self._delete_where(doomed)

    def purge(self, addresses: set[str]) -> int:
        """Delete every entry of these addresses (their holder changed). Runs in a thread."""
        return self._delete_where(lambda e: e.src in addresses or e.dst in addresses)

    async def sweep(self, live: Iterable[str]) -> None:
        """Expired entries, and those of addresses that changed hands (periodic)."""
        stale, self.stale = self.stale, set()
        await asyncio.to_thread(self.collect, set(live) | self.keep)
        if stale:
            await asyncio.to_thread(self.purge, stale)

    async def purge_stale(self) -> None:
        if self.stale:
            stale, self.stale = self.stale, set()
            await asyncio.to_thread(self.purge, stale)

    def entries(self) -> list[CTEntry]:
        """The live entries (an expired one is already gone for the datapath)."""
        now = time.monotonic_ns()
        found = (
            decode_ct(bytes(k), bytes(v), now) for table in self.tables for k, v in table.items()
        )
        return [entry for entry in found if entry.expires_in >= 0]

    def _delete_where(self, doomed: Callable[[CTEntry], bool]) -> int:
        now = time.monotonic_ns()
        deleted = 0
        for table in self.tables:
            keys = [
                key
                for key, value in table.items()
                if doomed(decode_ct(bytes(key), bytes(value), now))
            ]
            for key in keys:
                with contextlib.suppress(KeyError):
                    del table[key]
            deleted += len(keys)
        return deleted
