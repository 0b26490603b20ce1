"""Numbers the lb service hands out, kept in Redis so that they are stable and unique across
replicas and restarts: frontend ids (the reverse-NAT index), backend ids, cluster IPs, node
ports. Each kind is a pool; a whole apply allocates in one round trip per pool."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions

from shared.errors import AlreadyExists, ResourceExhausted
from shared.protocols import NODE_PORT_RANGE
from shared.redis_store import redis_errors

PREFIX = "membrane:lb:"
MAX_ID = 2**31 - 1
# An allocation of more owners than this goes through the bulk client: its script runs for
# about 5 us an owner on a quiet machine (0.2 s for a 20,000-service bulk's 40,000 backends),
# several times that under load, and Redis answers nothing until it is done, so the 1 s read
# timeout that tells an outage quickly would fail, and retry, a bulk Redis is still working on.
BULK_OWNERS = 1000
BULK_SECONDS = 30.0


@dataclass(frozen=True)
class Pool:
    name: str
    low: int
    high: int

    def keys(self) -> list[str]:
        base = f"{PREFIX}{self.name}:"
        return [base + "owners", base + "values", base + "cursor"]


FRONTENDS = Pool("frontend", 1, MAX_ID)
BACKENDS = Pool("backend", 1, MAX_ID)
NODE_PORTS = Pool("nodeport", *NODE_PORT_RANGE)


class Conflict(AlreadyExists):
    def __init__(self, index: int, holder: str) -> None:
        super().__init__(f"already allocated to {holder}")
        self.index = index
        self.holder = holder


class Allocator:
    def __init__(self, client: aioredis.Redis, bulk: aioredis.Redis | None = None) -> None:
        """``bulk``: a client with a read timeout of :data:`BULK_SECONDS` for large allocations
        (``client`` when not given)."""
        self.client = client
        self.bulk = bulk or client
        scripts = resources.files("services.lb")
        self._allocate = client.register_script(scripts.joinpath("allocate.lua").read_text())
        self._release = client.register_script(scripts.joinpath("release.lua").read_text())

    async def allocate(self, pool: Pool, requests: Sequence[tuple[str, int]]) -> list[int]:
        """The value of each (owner, requested or 0); raises :class:`Conflict` (nothing taken)."""
        if not requests:
            return []
        for owner, _ in requests:
            if "\t" in owner or "\n" in owner:
                raise ValueError(f"an owner holds a tab or newline: {owner!r}")
        args: list[str | int] = [pool.low, pool.high, "\n".join(f"{o}\t{w}" for o, w in requests)]
        with redis_errors(f"allocating {pool.name}s"):
            try:
                via = self.bulk if len(requests) > BULK_OWNERS else self.client
                result = await self._allocate(keys=pool.keys(), args=args, client=via)
            except redis.exceptions.ResponseError as exc:
                text = str(exc)
                if text.startswith("conflict:"):
                    _, index, holder = text.split(":", 2)
                    raise Conflict(int(index), holder) from None
                if "exhausted" in text:
                    raise ResourceExhausted(
                        f"no {pool.name} left in {pool.low}-{pool.high}"
                    ) from None
                raise
        text = result.decode() if isinstance(result, bytes) else str(result)
        return [int(v) for v in text.split(",")]

    async def release(self, pool: Pool, owners: Sequence[str]) -> None:
        if owners:
            with redis_errors(f"releasing {pool.name}s"):
                await self._release(keys=pool.keys()[:2], args=list(owners))

    async def maglev_seed(self) -> int:
        """One seed for the whole cluster, chosen by whichever replica asks first."""
        key = PREFIX + "maglev-seed"
        with redis_errors("reading the Maglev seed"):
            await self.client.set(key, str(secrets.randbits(32)), nx=True)
            value = await self.client.get(key)
        if value is None:
            raise ResourceExhausted("the Maglev seed vanished from Redis")
        return int(value)
