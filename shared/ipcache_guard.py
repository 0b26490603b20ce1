"""Which ``ipcache`` entries a reader believes: a node speaks only for its own pod CIDR.

nats-server lets each agent write only its own node's keys (``<node>.<address>``), but what
such a key says is the agent's word. A compromised agent could name, under its own key, another
node's pod address with its own node in the value; readers pick one owner per address (the
smallest key), so it would shadow the peer's pod. Every reader of the bucket (the agents'
ipcache maps, the monitor, the L7 proxies) therefore puts this guard in front of its handler.

The authority is the ``pod-cidrs`` bucket: the pod CIDR cluster-pool IPAM gave each node,
written by the identity service alone (shared/roles.py; no agent may write it, nor release a
CIDR). An entry under a node's key is believed only when

- it names that node (``wrong_node`` otherwise),
- it is one address, a ``/32`` (``not_an_address``): agents write pods and their health
  endpoint, nothing wider,
- its identity is a pod's (cluster range) or ``health`` (``identity``): host, world,
  remote-node and the other reserved identities, and CIDR identities, are never a node's to
  give an address -- each agent derives its own host and peer-node entries locally,
- its address is inside the pod CIDR the identity service gave that node
  (``outside_pod_cidr``),
- its tunnel endpoint (``host_ip``), when it has one, is the underlay address the identity
  service recorded with that CIDR (``wrong_host``; not judged while none is recorded).

An entry of a node whose pod CIDR is not known yet waits (``pending``), not installed, and is
judged when the CIDR arrives; a reader must follow ``pod-cidrs`` to its snapshot before it
prunes or serves. The policy service's keys (``_policy.<cidr>``) carry CIDR identities only
(``policy_identity``). Every refusal is counted in ``membrane_ipcache_entries_refused_total``
and logged with the node and the address; the handler sees the entry removed (or never).

Pure logic on raw KV values: the handler gets the very bytes the bucket held, so the readers'
own decoding is unchanged.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

import msgspec
from prometheus_client import Counter

from shared import identities, log, subjects
from shared.kv_watch import BucketWatches
from shared.messages import IPCacheEntry, PodCIDR

REFUSED = Counter(
    "membrane_ipcache_entries_refused_total",
    "ipcache entries a reader ignores: a node's entry for an address outside the pod CIDR the "
    "identity service gave it, or naming another node, wider than one address, or with an "
    "identity no node may give",
    ["reader", "reason"],
)
BAD_POD_CIDRS = Counter(
    "membrane_pod_cidrs_bad_entries_total", "pod-cidrs entries that do not decode", ["reader"]
)

PENDING = "pending"  # the writer's pod CIDR is not known yet: judged when it arrives
BELIEVED = ""

_entry_decoder = msgspec.json.Decoder(IPCacheEntry)
_cidr_decoder = msgspec.json.Decoder(PodCIDR)

Handler = Callable[[str, bytes | None], None]


def pod_identity(number: int) -> bool:
    """An identity a node may give one of its addresses: a pod's, or its health endpoint's."""
    return number == identities.HEALTH or identities.CLUSTER_MIN <= number < identities.LOCAL_BASE


class PodRange(NamedTuple):
    """A node's pod CIDR as the integers an address is compared with (every ipcache event is
    judged: ``ipaddress`` objects cost several times the KV watch's own 9 us per entry)."""

    network: IPv4Network
    first: int
    last: int

    @classmethod
    def of(cls, network: IPv4Network) -> PodRange:
        return cls(network, int(network.network_address), int(network.broadcast_address))


def _address(cidr: str) -> int | None:
    """The address of a ``/32`` in dotted-quad form (strict: ``inet_pton``), else None."""
    address, slash, length = cidr.partition("/")
    if not slash or length != "32":
        return None
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        return None


def judge(key: str, entry: IPCacheEntry, pod_cidr: PodRange | None, underlay: str = "") -> str:
    """``BELIEVED``, ``PENDING`` or the reason to refuse ``entry`` under ``key``, given the pod
    CIDR the identity service gave the key's node (None: not known) and the underlay address
    it recorded for it ("": none recorded; the entry's tunnel endpoint is then not judged)."""
    owner = subjects.ipcache_key_owner(key)
    if owner == subjects.POLICY_IPCACHE_OWNER:
        return BELIEVED if entry.identity >= identities.LOCAL_BASE else "policy_identity"
    if owner != subjects.node_token(entry.node):
        return "wrong_node"
    address = _address(entry.cidr)
    if address is None:
        return "not_an_address"
    if not pod_identity(entry.identity):
        return "identity"
    if pod_cidr is None:
        return PENDING
    if not pod_cidr.first <= address <= pod_cidr.last:
        return "outside_pod_cidr"
    # the tunnel endpoint of the node's pods: its own recorded address, not another host's
    return "wrong_host" if underlay and entry.host_ip and entry.host_ip != underlay else BELIEVED


