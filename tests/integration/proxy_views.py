"""What the loopback proxy tests share: a view, and a wait for handlers to be gone."""

from __future__ import annotations

import asyncio
import gc

from services.proxy.view import View
from tests.unit.proxy_loop import world_view


def allow_all_but_secret() -> View:
    """A view in which any peer may send any HTTP request except to ``/secret...``."""
    return world_view([{"http": {"path": "/(?!secret).*"}}], "default/web[0]")


async def still_alive(*types: type) -> list[object]:
    """The objects of ``types`` left once the loop has had up to a second to run the last
    connections' callbacks (with the collector off, a cycle would keep them)."""
    for _ in range(100):
        left = [o for o in gc.get_objects() if isinstance(o, types)]
        if not left:
            break
        await asyncio.sleep(0.01)
    return left
