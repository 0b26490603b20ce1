"""What the proxy knows (ipcache, resolved policies, peer sets) and the L7 verdict of a request.

The datapath steered a connection here because an allow entry of its port holds L7 rules, at
the client's egress, the server's ingress, or both. For each request the proxy finds, per
direction, the allow entries that match the connection (peer identity, TCP, port) as the
datapath's compiler does, and:

- the direction not enforced: that side does not restrict;
- enforced, but no allow entry matches (a named port, which the proxy does not resolve, or a
  policy that changed under an open connection): that side denies everything (fail closed);
- a matching entry without L7 rules (a plain L4 allow of the same peer and port): that side
  allows every request, as Cilium's wildcard L7 rule does;
- otherwise the request must match one of the matching entries' HTTP rules.

A request is allowed when every side allows it: an open keep-alive connection whose L7 rules
were removed goes on as the L3/L4 policy now says.

Pure logic: the service feeds it KV events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import msgspec

from shared import identities, l7_http, l7_kafka
from shared.errors import InvalidArgument
from shared.messages import IPCacheEntry, PeerSet, PolicyEntry, ResolvedPolicy

PROTO_TCP = 6
T = TypeVar("T")
_resolved_decoder = msgspec.json.Decoder(ResolvedPolicy)
_ipcache_decoder = msgspec.json.Decoder(IPCacheEntry)
_peer_set_decoder = msgspec.json.Decoder(PeerSet)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    src_identity: int
    dst_identity: int
    rule_id: int = 0  # the rule that allowed it, or one that restricts and did not match
    policy: str = ""  # that rule's name: namespace/name[index]
    direction: str = ""  # the side that decided: ingress | egress
    logged: bool = False  # allowed with a headerMatches LOG mismatch


@dataclass(frozen=True)
class _Compiled:
    http: tuple[l7_http.HttpRule, ...]
    kafka: tuple[l7_kafka.KafkaRule, ...]


@dataclass(frozen=True)
class _Side:
    direction: str
    rules: tuple[tuple[int, l7_http.HttpRule], ...]  # (rule id, rule)
    kafka: tuple[tuple[int, l7_kafka.KafkaRule], ...]
    allow_all_rule: int  # a plain allow's rule id (0: none)
    restricting_rule: int  # the first entry with L7 rules: named when nothing matches
    names: Mapping[int, str]


class View:
    def __init__(self, node: str = "") -> None:
        self.node = node  # the proxy's own
        self._ipcache_keys: dict[str, IPv4Network] = {}
        self.ipcache: dict[IPv4Address, int] = {}
        self.elsewhere: set[IPv4Address] = set()  # pods on other nodes
        self.prefixes: dict[IPv4Network, int] = {}  # CIDR entries, longest first on lookup
        self.resolved: dict[int, ResolvedPolicy] = {}
        self.members: dict[int, frozenset[int]] = {}
        self._compiled: dict[str, _Compiled] = {}
        self.generation = 0  # moves on every change: connections re-check their next request
        # what restricts a (source, destination, port), computed once per generation: the
        # next request after any change sees the change
        self._sides: dict[tuple[IPv4Address, IPv4Address, int], Lookup] = {}
        self._sides_generation = 0

    # --- KV events --------------------------------------------------------------------------

    def set_ipcache(self, key: str, data: bytes | None) -> None:
        old = self._ipcache_keys.pop(key, None)
        if old is not None:
            if old.prefixlen == 32:
                self.ipcache.pop(old.network_address, None)
                self.elsewhere.discard(old.network_address)
            else:
                self.prefixes.pop(old, None)
        if data is not None:
            entry = _ipcache_decoder.decode(data)
            network = IPv4Network(entry.cidr, strict=False)
            self._ipcache_keys[key] = network
            if network.prefixlen == 32:
                self.ipcache[network.network_address] = entry.identity
                if entry.node and entry.node != self.node:
                    self.elsewhere.add(network.network_address)
            else:
                self.prefixes[network] = entry.identity
        self.generation += 1

    def set_resolved(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.resolved.pop(int(key), None)
        else:
            policy = _resolved_decoder.decode(data)
            self.resolved[policy.identity] = policy
        self.generation += 1

    def set_members(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.members.pop(int(key), None)
        else:
            peer_set = _peer_set_decoder.decode(data)
            self.members[peer_set.id] = frozenset(peer_set.identities)
        self.generation += 1

    # --- lookups ------------------------------------------------------------------------------

    def identity_of(self, address: IPv4Address) -> int:
        found = self.ipcache.get(address)
        if found is not None:
            return found
        best: tuple[int, int] | None = None
        for network, identity in self.prefixes.items():
            if address in network and (best is None or network.prefixlen > best[0]):
                best = (network.prefixlen, identity)
        return best[1] if best else identities.WORLD

    def _matches(self, entry: PolicyEntry, peer: int, port: int, deny: bool = False) -> bool:
        """Whether ``entry`` -- an allow, or a deny when ``deny`` -- applies to ``peer`` on
        TCP ``port``."""
        if entry.deny != deny or entry.protocol not in (0, PROTO_TCP) or entry.port_name:
            return False
        if entry.selector:
            if peer not in self.members.get(entry.selector, ()):
                return False
        elif entry.peer and entry.peer != peer:
            return False
        if entry.port == 0:
            return True
        return entry.port <= port <= max(entry.port, entry.end_port)

    def _rules(self, entry: PolicyEntry) -> _Compiled:
        key = msgspec.json.encode(entry.l7).decode()
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = _Compiled(
                _compile(l7_http.compile_rules, entry, "http"),
                _compile(l7_kafka.compile_rules, entry, "kafka"),
            )
        return compiled

    def _side(self, subject: int, direction: str, peer: int, port: int) -> _Side | None:
        policy = self.resolved.get(subject)
        if policy is None:
            return None
        enforced = policy.ingress_enforced if direction == "ingress" else policy.egress_enforced
        if not enforced:
            return None
        entries = policy.ingress if direction == "ingress" else policy.egress
        # a deny wins over every allow, L7 ones included, as in the datapath: a side that
        # lets nothing through, named after the deny. (The datapath drops such a connection
        # before it reaches the proxy; a deny that arrives while one is open is the proxy's
        # to enforce, on the connection's next request.)
        for entry in entries:
            if self._matches(entry, peer, port, deny=True):
                return _Side(direction, (), (), 0, entry.rule_id, policy.rules)
        rules: list[tuple[int, l7_http.HttpRule]] = []
        kafka: list[tuple[int, l7_kafka.KafkaRule]] = []
        allow_all = 0
        restricting = 0
        for entry in entries:
            if not self._matches(entry, peer, port):
                continue
            if entry.l7:
                restricting = restricting or entry.rule_id
                compiled = self._rules(entry)
                rules.extend((entry.rule_id, rule) for rule in compiled.http)
                kafka.extend((entry.rule_id, rule) for rule in compiled.kafka)
            elif not allow_all:
                allow_all = entry.rule_id
        if not restricting and allow_all:
            return None
        return _Side(direction, tuple(rules), tuple(kafka), allow_all, restricting, policy.rules)

    def lookup(self, src: IPv4Address, dst: IPv4Address, port: int) -> Lookup:
        """What restricts a (source, destination, port) now: computed once per generation and
        tuple; a connection keeps it while ``lookup.generation == view.generation`` (any change
        moves the generation: its next request looks again)."""
        if self._sides_generation != self.generation:
            self._sides.clear()
            self._sides_generation = self.generation
        key = (src, dst, port)
        found = self._sides.get(key)
        if found is None:
            src_id, dst_id = self.identity_of(src), self.identity_of(dst)
            sides = tuple(
                side
                for side in (
                    self._side(src_id, "egress", dst_id, port),
                    self._side(dst_id, "ingress", src_id, port),
                )
                if side is not None
            )
            if len(self._sides) > 65536:  # bounded: one entry per connection tuple seen
                self._sides.clear()
            found = self._sides[key] = Lookup(self.generation, src_id, dst_id, sides)
        return found

    def speaks_kafka(self, src: IPv4Address, dst: IPv4Address, port: int) -> bool:
        """Whether the rules restricting the connection are Kafka rules: the port speaks
        Kafka (which has no greeting to tell it by), as Cilium picks its parser by the rule."""
        return any(side.kafka for side in self.lookup(src, dst, port).sides)

    def kafka(
        self, src: IPv4Address, dst: IPv4Address, port: int, request: l7_kafka.KafkaRequest
    ) -> Verdict:
        """A Kafka request: on each restricting side, the side's Kafka rules together must
        allow it (every topic it names allowed by some rule)."""
        found = self.lookup(src, dst, port)
        allowed_by = (0, "", "")
        for side in found.sides:
            if side.allow_all_rule:
                rule_id = side.allow_all_rule
            else:
                index = l7_kafka.allows([rule for _, rule in side.kafka], request)
                rule_id = side.kafka[index][0] if index is not None else 0
                if not rule_id:
                    rule_id = side.restricting_rule
                    name = side.names.get(rule_id, "")
                    return found.verdict(False, rule_id, name, side.direction)
            allowed_by = (rule_id, side.names.get(rule_id, ""), side.direction)
        return found.verdict(True, *allowed_by)

    def unparsed(self, src: IPv4Address, dst: IPv4Address, port: int) -> Verdict:
        """Denied before any request could be read (malformed frames): who was talking."""
        found = self.lookup(src, dst, port)
        return Verdict(False, found.src_identity, found.dst_identity)

    def http(
        self,
        src: IPv4Address,
        dst: IPv4Address,
        port: int,
        method: str,
        target: str,
        headers: Mapping[str, str],
    ) -> Verdict:
        return self.http_on(self.lookup(src, dst, port), method, target, headers)

    def http_on(
        self, found: Lookup, method: str, target: str, headers: Mapping[str, str]
    ) -> Verdict:
        """An HTTP request on a connection whose :meth:`lookup` is ``found`` (current)."""
        allowed_by = (0, "", "")
        logged = False
        for side in found.sides:
            if side.allow_all_rule:
                rule_id = side.allow_all_rule
                allowed_by = (rule_id, side.names.get(rule_id, ""), side.direction)
                continue
            for rule_id, rule in side.rules:
                ok, log = rule.matches(method, target, headers)
                if ok:
                    logged = logged or log
                    allowed_by = (rule_id, side.names.get(rule_id, ""), side.direction)
                    break
            else:
                # denied: name the policy whose rules restrict this side
                rule_id = side.restricting_rule
                return found.verdict(False, rule_id, side.names.get(rule_id, ""), side.direction)
        return found.verdict(True, *allowed_by, logged=logged)


class Lookup:
    """The identities of a (source, destination, port) and the sides that restrict it, as of
    one generation of the view; the verdicts made from them, made once."""

    __slots__ = ("_verdicts", "dst_identity", "generation", "sides", "src_identity")

    def __init__(
        self, generation: int, src_identity: int, dst_identity: int, sides: tuple[_Side, ...]
    ) -> None:
        self.generation = generation
        self.src_identity = src_identity
        self.dst_identity = dst_identity
        self.sides = sides
        self._verdicts: dict[tuple[bool, int, str, str, bool], Verdict] = {}

    def verdict(
        self, allowed: bool, rule_id: int, policy: str, direction: str, logged: bool = False
    ) -> Verdict:
        key = (allowed, rule_id, policy, direction, logged)
        found = self._verdicts.get(key)
        if found is None:  # bounded: one per rule of the sides, allowed or not, logged or not
            found = self._verdicts[key] = Verdict(
                allowed, self.src_identity, self.dst_identity, rule_id, policy, direction, logged
            )
        return found


def _compile(
    compile_rules: Callable[[Any, str], tuple[T, ...]], entry: PolicyEntry, protocol: str
) -> tuple[T, ...]:
    raw = [rule[protocol] for rule in entry.l7 if isinstance(rule.get(protocol), dict)]
    # validated at apply; a rule that still fails to compile matches nothing
    try:
        return compile_rules(raw, protocol)
    except (ValueError, InvalidArgument):
        return ()
