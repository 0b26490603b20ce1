"""The DNS fast path: addresses the node's DNS proxy just learned go into this node's maps before
the proxy releases the answer (Cilium's agent does the same before its DNS proxy answers).

The cluster-wide path stays the source of truth: the proxy writes the ``fqdn`` bucket, the
policy service gives each address the CIDR identity of its ``/32`` (``ipcache``, key
``_policy.<ip>/32``) and adds it to the toFQDNs peer sets whose selector matches (``selectors``);
the agent applies those as any change. That is four JetStream hops; this path is one request on
the agent's fqdn socket (``fqdn.learn``), answered once the maps are written:

- for each name, the toFQDNs peer sets of the endpoint's policy whose selector matches it;
- for each address, its CIDR identity: the one the bucket already gives its ``/32``, else
  ``LOCAL_BASE | cidr_slot(/32)``, the policy service's first choice (it probes past a number
  another network holds; so does nobody here: such an address is left ``pending``);
- the ``/32`` into the ipcache as a layer below the bucket (``IPCacheSync.learned``) and the
  identity into each set as a member below the bucket's (``PolicySync.learned``).

The two never fight: what the fast path adds is a union with the bucket's state, so a set update
that does not name the address yet removes nothing; once the bucket has an address's ipcache
entry, or a set the address as member, the fast path's copy is dropped (no map write: the value
is the same), and from then on the policy service alone removes it when the name expires. What
the bucket never confirms goes when the proxy's expiry (TTL and grace) passes. A different
number from the policy service (a collision it resolved differently) replaces the fast path's
at once.

Trust: the request comes from the node's socket (root only); the agent takes the endpoint's
identity from its own table, never from the request, and acts only for its own endpoints, so a
proxy of another node (or a confused one) can add nothing here for pods that are not this
node's. The additions are what the cluster-wide path would add for the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from prometheus_client import Counter

from services.datapath.ipcache_sync import IPCacheSync, is_prefix
from services.datapath.maps import IPCacheValue
from services.datapath.policy_sync import PolicySync
from shared import fqdn, identities
from shared.agent_api import FQDNLearn, FQDNLearnReply
from shared.errors import InvalidArgument, NotFound
from shared.fqdn import NameMatch
from shared.messages import Endpoint
from shared.peer_sets import referenced

MAX_NAMES = 64  # names per request (an answer's owner names and the query name)
MAX_ADDRESSES = 256  # addresses per name
MAX_LIFETIME_S = 7 * 86400.0  # TTL (2^31 s allowed by DNS) and grace, capped to a week

REQUESTS = Counter(
    "membrane_datapath_fqdn_learn_requests_total",
    "fqdn.learn requests from the node's DNS proxy, by result (ok, or the error code)",
    ["result"],
)
ADDRESSES = Counter(
    "membrane_datapath_fqdn_learn_addresses_total",
    "Addresses fqdn.learn handled: installed in the maps, or pending (left to the cluster path)",
    ["result"],
)


@dataclass
class _Learned:
    number: int  # the CIDR identity
    expires: float
    sets: set[int] = field(default_factory=set)  # sets holding it only by the fast path
    ipcache: bool = False  # the ipcache entry is the fast path's only


class FQDNFast:
    def __init__(self, policy: PolicySync, ipcache: IPCacheSync) -> None:
        self.policy = policy
        self.ipcache = ipcache
        self.sets: dict[int, NameMatch] = {}  # toFQDNs peer set id -> its selector
        self.learned: dict[IPv4Network, _Learned] = {}
        self.numbers: dict[int, IPv4Network] = {}  # the fast path's CIDR identities

    # --- the request ----------------------------------------------------------------------------

    def learn(
        self, request: FQDNLearn, endpoints: dict[str, Endpoint], now: float
    ) -> FQDNLearnReply:
        endpoint = _local(request.endpoint_ip, endpoints)
        names, over = _checked(request, now)
        for net in over:  # the proxy forgot them (fqdn cache clean): so does the fast path
            if net in self.learned:
                self._drop(net)
        policy = self.policy.resolved.get(endpoint.identity)
        used = [s for s in referenced(policy) if s in self.sets] if policy is not None else []
        reply = FQDNLearnReply()
        for name, addresses in names.items():
            wanted = [s for s in used if self.sets[s].matches(name)]
            if not wanted:
                continue
            for net, expires in addresses:
                address = str(net.network_address)
                if self._install(net, expires, wanted):
                    reply.installed.append(address)
                else:
                    reply.pending.append(address)
        if endpoint.host_ifindex in self.policy.failed | self.policy.waiting:
            reply.pending += reply.installed  # the endpoint denies for now: nothing is done
            reply.installed = []
        ADDRESSES.labels("installed").inc(len(reply.installed))
        ADDRESSES.labels("pending").inc(len(reply.pending))
        return reply

    def _install(self, net: IPv4Network, expires: float, wanted: list[int]) -> bool:
        if any(s not in self.policy.members for s in wanted):
            return False  # a set the agent has not received: the endpoint waits for it anyway
        entry = self.learned.get(net)
        number = self._number(net)
        if number is None:
            return False
        if entry is not None and entry.number != number:
            self._drop(net)
            entry = None
        if entry is None:
            entry = self.learned[net] = _Learned(number, expires)
            self.numbers[number] = net
        entry.expires = max(entry.expires, expires)
        if not _from_bucket(self.ipcache, net):
            entry.ipcache = True
            self.ipcache.set_learned(net, IPCacheValue(number))
        for set_id in wanted:
            if number not in self.policy.members[set_id]:
                entry.sets.add(set_id)
                self.policy.add_learned(set_id, number)
        if not entry.sets and not entry.ipcache:
            self._forget(net)  # the bucket had it all already
        return True

    def _number(self, net: IPv4Network) -> int | None:
        """The address's CIDR identity: the bucket's, else the policy service's first choice
        when nobody else holds it."""
        for value in self.ipcache.from_kv.get(net, {}).values():
            if is_prefix(value):
                return value.identity
        number = identities.LOCAL_BASE | identities.cidr_slot(net)
        others = self.ipcache.prefix_nets.get(number, set()) - {net}
        holder = self.numbers.get(number)
        if others or (holder is not None and holder != net):
            return None
        return number

    # --- the bucket catches up ------------------------------------------------------------------

    def on_peer_set(self, set_id: int, selector: NameMatch | None, members: frozenset[int]) -> None:
        """A set's new value (after PolicySync has it): members it now has are the bucket's."""
        if selector is None:
            self.sets.pop(set_id, None)
        else:
            self.sets[set_id] = selector
        for net, entry in list(self.learned.items()):
            if set_id in entry.sets and (entry.number in members or selector is None):
                entry.sets.discard(set_id)
                self.policy.remove_learned(set_id, entry.number)
                self._forget_if_done(net, entry)

    def on_ipcache(self, net: IPv4Network) -> None:
        """The bucket's entries for ``net`` changed (after IPCacheSync has them)."""
        entry = self.learned.get(net)
        if entry is None or not _from_bucket(self.ipcache, net):
            return
        if self.ipcache.prefix(net) != entry.number:
            self._drop(net)  # the policy service chose another number: its own wins
            return
        if entry.ipcache:
            entry.ipcache = False
            self.ipcache.remove_learned(net)
        self._forget_if_done(net, entry)

    def expire(self, now: float) -> int:
        """Drop what the bucket never confirmed once its TTL and grace are over."""
        old = [net for net, entry in self.learned.items() if entry.expires <= now]
        for net in old:
            self._drop(net)
        return len(old)

    def _drop(self, net: IPv4Network) -> None:
        entry = self.learned[net]
        for set_id in sorted(entry.sets):
            self.policy.remove_learned(set_id, entry.number)
        if entry.ipcache:
            self.ipcache.remove_learned(net)
        self._forget(net)

    def _forget_if_done(self, net: IPv4Network, entry: _Learned) -> None:
        if not entry.sets and not entry.ipcache:
            self._forget(net)

    def _forget(self, net: IPv4Network) -> None:
        entry = self.learned.pop(net)
        if self.numbers.get(entry.number) == net:
            del self.numbers[entry.number]


