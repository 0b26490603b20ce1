"""Enriched flows and the monitor's request/reply payloads (the public flow schema).

:class:`EnrichedFlow` is what ``membrane observe -o json`` prints (one per line) and what
external systems receive on ``membrane.events.flows.<verdict>.<namespace>``. It is versioned
like every payload (``v``); fields are only ever added, with defaults.
"""

from __future__ import annotations

import msgspec

from shared.messages import Message


class FlowPeer(Message, gc=False):
    """One side of a flow: address, port and what membrane knows about the workload."""

    ip: str = ""
    port: int = 0
    identity: int = 0
    namespace: str = ""  # "" when the address is not a pod (world, host, another node)
    pod: str = ""
    node: str = ""  # the node hosting the pod
    labels: list[str] = []  # the identity's labels, "k8s:app=web" form, sorted
    service: str = ""  # "namespace/name" when the address:port is a service frontend


class EnrichedFlow(Message, gc=False):
    """A datapath flow with both workloads, the reason's name and the deciding policy."""

    time: float  # unix time, seconds, of the kernel event
    node: str  # the node that observed it
    type: str  # "drop" | "trace" | "policy-verdict"
    verdict: str  # "FORWARDED" | "DROPPED" | "AUDIT"
    drop_reason: int = 0  # Cilium's code; 0 when forwarded
    drop_reason_desc: str = ""  # Cilium's name of the reason ("Policy denied")
    direction: str = ""  # "ingress" | "egress"
    observation_point: str = ""  # "from-endpoint" | "to-endpoint"
    protocol: str = ""  # "TCP" | "UDP" | "ICMP" | a number
    tcp_flags: list[str] = []
    is_reply: bool = False
    bytes: int = 0
    source: FlowPeer = msgspec.field(default_factory=FlowPeer)
    destination: FlowPeer = msgspec.field(default_factory=FlowPeer)
    rule_id: int = 0
    rule: str = ""  # the deciding rule, "namespace/name[index]"
    policy: str = ""  # the deciding policy, "namespace/name" ("name" if cluster-wide)


class FlowFilterTerm(Message):
    """One filter: the flow matches if ``field`` matches any of ``values``; ``negate`` inverts.

    Fields: verdict, type, pod, from_pod, to_pod, namespace, from_namespace, to_namespace,
    label, from_label, to_label, identity, from_identity, to_identity, ip, from_ip, to_ip,
    port, from_port, to_port, protocol, node. Unprefixed peer fields match either side.
    """

    field: str
    values: list[str]
    negate: bool = False


class FlowQuery(Message):
    """Recent flows that pass every filter term; newest ``last`` of them (0: all)."""

    filters: list[FlowFilterTerm] = []
    last: int = 0
    since: float = 0.0  # unix time; 0: no lower bound


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
