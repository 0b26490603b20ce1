"""The datapath's policy LPM trie: its key and value encoding (both ways), the compiler from
resolved policy to entries, and a model of its lookup.

A contract, hence in ``shared``: the datapath agent writes these entries, and the policy
service's ``explain`` answers with the same compilation and lookup.

One trie holds every endpoint's policy. Its key is ``endpoint | direction | pad | identity``
(96 bits, always fully matched: one "slot" per endpoint, direction and peer identity) followed
by ``protocol | pad2 | port`` (32 bits) of which only a prefix is matched: 96 = any protocol,
112 = one protocol and any port, 112 + n = one protocol and the ports sharing the top n bits.

The datapath (``policy_check`` in bpf/datapath.c) looks up the peer's slot and the any-identity
slot (identity 0): a deny from either wins (DESIGN §4), then an allow, and the peer's result
names the rule before the any-identity one. Two things keep that simple rule exact:

- Longest-prefix matching would let an allow hide a shorter deny of its own slot, so every allow
  that a deny of the same slot covers is left out; each slot then answers, for every port, "deny
  if a deny covers it, else allow if an allow does".
- DESIGN §4 lets a more specific any-identity entry name the rule before a broader entry of the
  peer, e.g. (any, TCP, 80) before (peer, TCP, any); the peer's lookup would return the broader
  one, so any-identity entries nested in a prefix of the peer's slot are copied into it.

Pure logic: no BPF, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from shared import bpf_layouts, protocols
from shared.messages import ContainerPort, PolicyEntry, ResolvedPolicy
from shared.proxy import redirect_port

INGRESS = 1
EGRESS = 2

PROTO_ANY = protocols.ANY
PROTO_ICMP = protocols.ICMP
PROTO_TCP = protocols.TCP
PROTO_UDP = protocols.UDP
PROTO_SCTP = protocols.SCTP
# a port without a protocol means these (Cilium expands it the same way): the key has no
# "any protocol, this port" form, since the protocol byte precedes the port
PORT_PROTOCOLS = tuple(protocols.PORT_PROTOCOLS.values())

# prefix lengths, in bits, counted over the key after its prefixlen field
SLOT_BITS = 96  # endpoint 32 + direction 8 + pad 24 + identity 32
PROTO_BITS = SLOT_BITS + 16  # protocol 8 + pad2 8
KEY_BITS = PROTO_BITS + 16  # port

_MAX_PORT = protocols.MAX_PORT
_PREFIXLEN = bpf_layouts.POLICY_KEY_PREFIXLEN
_DATA = bpf_layouts.POLICY_KEY_DATA
_VALUE = bpf_layouts.POLICY_VALUE


@dataclass(frozen=True, order=True)
class PolicyKey:
    """One trie key; bits beyond ``prefixlen`` are always zero, so equal prefixes are equal keys."""

    prefixlen: int
    endpoint: int
    direction: int
    identity: int
    protocol: int
    port: int

    def pack(self) -> bytes:
        """The C ``struct policy_key``: prefixlen in host order (the kernel's
        ``bpf_lpm_trie_key``), the matched fields big-endian so the trie's bit order is theirs."""
        return _PREFIXLEN.pack(self.prefixlen) + self._data()

    @classmethod
    def unpack(cls, data: bytes) -> PolicyKey:
        """The inverse of :meth:`pack`, for keys read back from the map."""
        (prefixlen,) = _PREFIXLEN.unpack_from(data)
        fields = _DATA.unpack(data[_PREFIXLEN.size :])
        return cls(prefixlen, *fields)

    def _data(self) -> bytes:
        return _DATA.pack(self.endpoint, self.direction, self.identity, self.protocol, self.port)

    def _bits(self) -> int:
        """The matched fields as one number, in the trie's bit order (what ``_data`` packs)."""
        return (
            self.endpoint << 96
            | self.direction << 88
            | self.identity << 32
            | self.protocol << 24
            | self.port
        )


@dataclass(frozen=True)
class PolicyValue:
    rule_id: int
    deny: bool
    # non-zero: the entry's port carries L7 rules; its connections go to the node's proxy on
    # this port (and are dropped when it cannot take them), never allowed at L4
    proxy_port: int = 0

    def pack(self) -> bytes:
        """The C ``struct policy_value`` (host order, little-endian here)."""
        return _VALUE.pack(self.rule_id, int(self.deny), self.proxy_port)

    @classmethod
    def unpack(cls, data: bytes) -> PolicyValue:
        rule_id, deny, proxy_port = _VALUE.unpack(data)
        return cls(rule_id=rule_id, deny=bool(deny), proxy_port=proxy_port)


