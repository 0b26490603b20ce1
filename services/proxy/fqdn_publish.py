"""The node's DNS caches on the bus, and the wait that keeps the first connection from dropping.

:meth:`FQDNPublisher.learn` records an answer's addresses (:class:`FQDNCaches`) and returns
only once they are allowed on the node: the node's agent, asked on its fqdn socket
(``fqdn.learn``, services/datapath/fqdn_fast.py), has written them into its BPF maps -- their
CIDR identities into the ipcache, and into the toFQDNs peer sets of the pod's policy whose
selector matches the name -- and said so (over one connection kept open). The endpoint's
cache goes to the ``fqdn`` bucket once the answer is released, not awaited: the cluster-wide
path (policy service -> ``ipcache``/``selectors`` -> every agent) follows as before and stays
the source of truth.

When the agent does not answer in time, cannot do it (``pending``: a set it has not received,
a CIDR identity number someone else holds) or the fast path is off, the answer waits instead
for the proxy's view -- the ``ipcache`` and ``selectors`` buckets the agent turns into map
entries -- to show each address in every matching set. Both waits together are bounded
(``wait_s``); past it the pod gets SERVFAIL, never an answer whose address may not be allowed
yet: its resolver asks again, and by then the address is in (or the failure is visible), where
a released answer would have its first connection dropped and retried by TCP a second later.

Expired addresses (TTL and grace over) are dropped every second and the caches written again.
A restarted proxy takes its node's caches back from the bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from services.proxy.dns_policy import Learned, missing
from services.proxy.fqdn_cache import FQDNCaches
from services.proxy.view import View
from shared import agent_api, log, subjects
from shared.agent_api import FQDNLearn, FQDNLearnReply
from shared.bus import Bus
from shared.errors import MembraneError
from shared.fqdn import NameMatch
from shared.fqdn import parse as parse_match
from shared.messages import (
    FQDNAddress,
    FQDNCache,
    FQDNCleanReply,
    FQDNCleanRequest,
    FQDNName,
    PeerSet,
)

EVICTED = Counter(
    "membrane_proxy_fqdn_evicted_total",
    "Learned addresses dropped because an endpoint's name held the maximum (oldest first)",
)
POLICY_WAIT = Histogram(
    "membrane_proxy_fqdn_policy_wait_seconds",
    "From a DNS answer with new addresses to their policy entries on the node (answers the "
    "proxy held back; not those whose addresses the node had already)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0),
)
WAIT_TIMEOUTS = Counter(
    "membrane_proxy_fqdn_policy_wait_timeouts_total",
    "DNS answers replaced by SERVFAIL: their addresses did not reach the policy in time",
)
AGENT_ERRORS = Counter(
    "membrane_proxy_fqdn_agent_errors_total",
    "fqdn.learn requests the node's agent did not answer in time or refused (the answer then "
    "waits for the cluster-wide path)",
)
AGENT_TIMEOUT_S = 0.5  # for a forget (fqdn cache clean), which nothing waits on
AGENT_SHARE = 0.75  # of the answer's wait: the agent is the one who writes the maps

_cache_decoder = msgspec.json.Decoder(FQDNCache)
_peer_set_decoder = msgspec.json.Decoder(PeerSet)


class FQDNPublisher:
    def __init__(
        self,
        kv: KeyValue,
        view: View,
        caches: FQDNCaches,
        wait_s: float,
        agent_socket: Path | None = None,
    ) -> None:
        self.kv = kv
        self.view = view
        self.caches = caches
        self.wait_s = wait_s
        # the agent's fqdn socket, one connection kept open; None: the fast path is off
        self.agent = agent_api.Channel(agent_socket) if agent_socket is not None else None
        self.fqdn_sets: dict[int, NameMatch] = {}  # toFQDNs peer set id -> its selector
        self._changed = asyncio.Event()
        # (endpoint, name, address) -> until when the agent said it needs nothing more (by name:
        # an address one name brought may be one another name's selector must still get)
        self._settled: dict[tuple[str, str, str], float] = {}
        self._dirty: set[str] = set()  # endpoints whose cache the bucket has not had yet
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()  # one writer: a cache's puts land in order
        self._agent_ok = True
        self.log = log.get("proxy.fqdn", node=caches.node)

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

    async def learn(self, endpoint_ip: str, identity: int, names: Learned) -> bool:
        """Whether the answer may go to the pod: its addresses are allowed on the node."""
        started = time.perf_counter()
        now = time.time()
        changed, evicted = self.caches.learn(endpoint_ip, identity, names, now)
        if evicted:
            EVICTED.inc(evicted)
        if changed:  # the cluster-wide path: the bucket write, once the answer is out
            self._dirty.add(endpoint_ip)
        deadline = started + self.wait_s
        settled, held = await self._ask_agent(endpoint_ip, names, now)
        if not settled or self._dirty:
            # the bucket writer runs when this task next yields: after the answer went to the
            # pod when the agent settled it (its work is the cluster-wide path's, which nothing
            # here waits for), at once when the answer waits for that path
            self._wake.set()
        while not settled and missing(self.view, self.fqdn_sets, identity, names):
            held = True
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                WAIT_TIMEOUTS.inc()
                return False
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue
        if held:  # an answer held back for its addresses (not one the node had already)
            POLICY_WAIT.observe(time.perf_counter() - started)
        return True

    async def _ask_agent(self, endpoint_ip: str, names: Learned, now: float) -> tuple[bool, bool]:
        """The node's agent installs what it has not said it has (fqdn.learn); (whether it says
        every address is allowed or needs nothing, whether it answered a request)."""
        if self.agent is None:
            return False, False
        ask: list[FQDNName] = []
        for name, (addresses, ttl) in names.items():
            expires = now + max(ttl, self.caches.min_ttl)
            fresh = [a for a in addresses if self._settled.get((endpoint_ip, name, a), 0.0) > now]
            if len(fresh) < len(addresses):
                ask.append(
                    FQDNName(
                        name,
                        [
                            FQDNAddress(a, expires, self.caches.grace)
                            for a in addresses
                            if a not in fresh
                        ],
                    )
                )
        if not ask:
            return True, False
        request = FQDNLearn(endpoint_ip=endpoint_ip, names=ask)
        timeout = AGENT_SHARE * self.wait_s
        try:
            reply = await self.agent.call("fqdn.learn", request, FQDNLearnReply, timeout)
        except (MembraneError, msgspec.DecodeError, OSError) as exc:
            AGENT_ERRORS.inc()
            if self._agent_ok:  # once per outage, not per answer (the metric counts them)
                self.log.warning("fqdn.learn failed; waiting for the cluster path", error=str(exc))
            self._agent_ok = False
            return False, False  # held only if the addresses are still missing (below)
        self._agent_ok = True
        pending = set(reply.pending)
        for entry in ask:
            for address in entry.addresses:
                if address.ip not in pending:
                    until = address.expires + address.grace
                    self._settled[endpoint_ip, entry.name, address.ip] = until
        return not pending, True

    async def _forget(
        self, endpoint_ip: str, before: FQDNCache | None, after: FQDNCache | None
    ) -> None:
        """Tell the agent the names cleaned: what its fast path still holds of them goes (the
        policy service takes the rest away, from the bucket)."""
        if self.agent is None or before is None:
            return
        kept = {n.name for n in after.names} if after is not None else set()
        gone = [
            FQDNName(n.name, [FQDNAddress(a.ip, 0.0) for a in n.addresses])
            for n in before.names
            if n.name not in kept
        ]
        request = FQDNLearn(endpoint_ip=endpoint_ip, names=gone)
        try:
            await self.agent.call("fqdn.learn", request, FQDNLearnReply, AGENT_TIMEOUT_S)
        except (MembraneError, msgspec.DecodeError, OSError) as exc:
            AGENT_ERRORS.inc()  # what the agent holds goes at its expiry
            self.log.warning("fqdn.learn (forget) failed", error=str(exc))

    async def write_caches(self) -> None:
        """The bucket writer: endpoints whose cache changed, as they change (one put each,
        however many answers came meanwhile)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            try:
                await self.publish(dirty)
            except Exception:
                self._dirty |= dirty  # the next change (or the expiry tick) tries again
                raise

    async def publish(self, endpoint_ips: Iterable[str]) -> None:
        async with self._writing:
            for endpoint_ip in endpoint_ips:
                key = subjects.fqdn_key(self.caches.node, endpoint_ip)
                message = self.caches.message(endpoint_ip)
                if message is None:
                    await self.kv.delete(key)
                else:
                    await self.kv.put(key, msgspec.json.encode(message))

    async def expire(self) -> None:
        now = time.time()
        self._settled = {k: until for k, until in self._settled.items() if until > now}
        if self._dirty:
            self._wake.set()
        await self.publish(self.caches.expire(now))

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
        before = {ip: self.caches.message(ip) for ip in self.caches.endpoint_ips()}
        changed, removed = self.caches.clean(match, request.endpoint_ip)
        self._settled.clear()
        await self.publish(changed)
        for endpoint_ip in changed:
            await self._forget(endpoint_ip, before[endpoint_ip], self.caches.message(endpoint_ip))
        return FQDNCleanReply(node=self.caches.node, removed=removed)
