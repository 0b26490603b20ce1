"""Flow filters, shared by the monitor (queries) and the CLI (``observe --follow``).

A query is a list of terms, all of which must hold; a term holds when its field matches any of
its values, or, negated (``--not``), when it matches none. Peer fields come in three forms:
``pod`` matches either side, ``from_pod`` the source, ``to_pod`` the destination.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence

from shared import fqdn
from shared.errors import InvalidArgument
from shared.flow_api import EnrichedFlow, FlowFilterTerm, FlowPeer
from shared.flow_groups import workload

VERDICTS = ("FORWARDED", "DROPPED", "AUDIT", "REDIRECTED", "ERROR")
TYPES = ("drop", "trace", "policy-verdict", "l7", "dns")  # dns: the l7 flows of DNS queries
PEER_FIELDS = ("pod", "namespace", "label", "identity", "ip", "port", "service", "workload")
FLOW_FIELDS = (
    "verdict",
    "type",
    "protocol",
    "node",
    "traffic_direction",
    "tcp_flags",
    "reply",
    "http_method",
    "http_path",
    "http_status",
    "l7_protocol",
    "grpc_status",
    "kafka_topic",
    "fqdn",
)
# protocols as flows carry them (shared/flow_decode.py): a name, else the number
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP"}
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "SCTP": 132}
TCP_FLAGS = ("SYN", "ACK", "FIN", "RST", "PSH", "URG", "ECE", "CWR")
DIRECTIONS = ("ingress", "egress")
FIELDS = (
    *FLOW_FIELDS,
    *PEER_FIELDS,
    *(f"from_{f}" for f in PEER_FIELDS),
    *(f"to_{f}" for f in PEER_FIELDS),
)

PeerTest = Callable[[FlowPeer], bool]
FlowTest = Callable[[EnrichedFlow], bool]


def _pod_test(value: str) -> PeerTest:
    # Hubble's form: [namespace/]name-prefix; without a namespace any namespace matches
    namespace, slash, name = value.rpartition("/")
    if not name:
        raise InvalidArgument(f"pod filter {value!r} has no name", field="pod")

    def test(peer: FlowPeer) -> bool:
        if not peer.pod.startswith(name):
            return False
        return not slash or peer.namespace == namespace

    return test


def _service_test(value: str) -> PeerTest:
    # Hubble's form: [namespace/]name; without a namespace any namespace matches
    namespace, slash, name = value.rpartition("/")
    if not name:
        raise InvalidArgument(f"service filter {value!r} has no name", field="service")

    def test(peer: FlowPeer) -> bool:
        have_namespace, _, have_name = peer.service.partition("/")
        return have_name == name and (not slash or have_namespace == namespace)

    return test


def protocol_name(value: str, field: str = "protocol") -> str:
    """``tcp``, ``TCP`` or ``6`` -> ``TCP``; ``SCTP`` -> ``132``: what a flow carries."""
    text = value.strip().upper()
    if text.isdigit():
        number = _int(text, field, 255)
        return PROTOCOL_NAMES.get(number, str(number))
    if text not in PROTOCOL_NUMBERS:
        raise InvalidArgument(
            f"unknown protocol {value!r}: {', '.join(PROTOCOL_NUMBERS)} or a number", field=field
        )
    return PROTOCOL_NAMES.get(PROTOCOL_NUMBERS[text], str(PROTOCOL_NUMBERS[text]))


def _tcp_flags_test(value: str, field: str) -> FlowTest:
    """``SYN,ACK``: every one of the flags is set (Hubble's reading)."""
    wanted = [flag.strip().upper() for flag in value.split(",") if flag.strip()]
    unknown = [flag for flag in wanted if flag not in TCP_FLAGS]
    if unknown or not wanted:
        raise InvalidArgument(
            f"unknown TCP flag {','.join(unknown) or value!r}: {', '.join(TCP_FLAGS)}",
            field=field,
        )
    return lambda flow: all(flag in flow.tcp_flags for flag in wanted)


def _bool(value: str, field: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise InvalidArgument(f"{value!r} is not true or false", field=field)
    return text == "true"


def _label_test(value: str) -> PeerTest:
    """``k=v[,k2=v2]`` (all must hold) or ``k`` (present); keys match with or without a source
    prefix such as ``k8s:``."""
    wanted: list[tuple[str, str | None]] = []
    for part in value.split(","):
        key, eq, want = part.strip().partition("=")
        if not key:
            raise InvalidArgument(f"label filter {value!r} has an empty key", field="label")
        wanted.append((key, want if eq else None))

    def matches(label: str, key: str, want: str | None) -> bool:
        name, _eq, have = label.partition("=")
        if name != key and name.partition(":")[2] != key:
            return False
        return want is None or have == want

    def test(peer: FlowPeer) -> bool:
        return all(any(matches(lab, k, w) for lab in peer.labels) for k, w in wanted)

    return test


def _int(value: str, field: str, upper: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a number", field=field) from None
    if not 0 <= number <= upper:
        raise InvalidArgument(f"{number} is out of range 0..{upper}", field=field)
    return number


def _ip_test(value: str, field: str) -> PeerTest:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not an IP address or CIDR", field=field) from None

    def test(peer: FlowPeer) -> bool:
        try:
            return bool(peer.ip) and ipaddress.ip_address(peer.ip) in network
        except ValueError:
            return False

    return test


def _peer_test(kind: str, value: str, field: str) -> PeerTest:
    if kind == "pod":
        return _pod_test(value)
    if kind == "namespace":
        return lambda peer: peer.namespace == value
    if kind == "label":
        return _label_test(value)
    if kind == "identity":
        number = _int(value, field, 2**32 - 1)
        return lambda peer: peer.identity == number
    if kind == "ip":
        return _ip_test(value, field)
    if kind == "workload":
        return lambda peer: workload(peer) == value
    if kind == "service":
        return _service_test(value)
    port = _int(value, field, 65535)
    return lambda peer: peer.port == port


def _http_test(field: str, value: str) -> FlowTest:
    """L7 flows: method (any case), path (a regular expression searched in the URL, as
    Hubble's --http-path), status (a code, or "4+" for every 4xx)."""
    if field == "http_method":
        method = value.upper()
        return lambda flow: flow.l7 is not None and flow.l7.method.upper() == method
    if field == "http_path":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise InvalidArgument(f"not a regular expression: {exc}", field=field) from None
        return lambda flow: flow.l7 is not None and pattern.search(flow.l7.url) is not None
    if value.endswith("+"):
        digit = _int(value[:-1], field, 5)
        return lambda flow: flow.l7 is not None and flow.l7.status // 100 == digit
    status = _int(value, field, 999)
    return lambda flow: flow.l7 is not None and flow.l7.status == status


def _fqdn_test(value: str, field: str) -> FlowTest:
    """A DNS flow whose query, or a flow whose destination_names, the name or pattern (Cilium's
    matchPattern: ``*`` within one label) matches."""
    match = fqdn.NameMatch(match_pattern=fqdn.check_pattern(value, field))

    def test(flow: EnrichedFlow) -> bool:
        if flow.l7 is not None and flow.l7.query and match.matches(flow.l7.query):
            return True
        return any(match.matches(name) for name in flow.destination_names)

    return test


def _l7_test(field: str, value: str) -> FlowTest:
    """L7 flows: the protocol (http, grpc, http2, kafka, dns), a gRPC call's status, a Kafka
    request naming the topic."""
    if field == "l7_protocol":
        protocol = value.lower()
        return lambda flow: flow.l7 is not None and flow.l7.protocol == protocol
    if field == "grpc_status":
        code = _int(value, field, 16)
        return lambda flow: flow.l7 is not None and flow.l7.grpc_status == code
    return lambda flow: flow.l7 is not None and value in flow.l7.topics


def _value_test(field: str, value: str) -> FlowTest:
    if field == "verdict":
        verdict = value.upper()
        if verdict not in VERDICTS:
            raise InvalidArgument(f"unknown verdict {value!r}: {', '.join(VERDICTS)}", field=field)
        return lambda flow: flow.verdict == verdict
    if field == "type":
        kind = value.lower()
        if kind not in TYPES:
            raise InvalidArgument(f"unknown type {value!r}: {', '.join(TYPES)}", field=field)
        if kind == "dns":
            return lambda flow: flow.l7 is not None and flow.l7.protocol == "dns"
        return lambda flow: flow.type == kind
    if field == "fqdn":
        return _fqdn_test(value, field)
    if field == "protocol":
        protocol = protocol_name(value, field)
        return lambda flow: flow.protocol.upper() == protocol
    if field == "node":  # a name or a shell pattern, as Hubble's --node-name takes
        return lambda flow: fnmatch.fnmatchcase(flow.node, value)
    if field == "traffic_direction":
        direction = value.lower()
        if direction not in DIRECTIONS:
            raise InvalidArgument(f"unknown direction {value!r}: ingress, egress", field=field)
        return lambda flow: flow.direction == direction
    if field == "tcp_flags":
        return _tcp_flags_test(value, field)
    if field == "reply":
        reply = _bool(value, field)
        return lambda flow: flow.is_reply == reply
    if field.startswith("http_"):
        return _http_test(field, value)
    if field in ("l7_protocol", "grpc_status", "kafka_topic"):
        return _l7_test(field, value)
    side, _, kind = field.partition("_") if field.startswith(("from_", "to_")) else ("", "", field)
    peer = _peer_test(kind, value, field)
    if side == "from":
        return lambda flow: peer(flow.source)
    if side == "to":
        return lambda flow: peer(flow.destination)
    return lambda flow: peer(flow.source) or peer(flow.destination)


def compile_filter(terms: Sequence[FlowFilterTerm], until: float = 0.0) -> FlowTest:
    """One predicate for the whole query, flows from ``until`` on (unix time, 0: no bound)
    excluded; a bad term raises InvalidArgument naming it."""
    tests: list[tuple[list[FlowTest], bool]] = []
    for index, term in enumerate(terms):
        if term.field not in FIELDS:
            raise InvalidArgument(
                f"unknown filter {term.field!r}: {', '.join(FIELDS)}", field=f"filters[{index}]"
            )
        if not term.values:
            raise InvalidArgument("a filter needs a value", field=f"filters[{index}].values")
        tests.append(([_value_test(term.field, v) for v in term.values], term.negate))
    if until:
        tests.append(([lambda flow: flow.time < until], False))
    if not tests:
        return lambda flow: True

    def test(flow: EnrichedFlow) -> bool:
        return all(any(t(flow) for t in alts) != negate for alts, negate in tests)

    return test
