"""What the bus says about the local cluster's nodes, kept equal to the nodes that exist.

A node of the local cluster is a namespace ``membrane down`` removes with its pods; records
of it left on the bus would show a dead node as alive, list pods that are gone and make the
CLI schedule onto them. ``down`` therefore deregisters the nodes it stops, and ``up``
forgets the nodes of an earlier run that this run does not start (``up --nodes 1`` after 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import msgspec

from shared import subjects
from shared.bus import Bus
from shared.messages import Endpoint, IPCacheEntry


def local_node_pattern(cluster_names: Iterable[str]) -> re.Pattern[str]:
    """Node names the local cluster(s) called ``cluster_names`` give their nodes."""
    names = "|".join(re.escape(name) for name in sorted(set(cluster_names)))
    return re.compile(rf"^(?:{names})-node-\d+$")


async def forget_nodes(bus: Bus, gone: Callable[[str], bool]) -> list[str]:
    """Delete every record of the nodes ``gone`` names: their ``nodes``, ``liveness`` and
    ``health`` entries, their pods' ``endpoints`` and ``ipcache`` entries; the nodes
    forgotten."""
    forgotten: set[str] = set()
    for bucket, name_of in (
        (subjects.KV_NODES, str),
        (subjects.KV_LIVENESS, subjects.node_of_token),
        (subjects.KV_HEALTH, str),
    ):
        kv = await bus.kv(bucket)
        for key in await Bus.snapshot(kv):
            if gone(name := name_of(key)):
                await kv.delete(key)
                forgotten.add(name)
    for bucket, kind in (
        (subjects.KV_ENDPOINTS, Endpoint),
        (subjects.KV_IPCACHE, IPCacheEntry),
    ):
        kv = await bus.kv(bucket)
        for key, raw in (await Bus.snapshot(kv)).items():
            try:
                node = msgspec.json.decode(raw, type=kind).node  # type: ignore[attr-defined]
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not ours to judge; its writer's reader counts it
            if node and gone(node):
                await kv.delete(key)
                forgotten.add(node)
    return sorted(forgotten)
