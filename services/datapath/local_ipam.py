"""Pod addresses from the node's pod CIDR (the CIDR itself comes from cluster-pool IPAM)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from shared.errors import AlreadyExists, ResourceExhausted


class NodeIPAM:
    """Hands out the host addresses of ``cidr`` except the router's (the first one).

    In memory only: the agent rebuilds it at start from the endpoints it adopts.
    """

    def __init__(self, cidr: IPv4Network) -> None:
        self.cidr = cidr
        self.router = next(cidr.hosts())
        self._used: set[IPv4Address] = {self.router}
        self._reserved: set[IPv4Address] = {self.router}  # never released (router, health)
        self._next = int(self.router) + 1

    def allocate(self) -> IPv4Address:
        hosts = self.cidr.num_addresses - 2
        for _ in range(hosts):
            candidate = IPv4Address(self._next)
            self._next += 1
            if self._next >= int(self.cidr.broadcast_address):
                self._next = int(self.cidr.network_address) + 1
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate
        raise ResourceExhausted(f"no free address left in the pod CIDR {self.cidr}")

    def claim(self, address: IPv4Address) -> None:
        """Mark an address in use (an adopted endpoint's)."""
        if address not in self.cidr or address == self.router:
            raise AlreadyExists(f"{address} is not a pod address of {self.cidr}")
        self._used.add(address)

    def reserve(self, address: IPv4Address) -> None:
        """An address of the node's own (the health endpoint's): in use for good, so that the
        clean-up of a stale pod that once held it cannot hand it out again."""
        self.claim(address)
        self._reserved.add(address)

    def release(self, address: IPv4Address) -> None:
        if address not in self._reserved:
            self._used.discard(address)

    @property
    def in_use(self) -> int:
        return len(self._used) - 1
