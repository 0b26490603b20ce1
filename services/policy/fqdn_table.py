"""What ``toFQDNs`` selectors select: the addresses the DNS proxies learned for matching names.

Each DNS proxy publishes one cache per endpoint (``fqdn`` bucket: name -> addresses, with TTLs;
entries leave it after their TTL and grace period). This table keeps the union of all of them,
and per selector in use (``NameMatch``) the addresses of the names it matches. An address some
selector holds needs a CIDR identity (its ``/32``): :meth:`FQDNTable.set_cache` says which
addresses start and stop being held, for the resolver to acquire and release them in its
CIDR table, and which selectors' members changed. Work follows the change: a cache update
touches only its own names, each offered to the selectors in use (few: one per toFQDNs entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from shared.fqdn import NameMatch


@dataclass
class FQDNChange:
    selectors: set[NameMatch] = field(default_factory=set)
    held: set[IPv4Address] = field(default_factory=set)  # now selected by some selector
    released: set[IPv4Address] = field(default_factory=set)  # selected by none any more


class FQDNTable:
    def __init__(self) -> None:
        self._caches: dict[str, dict[str, frozenset[IPv4Address]]] = {}
        self._names: dict[str, dict[IPv4Address, int]] = {}  # name -> address -> caches holding
        self._selector_refs: dict[NameMatch, int] = {}
        self._selected: dict[NameMatch, dict[IPv4Address, set[str]]] = {}  # -> names behind it
        self._held: dict[IPv4Address, int] = {}  # address -> selectors holding it

    def addresses(self, selector: NameMatch) -> set[IPv4Address]:
        return set(self._selected.get(selector, ()))

    def names_of(self, address: IPv4Address) -> list[str]:
        """The learned names that resolve to ``address`` (for ``explain`` and flows)."""
        return sorted(name for name, found in self._names.items() if address in found)

    def selected_by(self, selector: NameMatch, address: IPv4Address) -> list[str]:
        return sorted(self._selected.get(selector, {}).get(address, ()))

    # --- selectors -----------------------------------------------------------------------------

    def acquire(self, selector: NameMatch) -> FQDNChange:
        change = FQDNChange()
        count = self._selector_refs.get(selector, 0)
        self._selector_refs[selector] = count + 1
        if count:
            return change
        chosen: dict[IPv4Address, set[str]] = {}
        for name, found in self._names.items():
            if selector.matches(name):
                for address in found:
                    chosen.setdefault(address, set()).add(name)
        self._selected[selector] = chosen
        for address in chosen:
            self._hold(address, change)
        return change

    def release(self, selector: NameMatch) -> FQDNChange:
        change = FQDNChange()
        count = self._selector_refs[selector] - 1
        if count:
            self._selector_refs[selector] = count
            return change
        del self._selector_refs[selector]
        for address in self._selected.pop(selector):
            self._unhold(address, change)
        return change

    # --- caches --------------------------------------------------------------------------------

    def set_cache(self, key: str, names: Mapping[str, Iterable[IPv4Address]] | None) -> FQDNChange:
        """One endpoint's cache (None: gone), replacing what the key held before."""
        change = FQDNChange()
        old = self._caches.pop(key, {})
        new = {name: frozenset(found) for name, found in (names or {}).items()}
        if new:
            self._caches[key] = new
        for name in old.keys() | new.keys():
            before, after = old.get(name, frozenset()), new.get(name, frozenset())
            for address in after - before:
                self._add(name, address, change)
            for address in before - after:
                self._remove(name, address, change)
        return change

    def _add(self, name: str, address: IPv4Address, change: FQDNChange) -> None:
        found = self._names.setdefault(name, {})
        count = found.get(address, 0)
        found[address] = count + 1
        if count:
            return
        for selector, chosen in self._selected.items():
            if selector.matches(name):
                names = chosen.setdefault(address, set())
                if not names:
                    self._hold(address, change)
                    change.selectors.add(selector)
                names.add(name)

    def _remove(self, name: str, address: IPv4Address, change: FQDNChange) -> None:
        found = self._names[name]
        count = found[address] - 1
        if count:
            found[address] = count
            return
        del found[address]
        if not found:
            del self._names[name]
        for selector, chosen in self._selected.items():
            names = chosen.get(address)
            if names is None or name not in names:
                continue
            names.discard(name)
            if not names:
                del chosen[address]
                self._unhold(address, change)
                change.selectors.add(selector)

    def _hold(self, address: IPv4Address, change: FQDNChange) -> None:
        count = self._held.get(address, 0)
        self._held[address] = count + 1
        if not count:
            change.held.add(address)
            change.released.discard(address)

    def _unhold(self, address: IPv4Address, change: FQDNChange) -> None:
        count = self._held[address] - 1
        if count:
            self._held[address] = count
            return
        del self._held[address]
        if address in change.held:
            change.held.discard(address)
        else:
            change.released.add(address)
