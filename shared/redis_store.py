"""Redis as every service uses it: bounded waits, and outages turned into ``Unavailable``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.retry import Retry

from shared.errors import Unavailable


def make_redis(url: str, socket_timeout: float = 1.0) -> aioredis.Redis:
    """A client whose every command fails within about two seconds while Redis is away (a
    command that legitimately runs long, such as a bulk's script, needs a longer
    ``socket_timeout``: Redis answers nothing until it is done)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        # requests beyond this many wait for a connection instead of failing
        max_connections=32,
        timeout=2.0,
        socket_timeout=socket_timeout,
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


Pending = tuple[AsyncScript, Sequence[Any], "asyncio.Future[Any]"]


class ScriptPipeline:
    """Runs Lua scripts for many concurrent callers in shared round trips.

    Calls that arrive while a round trip is in flight go out together in the next one, as one
    pipeline: under load that saves a connection checkout, a write and a read per call, and
    at low load it adds nothing (a lone call leaves at once). Each call still gets its own
    result or its own error.
    """

    def __init__(self, client: aioredis.Redis, max_batch: int = 256) -> None:
        self._client = client
        self._max_batch = max_batch
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def run(self, script: AsyncScript, args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, args, future))
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="redis-script-pipeline")
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._execute(batch)

    async def _execute(self, batch: list[Pending]) -> None:
        try:
            results = await self._send(batch)
        except Exception as exc:  # the round trip failed: every caller in it gets the error
            results = [exc] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, batch: list[Pending]) -> list[Any]:
        results = await self._evalsha([(script, args) for script, args, _ in batch])
        # NOSCRIPT: Redis restarted and lost its script cache; nothing ran, so load and resend
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for script in {batch[i][0] for i in missing}:
                script.sha = await self._client.script_load(script.script)
            retried = await self._evalsha([(batch[i][0], batch[i][1]) for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _evalsha(self, calls: list[tuple[AsyncScript, Sequence[Any]]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for script, args in calls:
                pipe.evalsha(script.sha, 0, *args)
            return list(await pipe.execute(raise_on_error=False))
