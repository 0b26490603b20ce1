"""Identity allocation state in Redis, changed only by atomic Lua scripts.

Any number of allocators (service replicas) share one Redis: a label set always yields the same
id, two label sets never share one, and there is no window in which either could happen,
because each decision is one script run. This module knows nothing of NATS.

Redis layout under ``prefix`` (default ``membrane:identity:``):

- ``labels`` hash canonical labels -> id, ``ids`` hash id -> canonical labels
- ``next`` the next never-used id
- ``refs`` hash id -> references cluster-wide; ``owner:<owner>`` hash id -> that owner's
- ``leases`` zset owner -> lease expiry (``+inf`` for owners without a lease)
- ``gc`` zset id -> time it may be deleted; ``free`` zset id -> time it may be reused
- ``req:<request id>`` the answer to a request, for retries; ``lock:<name>`` cluster-wide locks
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis
import redis.exceptions

from services.identity import reserved
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.labels import SOURCE_CIDR, SOURCE_RESERVED, LabelFilter, LabelSet
from shared.redis_store import ScriptPipeline, redis_errors

MAX_OWNER_LENGTH = 253
# how long a request id is remembered, so that a retry within it is answered, not repeated
REQUEST_MEMORY_SECONDS = 300


def _script(name: str) -> str:
    return resources.files("services.identity").joinpath(name).read_text()


@dataclass(frozen=True)
class Allocation:
    id: int
    labels: LabelSet
    new: bool


@dataclass(frozen=True)
class GCResult:
    expired_owners: list[str]
    deleted_ids: list[int]


def validate_owner(owner: str) -> str:
    if not owner or len(owner) > MAX_OWNER_LENGTH or any(c.isspace() for c in owner):
        raise InvalidArgument(
            f"owner must be 1-{MAX_OWNER_LENGTH} characters without spaces", field="owner"
        )
    return owner


class IdentityAllocator:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        label_filter: LabelFilter | None = None,
        min_id: int = reserved.CLUSTER_MIN,
        max_id: int = reserved.CLUSTER_MAX,
        grace_seconds: float = 300.0,
        prefix: str = "membrane:identity:",
    ) -> None:
        if not reserved.CLUSTER_MIN <= min_id <= max_id <= reserved.CLUSTER_MAX:
            raise InvalidArgument(
                f"identity range must lie within {reserved.CLUSTER_MIN}-{reserved.CLUSTER_MAX}",
                field="identity_range",
            )
        self.redis = client
        self.filter = label_filter or LabelFilter()
        self.min_id = min_id
        self.max_id = max_id
        self.grace_seconds = grace_seconds
        self.prefix = prefix
        self._allocate = client.register_script(_script("allocate.lua"))
        self._release = client.register_script(_script("release.lua"))
        self._gc = client.register_script(_script("gc.lua"))
        self._heartbeat = client.register_script(_script("heartbeat.lua"))
        self._unlock = client.register_script(_script("unlock.lua"))
        self._scripts = ScriptPipeline(client)
        self._normalize = functools.lru_cache(maxsize=16384)(self._normalize_uncached)
        # ids for requests that came without one: unique per process, cheap to make
        self._own_requests = itertools.count()
        self._own_prefix = f"own-{os.urandom(6).hex()}-"

    def _request_key(self, request_id: str) -> str:
        if len(request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters", field="request_id")
        return request_id or f"{self._own_prefix}{next(self._own_requests)}"

    async def close(self) -> None:
        await self._scripts.close()

    def normalize(self, raw: list[str]) -> LabelSet:
        """Parse, validate and filter labels; the result is what the identity stands for.

        Cached: the same few label sets come again and again (every replica, every restart),
        and a LabelSet is immutable. Invalid input raises and is not cached.
        """
        return self._normalize(tuple(raw))

    def _normalize_uncached(self, raw: tuple[str, ...]) -> LabelSet:
        if not raw:
            raise InvalidArgument("at least one label is required", field="labels")
        labels = self.filter.apply(LabelSet.parse(raw))
        if not labels:
            raise InvalidArgument(
                "every label was dropped by the identity label filter", field="labels"
            )
        return labels

    async def allocate(
        self, raw: list[str], owner: str, lease_seconds: float = 0, request_id: str = ""
    ) -> Allocation:
        """The identity of ``raw``, with one more reference held by ``owner``.

        ``request_id`` makes a retry of the same request (after a timeout) return the first
        result instead of taking a second reference; without one, this call makes its own,
        which covers the Redis client's internal retries.
        """
        labels = self.normalize(raw)
        validate_owner(owner)
        if lease_seconds < 0:
            raise InvalidArgument("lease_seconds must not be negative", field="lease_seconds")
        sources = {labels[key].source for key in labels}
        if SOURCE_RESERVED in sources:
            return self._reserved(labels)
        if SOURCE_CIDR in sources:
            raise InvalidArgument(
                "cidr identities are node-local; the datapath allocates them", field="labels"
            )
        with redis_errors("allocate"):
            try:
                number, new = await self._scripts.run(
                    self._allocate,
                    [
                        self.prefix,
                        labels.canonical,
                        owner,
                        lease_seconds,
                        self.min_id,
                        self.max_id,
                        self._request_key(request_id),
                        REQUEST_MEMORY_SECONDS,
                    ],
                )
            except redis.exceptions.ResponseError as exc:
                if "exhausted" in str(exc):
                    raise ResourceExhausted(
                        f"all identities {self.min_id}-{self.max_id} are in use or quarantined"
                    ) from None
                if "lease_mismatch" in str(exc):
                    raise InvalidArgument(
                        f"owner {owner!r} already holds references "
                        + ("without a lease" if lease_seconds > 0 else "under a lease")
                        + "; one owner cannot mix leased and lease-less references",
                        field="lease_seconds",
                    ) from None
                raise
        return Allocation(int(number), labels, bool(new))

    def _reserved(self, labels: LabelSet) -> Allocation:
        if len(labels) != 1:
            raise InvalidArgument(
                "a reserved label stands alone; it cannot be combined with others",
                field="labels",
            )
        (label,) = labels.values()
        number = reserved.RESERVED.get(label.key)
        if number is None:
            raise InvalidArgument(
                f"unknown reserved identity {label.key!r}; known: " + ", ".join(reserved.RESERVED),
                field=f"labels[{str(label)!r}]",
            )
        return Allocation(number, labels, False)

    async def release(self, number: int, owner: str, request_id: str = "") -> int:
        """Drop one reference of ``owner``; returns the references left cluster-wide.

        ``request_id`` makes a retry safe, as for :meth:`allocate`.
        """
        validate_owner(owner)
        if number in reserved.BY_ID:
            return 1  # reserved identities are never released
        with redis_errors("release"):
            try:
                left = await self._scripts.run(
                    self._release,
                    [
                        self.prefix,
                        number,
                        owner,
                        self.grace_seconds,
                        self._request_key(request_id),
                        REQUEST_MEMORY_SECONDS,
                    ],
                )
            except redis.exceptions.ResponseError as exc:
                if "not_referenced" in str(exc):
                    raise NotFound(
                        f"owner {owner!r} holds no reference to identity {number}", field="id"
                    ) from None
                raise
        return int(left)

    async def renew_lease(self, owner: str, ttl_seconds: float) -> float:
        """Extend an owner's lease; returns the new expiry (unix seconds, Redis clock)."""
        validate_owner(owner)
        if ttl_seconds <= 0:
            raise InvalidArgument("ttl_seconds must be positive", field="ttl_seconds")
        with redis_errors("heartbeat"):
            try:
                expires = await self._heartbeat(args=[self.prefix, owner, ttl_seconds])
            except redis.exceptions.ResponseError as exc:
                if "no_lease" in str(exc):
                    # its lease lapsed and its references are gone: the owner must allocate
                    # again rather than believe it still holds them
                    raise NotFound(
                        f"owner {owner!r} holds no references (lease lapsed or never taken); "
                        "allocate again",
                        field="owner",
                    ) from None
                if "not_leased" in str(exc):
                    raise InvalidArgument(
                        f"owner {owner!r} holds references without a lease; nothing to renew",
                        field="owner",
                    ) from None
                raise
        return float(_text(expires))

    async def _canonical(self, number: int) -> str | None:
        """The canonical labels ``number`` stands for, read fresh from Redis; None if free."""
        with redis_errors("get"):
            canonical = await self.redis.hget(self.prefix + "ids", str(number))
        return None if canonical is None else _text(canonical)

    async def get(self, number: int) -> LabelSet:
        if number in reserved.BY_ID:
            return reserved.labels_of(number)
        canonical = await self._canonical(number)
        if canonical is None:
            raise NotFound(f"identity {number} does not exist", field="id")
        return LabelSet.from_canonical(canonical)

    async def list(self) -> dict[int, LabelSet]:
        with redis_errors("list"):
            raw = await self.redis.hgetall(self.prefix + "ids")
        found = {number: reserved.labels_of(number) for number in reserved.BY_ID if number}
        for key, value in raw.items():
            found[int(key)] = LabelSet.from_canonical(_text(value))
        return dict(sorted(found.items()))

    async def try_lock(self, name: str, seconds: float) -> bool:
        """A cluster-wide lock that lapses by itself after ``seconds`` (a crashed holder)."""
        with redis_errors("lock"):
            return bool(
                await self.redis.set(
                    f"{self.prefix}lock:{name}", self._own_prefix, nx=True, px=int(seconds * 1000)
                )
            )

    async def unlock(self, name: str) -> None:
        with redis_errors("unlock"):
            # only our own lock: a lapsed one may meanwhile belong to another replica
            await self._unlock(args=[f"{self.prefix}lock:{name}", self._own_prefix])

    async def exists(self, number: int, labels: LabelSet | None = None) -> bool:
        """Whether ``number`` is allocated (to ``labels``, if given), read fresh from Redis."""
        canonical = await self._canonical(number)
        if canonical is None:
            return False
        return labels is None or canonical == labels.canonical

    async def count(self) -> int:
        """Cluster-local identities in use or inside their grace period."""
        with redis_errors("count"):
            return int(await self.redis.hlen(self.prefix + "ids"))

    async def references(self, number: int) -> int:
        with redis_errors("references"):
            count = await self.redis.hget(self.prefix + "refs", str(number))
        return int(count or 0)

    async def collect_garbage(self, batch: int = 1000) -> GCResult:
        with redis_errors("gc"):
            out = await self._gc(args=[self.prefix, self.grace_seconds, batch])
        items = [_text(item) for item in out]
        split = items.index("")
        return GCResult(items[:split], [int(i) for i in items[split + 1 :]])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