class IPCacheGuard:
    """Feed it both buckets' events; it calls ``handle`` with what may be believed."""

    def __init__(self, reader: str, handle: Handler) -> None:
        self.reader = reader  # the metric's label: datapath, monitor, proxy
        self.handle = handle
        self.pod_cidrs: dict[str, PodRange] = {}  # node token -> its pod CIDR
        # node token -> the underlay address recorded with it (routes and tunnels follow it)
        self.underlays: dict[str, str] = {}
        # every node key's latest value and what it was judged, believed or not, so that a
        # pod CIDR arriving (or changing) judges its node's entries again
        self.entries: dict[str, tuple[bytes, IPCacheEntry]] = {}
        self.verdicts: dict[str, str] = {}
        self.by_owner: dict[str, set[str]] = {}
        self.log = log.get("ipcache.guard", reader=reader)

    def on_ipcache(self, key: str, value: bytes | None) -> None:
        owner = subjects.ipcache_key_owner(key)
        if key in self.entries:
            del self.entries[key]
            self.by_owner[owner].discard(key)
        if value is None:
            if self.verdicts.pop(key, None) == BELIEVED:
                self.handle(key, None)
            return
        try:
            entry = _entry_decoder.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            # the reader's own decoding counts it and treats the address as unknown
            self.verdicts[key] = BELIEVED
            self.handle(key, value)
            return
        self.entries[key] = (value, entry)
        self.by_owner.setdefault(owner, set()).add(key)
        self._judge(key, value, entry, self.verdicts.pop(key, None), new=True)

    def on_pod_cidr(self, key: str, value: bytes | None) -> None:
        cidr: PodRange | None = None
        underlay = ""
        if value is not None:
            try:
                allocation = _cidr_decoder.decode(value)
                cidr = PodRange.of(IPv4Network(allocation.cidr))
                if allocation.underlay_ip:
                    underlay = str(IPv4Address(allocation.underlay_ip))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                BAD_POD_CIDRS.labels(self.reader).inc()
                self.log.error("unreadable pod CIDR; the node's entries wait", key=key)
                cidr, underlay = None, ""
        if cidr == self.pod_cidrs.get(key) and underlay == self.underlays.get(key, ""):
            return
        if underlay:
            self.underlays[key] = underlay
        else:
            self.underlays.pop(key, None)
        if cidr is None:
            self.pod_cidrs.pop(key, None)
        else:
            self.pod_cidrs[key] = cidr
        for entry_key in sorted(self.by_owner.get(key, ())):
            value, entry = self.entries[entry_key]
            self._judge(entry_key, value, entry, self.verdicts.get(entry_key), new=False)

    def _judge(
        self, key: str, value: bytes, entry: IPCacheEntry, before: str | None, *, new: bool
    ) -> None:
        owner = subjects.ipcache_key_owner(key)
        pod_cidr = self.pod_cidrs.get(owner)
        verdict = judge(key, entry, pod_cidr, self.underlays.get(owner, ""))
        self.verdicts[key] = verdict
        if verdict == BELIEVED:
            if new or before != BELIEVED:
                self.handle(key, value)
            return
        if before == BELIEVED:
            self.handle(key, None)
        if verdict != PENDING and (new or before != verdict):
            REFUSED.labels(self.reader, verdict).inc()
            self.log.warning(
                "ipcache entry ignored",
                node=entry.node,
                address=entry.cidr,
                identity=entry.identity,
                key=key,
                reason=verdict,
                pod_cidr=str(pod_cidr.network) if pod_cidr else "",
            )


async def watch(watches: BucketWatches, reader: str, handle: Handler) -> IPCacheGuard:
    """Follow ``ipcache`` through a guard (and ``pod-cidrs`` for it): a service's wiring;
    ``watches.synced()`` then waits for both snapshots."""
    guard = IPCacheGuard(reader, handle)
    await watches.add(subjects.KV_POD_CIDRS, guard.on_pod_cidr)
    await watches.add(subjects.KV_IPCACHE, guard.on_ipcache)
    return guard
