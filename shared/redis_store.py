"""Redis as every service uses it: bounded waits, and outages turned into ``Unavailable``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
import redis.exceptions
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import Unavailable


def make_redis(url: str) -> aioredis.Redis:
    """A client whose every command fails within about two seconds while Redis is away."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        # requests beyond this many wait for a connection instead of failing
        max_connections=32,
        timeout=2.0,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=2),
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


@contextlib.contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Turn a Redis outage into ``Unavailable``: the caller may retry, nothing is lost."""
    try:
        yield
    except redis.exceptions.BusyLoadingError:
        raise Unavailable(f"redis is loading its data during {operation}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(f"redis is unavailable during {operation}: {exc}") from None
