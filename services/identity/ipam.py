"""Cluster-pool IPAM: one pod CIDR per node, carved from the cluster CIDR, kept in Redis.

Allocation is idempotent (a node asking again gets the same CIDR) and atomic (a Lua script), so
any replica may answer. Changing the cluster CIDR under existing allocations is refused rather
than silently handing out overlapping ranges.
"""

from __future__ import annotations

import ipaddress
import time
from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions

from shared.errors import AlreadyExists, Internal, InvalidArgument, NotFound, ResourceExhausted
from shared.labels import validate_key
from shared.redis_store import redis_errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_pool(cluster_cidr: str, mask_size: int) -> tuple[Network, int]:
    try:
        network = ipaddress.ip_network(cluster_cidr, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"{cluster_cidr!r}: {exc}", field="cluster_cidr") from None
    if not network.prefixlen <= mask_size <= network.max_prefixlen:
        raise InvalidArgument(
            f"node mask /{mask_size} must lie between /{network.prefixlen} and "
            f"/{network.max_prefixlen}",
            field="node_mask_size",
        )
    return network, mask_size


class UnderlayTaken(AlreadyExists):
    def __init__(self, address: str, holder: str) -> None:
        super().__init__(
            f"underlay address {address} is held by node {holder!r}", field="underlay_ip"
        )
        self.holder = holder


class PodCIDRAllocator:
    def __init__(
        self,
        client: aioredis.Redis,
        cluster_cidr: str = "10.244.0.0/16",
        mask_size: int = 24,
        prefix: str = "membrane:ipam:",
    ) -> None:
        self.network, self.mask_size = parse_pool(cluster_cidr, mask_size)
        self.size = 1 << (mask_size - self.network.prefixlen)
        self.redis = client
        self.prefix = prefix
        self._fingerprint = f"{self.network}/{mask_size}"
        scripts = resources.files("services.identity")
        self._allocate = client.register_script(scripts.joinpath("ipam.lua").read_text())
        self._release = client.register_script(scripts.joinpath("ipam_release.lua").read_text())

    def subnet(self, index: int) -> Network:
        if not 0 <= index < self.size:
            raise Internal(f"pod CIDR index {index} is outside the pool of {self.size}")
        step = 1 << (self.network.max_prefixlen - self.mask_size)
        base = int(self.network.network_address) + index * step
        return ipaddress.ip_network((base, self.mask_size))

    async def allocate(self, node: str, underlay: str = "", takeover: str = "") -> Network:
        """The node's pod CIDR; with ``underlay``, its underlay address recorded too, unless
        another node holds it (``UnderlayTaken``), or that node is ``takeover`` (found dead)."""
        validate_key(node, field="node")
        args: list[str | int | float] = [
            *(self.prefix, node, self._fingerprint, self.size, underlay, takeover, time.time())
        ]
        with redis_errors("ipam allocate"):
            try:
                index = await self._allocate(args=args)
            except redis.exceptions.ResponseError as exc:
                message = str(exc)
                if message.startswith("underlay_taken:"):
                    raise UnderlayTaken(underlay, message.split(":", 1)[1]) from None
                if "exhausted" in message:
                    raise ResourceExhausted(
                        f"all {self.size} pod CIDRs of {self.network} are allocated"
                    ) from None
                if message.startswith("pool_changed:"):
                    old = message.split(":", 1)[1]
                    raise InvalidArgument(
                        f"the cluster pool changed from {old} to {self._fingerprint} while "
                        "nodes still hold CIDRs from the old one; release them first",
                        field="cluster_cidr",
                    ) from None
                raise
        return self.subnet(int(index))

    async def release(self, node: str) -> Network:
        with redis_errors("ipam release"):
            index = await self._release(args=[self.prefix, node])
        if index is None:
            raise NotFound(f"node {node!r} holds no pod CIDR", field="node")
        return self.subnet(int(index))

    async def underlays(self) -> dict[str, str]:
        """node -> the underlay address recorded for it."""
        with redis_errors("ipam underlays"):
            raw = await self.redis.hgetall(self.prefix + "underlay")
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }

    async def claimed(self, node: str) -> float | None:
        """When the node last asked with its underlay address (unix time), if it holds one."""
        with redis_errors("ipam claimed"):
            value = await self.redis.hget(self.prefix + "claimed", node)
        return None if value is None else float(value)

    async def get(self, node: str) -> Network | None:
        """The node's pod CIDR now, if it holds one."""
        with redis_errors("ipam get"):
            index = await self.redis.hget(self.prefix + "nodes", node)
        return None if index is None else self.subnet(int(index))

    async def list(self) -> dict[str, Network]:
        with redis_errors("ipam list"):
            raw = await self.redis.hgetall(self.prefix + "nodes")
        return {
            (k.decode() if isinstance(k, bytes) else k): self.subnet(int(v))
            for k, v in sorted(raw.items())
        }
