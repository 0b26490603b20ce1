"""The container ports each identity's pods declare, cluster-wide, kept per endpoint key.

An egress rule naming a port (``http``) resolves against what the destination's pods declare;
pods of one identity may declare different ports, so an identity's ports are the union over its
pods, recomputed only for the identities an endpoint change touches.
"""

from __future__ import annotations

from shared.messages import ContainerPort, Endpoint


class DeclaredPorts:
    def __init__(self) -> None:
        self._by_key: dict[str, tuple[int, tuple[ContainerPort, ...]]] = {}
        self._keys_of: dict[int, set[str]] = {}  # identity -> its endpoints' keys

    def update(self, key: str, endpoint: Endpoint | None) -> dict[int, list[ContainerPort]]:
        """Record endpoint ``key`` (None: gone); the ports of every identity this changes."""
        touched: set[int] = set()
        old = self._by_key.pop(key, None)
        if old is not None:
            touched.add(old[0])
            keys = self._keys_of[old[0]]
            keys.discard(key)
            if not keys:  # the identity's last endpoint: forget it, not before
                del self._keys_of[old[0]]
        if endpoint is not None:
            self._by_key[key] = (endpoint.identity, tuple(endpoint.ports))
            self._keys_of.setdefault(endpoint.identity, set()).add(key)
            touched.add(endpoint.identity)
        return {identity: self._ports(identity) for identity in sorted(touched)}

    def _ports(self, identity: int) -> list[ContainerPort]:
        declared: dict[tuple[str, str, int], ContainerPort] = {}
        for key in sorted(self._keys_of.get(identity, ())):
            for cp in self._by_key[key][1]:
                declared.setdefault((cp.name, cp.protocol, cp.port), cp)
        return [declared[k] for k in sorted(declared)]