# (prefixlen, protocol, port) of a key within its slot
_Prefix = tuple[int, int, int]


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """The fewest (value, prefix bits) pairs over 16-bit ports covering exactly first..last."""
    out: list[tuple[int, int]] = []
    while first <= last:
        # the largest aligned block starting at ``first`` that does not run past ``last``
        size = first & -first if first else 1 << 16
        while first + size - 1 > last:
            size >>= 1
        out.append((first, 16 - (size.bit_length() - 1)))
        first += size
    return out


def _port_mask(bits: int) -> int:
    return (_MAX_PORT << (16 - bits)) & _MAX_PORT


def _prefixes(protocol: int, first: int, last: int) -> Iterator[_Prefix]:
    """Prefixes for one protocol (or any) and an inclusive port range (0 = any port)."""
    if first == 0:
        if protocol == PROTO_ANY:
            yield (SLOT_BITS, PROTO_ANY, 0)
        else:
            yield (PROTO_BITS, protocol, 0)
        return
    for proto in PORT_PROTOCOLS if protocol == PROTO_ANY else (protocol,):
        for value, bits in port_prefixes(first, last):
            yield (PROTO_BITS + bits, proto, value)


def _entry_prefixes(entry: PolicyEntry, ports: Sequence[ContainerPort]) -> Iterator[_Prefix]:
    if entry.port_name:
        # Cilium semantics: a named port the endpoint does not declare yields nothing
        for cp in ports:
            proto = protocols.PORT_PROTOCOLS.get(cp.protocol.upper())
            if cp.name != entry.port_name or proto is None or not 0 < cp.port <= _MAX_PORT:
                continue
            if entry.protocol in (PROTO_ANY, proto):
                yield from _prefixes(proto, cp.port, cp.port)
        return
    if not 0 <= entry.port <= _MAX_PORT:
        return  # the policy service validates ports; an impossible one matches nothing
    # end_port 0 (or not above port) is a single port
    last = min(max(entry.end_port, entry.port), _MAX_PORT)
    yield from _prefixes(entry.protocol, entry.port, last)


def _ancestors(prefix: _Prefix) -> Iterator[_Prefix]:
    """Every prefix of the slot that contains ``prefix``, itself included."""
    length, protocol, port = prefix
    yield (SLOT_BITS, PROTO_ANY, 0)
    if length >= PROTO_BITS:
        for bits in range(length - PROTO_BITS + 1):
            yield (PROTO_BITS + bits, protocol, port & _port_mask(bits))


def _stronger(new: PolicyValue, old: PolicyValue) -> bool:
    """Which of two values for one key is kept: deny beats allow, an L7 redirect beats a plain
    allow (the proxy then allows what the plain allow does: every request), then the lowest
    rule id."""
    return (not new.deny, not new.proxy_port, new.rule_id) < (
        not old.deny,
        not old.proxy_port,
        old.rule_id,
    )


def _without_hidden_allows(slot: Mapping[_Prefix, PolicyValue]) -> dict[_Prefix, PolicyValue]:
    denies = {prefix for prefix, value in slot.items() if value.deny}
    # an allow under a deny would be the longer match and hide it; without the allow the
    # lookup falls through to that deny (or to a longer one), so leaving it out is exact
    return {
        prefix: value
        for prefix, value in slot.items()
        if value.deny or denies.isdisjoint(_ancestors(prefix))
    }


def _compile_direction(
    slots: Mapping[int, Mapping[_Prefix, PolicyValue]],
) -> dict[int, dict[_Prefix, PolicyValue]]:
    wildcard = _without_hidden_allows(slots.get(0, {}))
    out = {0: wildcard}
    for identity, own in slots.items():
        if identity == 0:
            continue
        merged = dict(own)
        for prefix, value in wildcard.items():
            # strictly inside a prefix of the peer: the more specific match must name the rule;
            # anywhere else the datapath falls back to the any-identity lookup by itself
            if prefix not in own and not own.keys().isdisjoint(_ancestors(prefix)):
                merged[prefix] = value
        out[identity] = _without_hidden_allows(merged)
    return out


