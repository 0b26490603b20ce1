"""ScriptPipeline against a real redis-server: batching, per-call errors, a lost script cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from membrane.servers import ServerProcess
from shared.errors import Unavailable
from shared.redis_store import ScriptPipeline, make_redis, redis_errors

INCR_OR_FAIL = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return redis.call('INCRBY', 'counter', tonumber(ARGV[1]))
"""


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    redis = make_redis(redis_server.url)
    yield redis
    await redis.aclose()


async def test_concurrent_calls_share_round_trips_and_keep_their_own_results(
    client: aioredis.Redis,
) -> None:
    pipeline = ScriptPipeline(client, max_batch=64)
    script = client.register_script(INCR_OR_FAIL)
    calls = [pipeline.run(script, ["fail" if i % 10 == 0 else 1]) for i in range(500)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) == 50
    assert all(isinstance(f, redis.exceptions.ResponseError) for f in failures)
    assert sorted(r for r in results if not isinstance(r, Exception)) == list(range(1, 451))
    await pipeline.close()


async def test_a_flushed_script_cache_is_reloaded(client: aioredis.Redis) -> None:
    pipeline = ScriptPipeline(client)
    script = client.register_script(INCR_OR_FAIL)
    assert await pipeline.run(script, [5]) == 5
    await client.script_flush()  # what a Redis restart does to the cache
    assert await asyncio.gather(pipeline.run(script, [1]), pipeline.run(script, [1])) in (
        [6, 7],
        [7, 6],
    )
    await pipeline.close()


async def test_an_outage_fails_every_waiting_call_and_then_recovers(
    client: aioredis.Redis, redis_server: ServerProcess
) -> None:
    pipeline = ScriptPipeline(client)
    script = client.register_script(INCR_OR_FAIL)
    await pipeline.run(script, [1])
    redis_server.stop()
    for outcome in await asyncio.gather(
        *(pipeline.run(script, [1]) for _ in range(5)), return_exceptions=True
    ):
        with pytest.raises(Unavailable), redis_errors("test"):
            raise outcome  # type: ignore[misc]
    redis_server.start()
    assert await pipeline.run(script, [1]) == 2  # AOF kept the counter
    await pipeline.close()
