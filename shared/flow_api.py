"""Enriched flows and the monitor's request/reply payloads (the public flow schema).

:class:`EnrichedFlow` is what ``membrane observe -o json`` prints (one per line) and what
external systems receive on ``membrane.events.flows.<verdict>.<namespace>``. It is versioned
like every payload (``v``); fields are only ever added, with defaults.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from shared.messages import ContainerPort, L7Info, Message


def _doc(text: str) -> msgspec.Meta:
    """A field's description; it goes into the JSON schema and so into docs/asyncapi.yaml."""
    return msgspec.Meta(description=text)


class FlowPeer(Message, gc=False):  # gc=False: no cycles, and enrichment makes millions
    """One side of a flow: address, port and what membrane knows about the workload."""

    ip: Annotated[str, _doc("IPv4 address")] = ""
    port: Annotated[int, _doc("L4 port; for ICMP the destination's is the ICMP type")] = 0
    identity: Annotated[int, _doc("security identity (1 host, 2 world, >= 256 workloads)")] = 0
    namespace: Annotated[str, _doc("the pod's namespace; empty when the address is no pod")] = ""
    pod: Annotated[str, _doc("the pod's name; empty when the address is no pod")] = ""
    node: Annotated[str, _doc("the node hosting the address")] = ""
    labels: Annotated[list[str], _doc("the identity's labels, sorted: k8s:app=web")] = []
    service: Annotated[
        str,
        _doc(
            "namespace/name of the service when ip:port is its frontend, or its backend on a"
            " request's destination / a reply's source (comma-separated when several)"
        ),
    ] = ""


class EnrichedFlow(Message, gc=False):
    """A datapath flow with both workloads, the reason's name and the deciding policy."""

    time: Annotated[float, _doc("unix time in seconds of the kernel event")]
    node: Annotated[str, _doc("the node whose datapath observed the flow")]
    type: Annotated[str, _doc("drop, trace, policy-verdict or l7")]
    verdict: Annotated[str, _doc("FORWARDED, DROPPED or AUDIT")]
    drop_reason: Annotated[int, _doc("Cilium's drop reason code; 0 unless dropped")] = 0
    drop_reason_desc: Annotated[str, _doc("Cilium's name of the reason: Policy denied")] = ""
    direction: Annotated[str, _doc("ingress or egress, at the observing endpoint")] = ""
    observation_point: Annotated[str, _doc("from-endpoint or to-endpoint")] = ""
    protocol: Annotated[str, _doc("TCP, UDP, ICMP or the IANA number")] = ""
    tcp_flags: Annotated[list[str], _doc("SYN, ACK, FIN, RST, PSH, URG, ECE, CWR")] = []
    is_reply: Annotated[bool, _doc("the packet travels in a connection's reply direction")] = False
    bytes: Annotated[int, _doc("packet length")] = 0
    source: FlowPeer = msgspec.field(default_factory=FlowPeer)
    destination: FlowPeer = msgspec.field(default_factory=FlowPeer)
    l7: Annotated[
        L7Info | None, _doc("type l7: the request (method, URL, host) and its status, latency")
    ] = None
    destination_names: Annotated[
        list[str],
        _doc("DNS names the source endpoint resolved to the destination address (toFQDNs)"),
    ] = []
    rule_id: Annotated[int, _doc("id of the deciding policy rule; 0 when no rule decided")] = 0
    rule: Annotated[str, _doc("the deciding rule: namespace/name[index]")] = ""
    policy: Annotated[
        str,
        _doc(
            "the deciding policy: namespace/name; for a default-deny drop, the policies that"
            " select the endpoint in that direction, comma-separated"
        ),
    ] = ""


class FlowFilterTerm(Message):
    """One filter: the flow matches if ``field`` matches any of ``values``; ``negate`` inverts.

    Fields: verdict, type, pod, from_pod, to_pod, namespace, from_namespace, to_namespace,
    label, from_label, to_label, identity, from_identity, to_identity, ip, from_ip, to_ip,
    port, from_port, to_port, service, from_service, to_service, workload, from_workload,
    to_workload (a box of the UI's service map: ``shared.flow_groups.workload``), protocol (name
    or number), node (a name or shell pattern), traffic_direction (ingress|egress), tcp_flags
    (``SYN,ACK``: all set), reply (true|false), http_method, http_path, http_status,
    l7_protocol (http, grpc, http2, kafka, dns), grpc_status, kafka_topic, fqdn (a DNS name
    or pattern: the query of a DNS flow, or a name of ``destination_names``). Unprefixed peer
    fields match either side.
    """

    field: str
    values: list[str]
    negate: bool = False


class FlowQuery(Message):
    """Recent flows that pass every filter term; newest ``last`` of them (0: all)."""

    filters: list[FlowFilterTerm] = []
    last: int = 0
    since: float = 0.0  # unix time; 0: no lower bound
    until: float = 0.0  # unix time, excluded; 0: no upper bound (history groups: the rings' part)


class FlowQueryReply(Message):
    flows: list[EnrichedFlow]
    oldest: float = 0.0  # time of the oldest flow the answering ring still holds (0: empty)
    replica: str = ""


