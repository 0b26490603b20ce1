"""The node's DNS caches on the bus, and the wait that keeps the first connection from dropping.

:meth:`FQDNPublisher.learn` records an answer's addresses (:class:`FQDNCaches`), writes the
endpoint's cache to the ``fqdn`` bucket when its addresses changed, and returns only once the
proxy's view -- fed by the same ``ipcache`` and ``selectors`` buckets the node's agent turns
into BPF map entries -- shows each address in every toFQDNs peer set of the pod's policy whose
selector matches the name: the policy service has given the address its CIDR identity and
added it to the set. Waiting is bounded (``wait_s``); a timeout is counted and the answer is
released anyway (the connection may then be dropped, never let through unchecked).

Expired addresses (TTL and grace over) are dropped every second and the caches written again.
A restarted proxy takes its node's caches back from the bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from services.proxy.dns_policy import Learned, missing
from services.proxy.fqdn_cache import FQDNCaches
from services.proxy.view import View
from shared import subjects
from shared.bus import Bus
from shared.fqdn import NameMatch
from shared.fqdn import parse as parse_match
from shared.messages import FQDNCache, FQDNCleanReply, FQDNCleanRequest, PeerSet

EVICTED = Counter(
    "membrane_proxy_fqdn_evicted_total",
    "Learned addresses dropped because an endpoint's name held the maximum (oldest first)",
)
POLICY_WAIT = Histogram(
    "membrane_proxy_fqdn_policy_wait_seconds",
    "From a DNS answer with new addresses to their policy entries on the node",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0),
)
WAIT_TIMEOUTS = Counter(
    "membrane_proxy_fqdn_policy_wait_timeouts_total",
    "DNS answers released before their addresses reached the policy (the wait timed out)",
)

_cache_decoder = msgspec.json.Decoder(FQDNCache)
_peer_set_decoder = msgspec.json.Decoder(PeerSet)


class FQDNPublisher:
    def __init__(self, kv: KeyValue, view: View, caches: FQDNCaches, wait_s: float) -> None:
        self.kv = kv
        self.view = view
        self.caches = caches
        self.wait_s = wait_s
        self.fqdn_sets: dict[int, NameMatch] = {}  # toFQDNs peer set id -> its selector
        self._changed = asyncio.Event()

    # --- what the view sees ---------------------------------------------------------------------

    def on_peer_set(self, key: str, data: bytes | None) -> None:
        number = int(key)
        peer_set = _peer_set_decoder.decode(data) if data is not None else None
        if peer_set is None or peer_set.fqdn is None:
            self.fqdn_sets.pop(number, None)
        else:
            self.fqdn_sets[number] = parse_match(peer_set.fqdn, "fqdn")

    def changed(self) -> None:
        """The view moved: waiting answers look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- answers --------------------------------------------------------------------------------

    async def learn(self, endpoint_ip: str, identity: int, names: Learned) -> None:
        started = time.perf_counter()
        changed, evicted = self.caches.learn(endpoint_ip, identity, names, time.time())
        if evicted:
            EVICTED.inc(evicted)
        if changed:
            await self.publish((endpoint_ip,))
        deadline = started + self.wait_s
        while missing(self.view, self.fqdn_sets, identity, names):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                WAIT_TIMEOUTS.inc()
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue
        POLICY_WAIT.observe(time.perf_counter() - started)

    async def publish(self, endpoint_ips: Iterable[str]) -> None:
        for endpoint_ip in endpoint_ips:
            key = subjects.fqdn_key(self.caches.node, endpoint_ip)
            message = self.caches.message(endpoint_ip)
            if message is None:
                await self.kv.delete(key)
            else:
                await self.kv.put(key, msgspec.json.encode(message))

    async def expire(self) -> None:
        await self.publish(self.caches.expire(time.time()))

    async def restore(self) -> int:
        prefix = subjects.fqdn_key(self.caches.node, "")
        for key, raw in (await Bus.snapshot(self.kv)).items():
            if key.startswith(prefix):
                self.caches.restore(_cache_decoder.decode(raw))
        return len(self.caches)

    async def clean(self, request: FQDNCleanRequest) -> FQDNCleanReply:
        match = (
            parse_match({"matchPattern": request.pattern}, "pattern") if request.pattern else None
        )
        changed, removed = self.caches.clean(match, request.endpoint_ip)
        await self.publish(changed)
        return FQDNCleanReply(node=self.caches.node, removed=removed)
