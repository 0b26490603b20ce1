"""KV bucket watches that feed the enrichment caches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats.js.errors

from shared import kv_watch
from shared.bus import Bus

# how often the monitor looks for a bucket another service has not created yet
OPTIONAL_BUCKET_POLL_S = 5.0


async def follow_optional(
    bus: Bus,
    bucket: str,
    handle: Callable[[str, bytes | None], None],
    synced: asyncio.Event,
    known: set[str],
) -> None:
    """Follow a bucket another service creates (``services``, by lb): until it exists there
    is nothing to enrich with, so wait for it instead of creating it."""
    while True:
        try:
            kv = await bus.js.key_value(bucket)
            break
        except nats.js.errors.BucketNotFoundError:
            synced.set()  # nothing to wait for
            await asyncio.sleep(OPTIONAL_BUCKET_POLL_S)
    # the same event: when the bucket is there at once, its snapshot is what start-up waits for
    await kv_watch.follow(kv, lambda event: handle(event.key, event.value), synced.set, known)
