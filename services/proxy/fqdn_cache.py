"""The names each endpoint of this node resolved through the DNS proxy, with their TTLs.

Pure logic: the proxy publishes :meth:`FQDNCache.message` of each endpoint that changed to the
``fqdn`` bucket, where the policy service turns the addresses into CIDR identities of toFQDNs
peer sets. An address is kept until its TTL (at least ``min_ttl``, Cilium's
``tofqdns-min-ttl``) ends, then ``grace`` seconds more, so that a client that resolved just
before the end still connects; per endpoint and name at most ``max_per_name`` addresses
(Cilium's ``tofqdns-endpoint-max-ip-per-hostname``), the oldest learned out first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shared.fqdn import NameMatch
from shared.messages import FQDNAddress, FQDNCache, FQDNName


@dataclass
class _Endpoint:
    identity: int = 0
    # name -> address -> expiry (unix time); dicts keep insertion order: the oldest first
    names: dict[str, dict[str, float]] = field(default_factory=dict)


class FQDNCaches:
    def __init__(self, node: str, min_ttl: int, grace: float, max_per_name: int) -> None:
        self.node = node
        self.min_ttl = min_ttl
        self.grace = grace
        self.max_per_name = max_per_name
        self._endpoints: dict[str, _Endpoint] = {}

    def __len__(self) -> int:
        return len(self._endpoints)

    def learn(
        self,
        endpoint_ip: str,
        identity: int,
        names: Mapping[str, tuple[Sequence[str], int]],
        now: float,
    ) -> tuple[bool, int]:
        """An answer's addresses (name -> (addresses, TTL)); returns (whether the endpoint's
        published cache changes, addresses evicted by the cap)."""
        endpoint = self._endpoints.setdefault(endpoint_ip, _Endpoint())
        changed = endpoint.identity != identity
        endpoint.identity = identity
        evicted = 0
        for name, (addresses, ttl) in names.items():
            known = endpoint.names.setdefault(name, {})
            expires = now + max(ttl, self.min_ttl)
            for address in addresses:
                old = known.pop(address, None)
                # a new expiry moves the address to the end: the most recently learned
                known[address] = max(expires, old or 0.0)
                # what the policy service holds moves only with the set of addresses; a longer
                # life is published with the next change or expiry
                changed = changed or old is None
            while len(known) > self.max_per_name:
                del known[next(iter(known))]
                evicted += 1
        return changed, evicted

    def expire(self, now: float) -> list[str]:
        """Drops addresses past their TTL and grace; returns the endpoints that changed."""
        changed: list[str] = []
        for endpoint_ip, endpoint in list(self._endpoints.items()):
            before = sum(len(a) for a in endpoint.names.values())
            for name, known in list(endpoint.names.items()):
                for address, expires in list(known.items()):
                    if expires + self.grace <= now:
                        del known[address]
                if not known:
                    del endpoint.names[name]
            if sum(len(a) for a in endpoint.names.values()) != before:
                changed.append(endpoint_ip)
            if not endpoint.names:
                del self._endpoints[endpoint_ip]
        return changed

    def endpoint_ips(self) -> list[str]:
        return list(self._endpoints)

    def clean(self, match: NameMatch | None, endpoint_ip: str = "") -> tuple[list[str], int]:
        """Forgets the names ``match`` matches (None: every name), of one endpoint or all;
        returns the endpoints that changed and how many (endpoint, name) pairs went."""
        changed: list[str] = []
        removed = 0
        for ip, endpoint in list(self._endpoints.items()):
            if endpoint_ip and ip != endpoint_ip:
                continue
            gone = [name for name in endpoint.names if match is None or match.matches(name)]
            for name in gone:
                del endpoint.names[name]
            if gone:
                removed += len(gone)
                changed.append(ip)
            if not endpoint.names:
                del self._endpoints[ip]
        return changed, removed

    def restore(self, cache: FQDNCache) -> None:
        """This node's cache as a previous run of the proxy published it."""
        endpoint = self._endpoints.setdefault(cache.ip, _Endpoint(cache.identity))
        for entry in cache.names:
            known = endpoint.names.setdefault(entry.name, {})
            for address in entry.addresses:
                known[address.ip] = address.expires

    def message(self, endpoint_ip: str) -> FQDNCache | None:
        """The endpoint's cache as published (None: nothing left, delete the key)."""
        endpoint = self._endpoints.get(endpoint_ip)
        if endpoint is None or not endpoint.names:
            return None
        return FQDNCache(
            node=self.node,
            ip=endpoint_ip,
            identity=endpoint.identity,
            names=[
                FQDNName(
                    name=name,
                    addresses=[
                        FQDNAddress(ip=address, expires=round(expires, 3), grace=self.grace)
                        for address, expires in known.items()
                    ],
                )
                for name, known in sorted(endpoint.names.items())
            ],
        )
