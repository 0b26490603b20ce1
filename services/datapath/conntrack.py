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
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from prometheus_client import Gauge

from services.datapath.maps import CTEntry, decode_ct
from shared import bpf_layouts

QUOTA_REFUSED = Gauge(
    "membrane_datapath_ct_quota_refused",
    "answered connections kept out of ct because their endpoint held its quota "
    "(MEMBRANE_CT_ENDPOINT_MAX), summed over the node's endpoints",
)
LB_QUOTA_REFUSED = Gauge(
    "membrane_datapath_lb_quota_refused",
    "answered service connections whose translation records stayed among the unanswered "
    "ones because their client held its share (MEMBRANE_CT_ENDPOINT_MAX), summed over the "
    "node's endpoints",
)


class Conntrack:
    """The node's conntrack map and what its sweeps must know."""

    def __init__(
        self,
        tables: Sequence[Any],
        pod_cidr: IPv4Network,
        quota: Any = None,
        translations: Sequence[Any] = (),
        lb_quota: tuple[Sequence[Any], Any] | None = None,
    ) -> None:
        self.tables = tables  # the bcc tables of the pinned ``ct`` and ``ct_new`` maps
        self.quota = quota  # the bcc table of ``ct_quota`` (bpf/maps.h), None: not kept
        # service and node-port translation records (bpf/lb.h, nodeport.h): each value starts
        # with its expiry, and the datapath ignores an expired one; the sweep deletes them
        self.translations = translations
        # ((``lb_nat_map``, ``np_nat_map``), ``lb_quota``): the answered records a local pod
        # holds as a client (service connections, masqueraded ones) and their counts
        self.lb_quota = lb_quota
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

    def expire_translations(self) -> int:
        """Delete the translation records whose connection is over. Runs in a thread."""
        now = time.monotonic_ns()
        deleted = 0
        for table in self.translations:
            keys = [key for key, value in table.items() if value.expires_ns < now]
            for key in keys:
                with contextlib.suppress(KeyError):
                    del table[key]
            deleted += len(keys)
        return deleted

    def recount(self, live: set[str]) -> None:
        """Each local endpoint's answered connections, counted again (ct_quota): the datapath
        counts up only, and never sees a deletion or an LRU eviction. An entry is its local
        endpoint's: the sender's when tracked at egress, the receiver's at ingress. A move to
        ct between the scan and the write is lost from the count (an undercount for one
        sweep). Gone endpoints' counts go. Runs in a thread."""
        if self.quota is not None:
            now = time.monotonic_ns()
            held: Counter[str] = Counter()
            for key, value in self.tables[0].items():
                entry = decode_ct(bytes(key), bytes(value), now)
                held[entry.src if entry.scope == "egress" else entry.dst] += 1
            QUOTA_REFUSED.set(_rewrite_counts(self.quota, held, live))
        if self.lb_quota is not None:
            tables, quota = self.lb_quota  # keyed by the client -> frontend tuple
            clients = Counter(_address(key.saddr) for table in tables for key in table)
            LB_QUOTA_REFUSED.set(_rewrite_counts(quota, clients, live))

    async def sweep(self, live: Iterable[str]) -> None:
        """Expired entries, and those of addresses that changed hands (periodic); then the
        endpoints' ct quotas recounted."""
        stale, self.stale = self.stale, set()
        live = set(live) | self.keep
        await asyncio.to_thread(self.collect, live)
        if stale:
            await asyncio.to_thread(self.purge, stale)
        await asyncio.to_thread(self.recount, live)
        await asyncio.to_thread(self.expire_translations)

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


def _address(value: int) -> str:
    """A map's u32 address (network byte order in memory) as text."""
    return socket.inet_ntoa(bpf_layouts.U32.pack(value))


def _rewrite_counts(quota: Any, held: Counter[str], live: set[str]) -> int:
    """Write each live endpoint's exact count into a quota map (maps.h struct ct_quota), drop
    gone endpoints' counts; the refusals summed."""
    refused = 0
    for key, value in list(quota.items()):
        address = _address(key.value)
        if address not in live:
            with contextlib.suppress(KeyError):
                del quota[key]
            continue
        refused += value.refused
        quota[key] = quota.Leaf(held.get(address, 0), value.refused)
    return refused
