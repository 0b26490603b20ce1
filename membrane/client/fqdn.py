"""The DNS caches of the nodes' proxies: read from the ``fqdn`` bucket, cleaned by asking each
node's proxy (which owns its caches and writes them again)."""

from __future__ import annotations

import msgspec

from membrane.client import workloads
from shared import subjects
from shared.bus import Bus
from shared.errors import NotFound
from shared.fqdn import check_pattern
from shared.messages import FQDNCache, FQDNCleanReply, FQDNCleanRequest


async def caches(bus: Bus, node: str = "") -> list[FQDNCache]:
    """Every endpoint's cache (of ``node`` only, when given), with the pod's name filled in."""
    kv = await bus.kv(subjects.KV_FQDN)
    found = [msgspec.json.decode(raw, type=FQDNCache) for raw in (await Bus.snapshot(kv)).values()]
    if node:
        found = [cache for cache in found if cache.node == node]
    pods = {e.ip: f"{e.namespace}/{e.name}" for e in await workloads.endpoints(bus)}
    for cache in found:
        cache.endpoint = cache.endpoint or pods.get(cache.ip, "")
    return sorted(found, key=lambda c: (c.node, c.endpoint, c.ip))


async def clean(bus: Bus, pattern: str = "", node: str = "") -> list[FQDNCleanReply]:
    """Every node's proxy (or ``node``'s) forgets the names matching ``pattern`` (all: "")."""
    if pattern:
        check_pattern(pattern, "pattern")
    known = await workloads.nodes(bus)
    if node and node not in known:
        raise NotFound(f"no node {node!r}", field="node")
    request = FQDNCleanRequest(pattern=pattern)
    return [
        await bus.request(subjects.fqdn_clean(name), request, FQDNCleanReply)
        for name in sorted(known)
        if not node or name == node
    ]