def compile_endpoint(
    endpoint: int,
    policy: ResolvedPolicy | None,
    ports: Sequence[ContainerPort],
    peer_ports: Mapping[int, Sequence[ContainerPort]] | None = None,
) -> dict[PolicyKey, PolicyValue]:
    """All trie entries of one endpoint, both directions (none without a policy).

    A named port is the endpoint's own (``ports``) for ingress, and the destination's for
    egress: ``peer_ports`` gives each peer identity's container ports (its pods', cluster-wide).
    An egress entry for any peer becomes one entry per identity declaring the name, with that
    identity's number, so that each destination is reached on its own port only. Whether a
    direction is enforced lives in the endpoint map, not here. An allow with L7 rules holds
    its proxy's port (``shared.proxy.redirect_port``): the node's proxy decides its connections.
    """
    out: dict[PolicyKey, PolicyValue] = {}
    if policy is None:
        return out
    peer_ports = peer_ports or {}
    for direction, entries in ((INGRESS, policy.ingress), (EGRESS, policy.egress)):
        slots: dict[int, dict[_Prefix, PolicyValue]] = {}
        for entry in entries:
            redirect = 0 if entry.deny else redirect_port(entry.l7)
            value = PolicyValue(entry.rule_id, entry.deny, redirect)
            targets: Iterable[tuple[int, Sequence[ContainerPort]]]
            if direction == INGRESS or not entry.port_name:
                targets = ((entry.peer, ports),)
            elif entry.peer:
                targets = ((entry.peer, peer_ports.get(entry.peer, ())),)
            else:
                targets = peer_ports.items()
            for peer, named in targets:
                slot = slots.setdefault(peer, {})
                for prefix in _entry_prefixes(entry, named):
                    old = slot.get(prefix)
                    if old is None or _stronger(value, old):
                        slot[prefix] = value
        for identity, slot in _compile_direction(slots).items():
            for (length, protocol, port), value in slot.items():
                key = PolicyKey(length, endpoint, direction, identity, protocol, port)
                out[key] = value
    return out


def diff(
    installed: Mapping[PolicyKey, PolicyValue], desired: Mapping[PolicyKey, PolicyValue]
) -> tuple[dict[PolicyKey, PolicyValue], list[PolicyKey]]:
    """(entries to upsert, keys to delete) turning ``installed`` into ``desired``.

    A key whose value changes is updated in place, never deleted and re-added, so no lookup
    sees it missing. Both parts are sorted, for reproducible map writes.
    """
    upserts = {key: desired[key] for key in sorted(desired) if installed.get(key) != desired[key]}
    deletes = sorted(key for key in installed if key not in desired)
    return upserts, deletes


def _lookup(entries: Mapping[PolicyKey, PolicyValue], probe: PolicyKey) -> PolicyValue | None:
    """Longest-prefix match of ``probe`` (a full-length key), as the kernel's LPM trie does."""
    bits = probe._bits()
    best: PolicyKey | None = None
    for key in entries:
        if best is not None and key.prefixlen <= best.prefixlen:
            continue
        shift = KEY_BITS - key.prefixlen
        if key._bits() >> shift == bits >> shift:
            best = key
    return None if best is None else entries[best]


def verdict(
    entries: Mapping[PolicyKey, PolicyValue],
    endpoint: int,
    direction: int,
    peer: int,
    protocol: int,
    port: int,
    address: int = 0,
) -> tuple[str, int]:
    """The datapath's policy decision: ("allow" | "proxy" | "deny" | "none", rule id).

    Mirrors ``policy_check`` in bpf/datapath.c: the peer's slot, the slot of the peer's address
    (``address``, ``ADDRESS | n`` for a pod address; 0: none) and the any-identity slot, a deny
    from any first, then an allow, in that order; "proxy" is an allow with L7 rules (the proxy
    decides each request). "none" (rule 0) is a drop only when the direction is enforced,
    which the caller knows.
    """
    found = [
        _lookup(entries, PolicyKey(KEY_BITS, endpoint, direction, identity, protocol, port))
        for identity in ((peer, address, 0) if address else (peer, 0))
    ]
    for deny in (True, False):
        for value in found:
            if value is not None and value.deny is deny:
                if deny:
                    return ("deny", value.rule_id)
                return ("proxy" if value.proxy_port else "allow", value.rule_id)
    return ("none", 0)