class MonitorStatus(Message):
    """One monitor replica's view (``membrane.monitor.status.<replica>``)."""

    replica: str
    ring_size: int
    ring_capacity: int
    flows_seen: int
    flows_lost: int  # lost anywhere before the monitor: datapath ring buffer, publisher
    malformed_batches: int
    identities: int
    endpoints: int
    policies: int
    rules: int
    services: int
    nodes: int


class FlowGroup(Message):
    """Flows of one connection kind, counted: source workload -> destination workload on one
    protocol and port with one recorded verdict (:mod:`shared.flow_groups`). Replies are left
    out: conntrack lets them through without policy."""

    source: Annotated[str, _doc("namespace/app of a pod, or world, host, ... , or the address")]
    destination: Annotated[str, _doc("as source")]
    src_identity: int
    dst_identity: int
    src_ip: Annotated[str, _doc("the address when the source is no pod (world, CIDR)")] = ""
    dst_ip: Annotated[str, _doc("the address when the destination is no pod")] = ""
    protocol: Annotated[str, _doc("TCP, UDP, ICMP or the IANA number")] = ""
    port: Annotated[int, _doc("destination port; for ICMP the type")] = 0
    verdict: Annotated[str, _doc("the recorded verdict: FORWARDED, DROPPED or AUDIT")] = ""
    drop_reason: int = 0
    policy: Annotated[str, _doc("the recorded deciding policy")] = ""
    count: int = 0
    first: Annotated[float, _doc("unix time of the first flow")] = 0.0
    last: Annotated[float, _doc("unix time of the last flow")] = 0.0


class FlowGroupsReply(Message):
    groups: list[FlowGroup]
    flows: int = 0  # flows counted into the groups
    oldest: float = 0.0  # as FlowQueryReply.oldest
    replica: str = ""


class PolicyDiffRequest(Message):
    """``membrane.policy.diff``: replay ``groups`` (recorded flows) against today's policies
    and against today's with ``documents`` applied."""

    documents: list[dict[str, Any]]
    source: str = "-"
    groups: list[FlowGroup] = []
    # container ports by identity, for named ports (the datapath resolves them per endpoint)
    ports: dict[int, list[ContainerPort]] = {}


class VerdictChange(Message):
    group: FlowGroup
    before: Annotated[str, _doc("allowed, audit or dropped: today's policies")]
    after: Annotated[str, _doc("allowed, audit or dropped: with the documents applied")]
    direction: Annotated[str, _doc("the side that decides the new verdict: egress or ingress")]
    policy: Annotated[str, _doc("the policy causing it (for a default deny: those selecting)")]
    rule: Annotated[str, _doc("the deciding rule, empty for a default deny")] = ""
    reason: Annotated[str, _doc("explain's sentence for that side")] = ""

    @property
    def newly_denied(self) -> bool:
        return self.after == "dropped" and self.before != "dropped"


class PolicyDiffReply(Message):
    changes: list[VerdictChange]
    groups: int = 0  # flow groups replayed
    affected: int = 0  # identities whose policy the documents change


# --- enriched flow batches -------------------------------------------------------------------
#
# ``membrane.events.flowbatches.<verdict>.<namespace>``: the flows of one verdict and namespace
# from one batch the monitor enriched, as JSON lines (UTF-8): each line is exactly the JSON of
# one ``EnrichedFlow`` (what the per-flow subject carries), each ends with ``\n``, in the order
# the monitor enriched them; a message is at most ``FLOW_BATCH_MAX_BYTES`` unless a single flow
# is longer. JSON escapes a newline inside a string, so a newline always ends a flow.

FLOW_BATCH_MAX_BYTES = 128 * 1024
_flow_lines = msgspec.json.Encoder()
_flow_list = msgspec.json.Decoder(list[EnrichedFlow])


def encode_flow_batch(flows: list[EnrichedFlow]) -> bytes:
    """The flows as one JSON-lines payload (may exceed a message: see :func:`split_batch`)."""
    return _flow_lines.encode_lines(flows)


def split_batch(data: bytes, limit: int = FLOW_BATCH_MAX_BYTES) -> list[tuple[bytes, int]]:
    """JSON lines cut at line ends into payloads of at most ``limit`` bytes (a longer line goes
    alone), each with its count of flows."""
    if len(data) <= limit:
        return [(data, data.count(b"\n"))]
    parts = []
    start, size = 0, len(data)
    while start < size:
        end = size if size - start <= limit else data.rfind(b"\n", start, start + limit) + 1
        if end <= start:  # one flow longer than the limit
            end = data.index(b"\n", start) + 1
        parts.append((data[start:end], data.count(b"\n", start, end)))
        start = end
    return parts


def decode_flow_batch(data: bytes) -> list[EnrichedFlow]:
    """The flows of a ``membrane.events.flowbatches`` payload (one call: the lines become a
    JSON array). A single flow's JSON, as the per-flow subject carries it, is a batch of one.
    Raises ``msgspec.DecodeError`` / ``ValidationError`` if any line is not an EnrichedFlow."""
    body = data.strip()
    if not body:
        return []
    return _flow_list.decode(b"[" + body.replace(b"\n", b",") + b"]")