def _from_bucket(ipcache: IPCacheSync, net: IPv4Network) -> bool:
    return any(is_prefix(v) for v in ipcache.from_kv.get(net, {}).values())


def _local(address: str, endpoints: dict[str, Endpoint]) -> Endpoint:
    try:
        IPv4Address(address)
    except ValueError as exc:
        raise InvalidArgument(f"not an IPv4 address: {address!r}", field="endpoint_ip") from exc
    for endpoint in endpoints.values():
        if endpoint.ip == address:
            return endpoint
    raise NotFound(f"no endpoint of this node has the address {address}", field="endpoint_ip")


def _checked(
    request: FQDNLearn, now: float
) -> tuple[dict[str, list[tuple[IPv4Network, float]]], list[IPv4Network]]:
    """name -> [(the address's /32, until when)], and the /32s whose time is over (expires and
    grace in the past: the proxy forgot them); anything malformed fails the whole request."""
    if len(request.names) > MAX_NAMES:
        raise InvalidArgument(f"more than {MAX_NAMES} names", field="names")
    out: dict[str, list[tuple[IPv4Network, float]]] = {}
    over: list[IPv4Network] = []
    for i, entry in enumerate(request.names):
        name = fqdn.check_name(entry.name, f"names[{i}].name")
        if len(entry.addresses) > MAX_ADDRESSES:
            raise InvalidArgument(f"more than {MAX_ADDRESSES} addresses", field=f"names[{i}]")
        found = out.setdefault(name, [])
        for j, address in enumerate(entry.addresses):
            where = f"names[{i}].addresses[{j}]"
            try:
                ip = IPv4Address(address.ip)
            except ValueError as exc:
                raise InvalidArgument(f"not an IPv4 address: {address.ip!r}", field=where) from exc
            if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
                raise InvalidArgument(f"{ip} is no host's address", field=where)
            until = address.expires + address.grace
            if not (math.isfinite(until) and address.grace >= 0 and until <= now + MAX_LIFETIME_S):
                raise InvalidArgument("expires/grace out of range", field=where)
            if until > now:
                found.append((IPv4Network(ip), until))
            else:
                over.append(IPv4Network(ip))
    return out, over
