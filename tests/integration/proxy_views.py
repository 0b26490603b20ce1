"""What the loopback proxy tests share: a view, and a wait for handlers to be gone."""

from __future__ import annotations

import asyncio
import gc

import msgspec

from services.proxy.view import View
from shared import identities
from shared.messages import PolicyEntry, ResolvedPolicy


def allow_all_but_secret() -> View:
    """A view in which any peer may send any HTTP request except to ``/secret...``."""
    view = View()
    rule: dict[str, object] = {"http": {"path": "/(?!secret).*"}}
    entry = PolicyEntry(peer=0, protocol=6, port=0, rule_id=1, l7=[rule])
    policy = ResolvedPolicy(
        identity=identities.WORLD, revision=1, ingress_enforced=True, ingress=[entry],
        rules={1: "default/web[0]"},
    )  # fmt: skip
    view.set_resolved(str(identities.WORLD), msgspec.json.encode(policy))
    return view


async def still_alive(*types: type) -> list[object]:
    """The objects of ``types`` left once the loop has had up to a second to run the last
    connections' callbacks (with the collector off, a cycle would keep them)."""
    for _ in range(100):
        left = [o for o in gc.get_objects() if isinstance(o, types)]
        if not left:
            break
        await asyncio.sleep(0.01)
    return left
