"""Payloads on the bus: typed, versioned msgspec structs, JSON on the wire.

Field names are the wire names. A consumer ignores fields it does not know, so adding an
optional field is compatible; renaming or retyping one needs a new ``v``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every payload."""

    v: int = SCHEMA_VERSION


class ErrorBody(Message):
    """The body of every error reply; ``field`` points at the input that was wrong."""

    code: str
    message: str
    field: str | None = None


class Empty(Message):
    pass


# --- identities -------------------------------------------------------------------------------


class Identity(Message):
    """A security identity: a number and the canonical labels it stands for."""

    id: int
    labels: list[str]
    kind: str  # "reserved" | "cluster" | "local"


class AllocateRequest(Message):
    labels: list[str]
    # who holds the reference: a node name for endpoints, "cli" for manual allocations
    owner: str = "cli"
    # 0: the reference lives until released; else it lapses unless the owner heartbeats
    lease_seconds: float = 0
    # the same id on a retry returns the first result instead of taking a second reference
    request_id: str = ""


class AllocateReply(Message):
    identity: Identity
    new: bool


class ReleaseRequest(Message):
    id: int
    owner: str = "cli"
    request_id: str = ""


class ReleaseReply(Message):
    id: int
    # references left cluster-wide; at 0 the identity is scheduled for garbage collection
    references: int


class GetRequest(Message):
    id: int


class ListReply(Message):
    identities: list[Identity]


class HeartbeatRequest(Message):
    """Renews an owner's lease; references of an owner whose lease lapses are dropped."""

    owner: str
    ttl_seconds: float


class HeartbeatReply(Message):
    owner: str
    expires_at: float


# --- cluster-pool IPAM --------------------------------------------------------------------------


class PodCIDRRequest(Message):
    node: str
    # the node's underlay address: the identity service records it with the CIDR and refuses
    # one another live node holds; peers route and tunnel to the recorded one, never to what
    # a node's own ``nodes`` record says
    underlay_ip: str = ""


class PodCIDR(Message):
    node: str
    cidr: str
    underlay_ip: str = ""  # as recorded at allocation ("": none recorded, peers use none)


class PodCIDRList(Message):
    allocations: list[PodCIDR]


# --- nodes, endpoints, ipcache (written by the datapath agents) --------------------------------


class Node(Message):
    """A node as its agent registers it in the ``nodes`` bucket (key: node name)."""

    name: str
    underlay_ip: str
    pod_cidr: str
    # the address pods use as their default gateway (first address of the pod CIDR)
    router_ip: str
    # unix time the agent wrote the entry: at start and when the record changes. Liveness is
    # not here (NodeLiveness): every agent follows this bucket
    heartbeat: float
    version: str = ""
    health_ip: str = ""  # the node's health endpoint (reserved identity health)
    routing: str = ""  # tunnel | native, as this node's agent runs


# every this many heartbeats an agent puts its ``nodes`` entry back if it is missing
REREGISTER_EVERY = 12


class NodeHeartbeat(Message):
    """A node's agent says it is alive, on ``subjects.node_heartbeat(node)``; the failure
    detector believes one whose ``node`` is the subject's."""

    node: str
    time: float


class NodeLiveness(Message):
    """The failure detector's verdict on a node (``liveness`` bucket, key: its token),
    written when it changes: alive since its first heartbeat, dead once ``expiry`` passed
    without one."""

    node: str
    alive: bool
    since: float  # unix time of the verdict
    heartbeat: float  # unix time of the last heartbeat the detector had then


class ContainerPort(Message):
    """A port a pod's containers declare; named ports in policy resolve against these."""

    port: int
    protocol: str = "TCP"
    name: str = ""


class Endpoint(Message):
    """A pod as wired by its node's agent (``endpoints`` bucket, key
    ``subjects.endpoint_key``: node, namespace, name)."""

    namespace: str
    name: str
    node: str
    ip: str
    identity: int
    labels: dict[str, str]  # the pod's own labels, as written in its manifest
    service_account: str = "default"
    ports: list[ContainerPort] = []
    netns: str = ""  # path of the pod's network namespace on its node
    ifname: str = "eth0"  # interface name inside the pod
    host_ifname: str = ""  # host side of the veth (where the programs attach)
    host_ifindex: int = 0
    mac: str = ""  # MAC of the pod's interface
    host_mac: str = ""  # MAC of the host side of the veth
    container_id: str = ""  # set when the CNI plugin wired it
    owner: str = ""  # e.g. "Deployment/web" for pods a Deployment created
    created: float = 0.0


class IPCacheEntry(Message):
    """IP or CIDR -> security identity (``ipcache`` bucket, key: ``subjects.ipcache_key``)."""

    cidr: str  # "10.244.1.5/32"
    identity: int
    node: str = ""  # the node hosting the address, if it is a pod
    host_ip: str = ""  # that node's underlay address (tunnel endpoint)


class NamespaceRecord(Message):
    """A Kubernetes namespace (``namespaces`` bucket): its labels feed pod identities."""

    name: str
    labels: dict[str, str]
    # written by agents of earlier versions for a namespace a pod used before it was declared;
    # agents now write none (they write only their own node's keys). Kept for old records.
    implicit: bool = False


class PodRecord(Message):
    """A pod as the Kubernetes API has it (``pods`` bucket, written by the k8s bridge): the
    labels and service account its identity comes from, whatever the CNI call carried."""

    namespace: str
    name: str
    labels: dict[str, str]
    service_account: str = "default"
    node: str = ""  # spec.nodeName: "" until the scheduler placed it
    uid: str = ""


class K8sStatus(Message):
    """``membrane.k8s.status``: what one bridge replica holds."""

    replica: str
    leader: bool
    holder: str  # the Lease's holder as this replica last read it
    synced: dict[str, bool]  # kind -> its first list applied
    objects: dict[str, int]  # kind -> objects known
    pending: int  # objects waiting to be handed over again (the bus was away)
    rejected: int  # objects refused since start (reported on the object as an Event)


# --- resolved policy (policy service -> datapath) ----------------------------------------------


class PolicyEntry(Message):
    """One allow or deny entry of a subject identity, in one direction.

    ``peer`` 0 is any identity, ``protocol`` 0 any protocol (IANA numbers: 6 TCP, 17 UDP, 1
    ICMP), ``port`` 0 any port; ``end_port`` > ``port`` makes a range. ``port_name`` is a named
    port, resolved per endpoint from its container ports (an endpoint without it gets no entry).

    ``selector`` non-zero makes the entry stand for every identity of that peer set (the
    ``selectors`` bucket, :class:`PeerSet`), and ``peer`` is then unused. Peers that come and go
    with pods are published this way, as Cilium's selector cache does, so that a new pod changes
    the few peer sets it joins instead of every policy that names one of them.
    """

    peer: int = 0
    selector: int = 0
    protocol: int = 0
    port: int = 0
    end_port: int = 0
    port_name: str = ""
    deny: bool = False
    rule_id: int = 0  # key into ResolvedPolicy.rules; carried into every verdict
    l7: list[dict[str, object]] = []  # L7 rules: the connections go to the node's proxy


class ResolvedPolicy(Message):
    """What policy says for one subject identity (``resolved`` bucket, key: the identity).

    A direction is enforced (default deny) only when some policy selects the identity in that
    direction. The policy service writes an entry for every pod identity, one enforcing nothing
    when no policy selects it; until a pod identity has an entry its endpoints drop new
    connections (pending).
    """

    identity: int
    revision: int
    ingress_enforced: bool = False
    egress_enforced: bool = False
    # audit mode: what the entries would deny is allowed and reported with verdict AUDIT
    ingress_audit: bool = False
    egress_audit: bool = False
    ingress: list[PolicyEntry] = []
    egress: list[PolicyEntry] = []
    rules: dict[int, str] = {}  # rule id -> "namespace/name[index]" (or "name[index]")


class PeerSet(Message):
    """The identities one peer of the policies selects now (``selectors`` bucket, key: ``id``).

    ``id`` is stable (a hash of ``description``), the same in every replica and after restarts.
    ``description`` is Cilium's spelling of the selector, a CIDR rule or an entity class.
    """

    id: int
    revision: int
    description: str = ""
    identities: list[int] = []
    # a toFQDNs selector's {"matchName": ...} or {"matchPattern": ...}: the DNS proxy waits for
    # the addresses it learns to join such sets before it answers the pod
    fqdn: dict[str, str] | None = None


# --- flows (datapath -> monitor) -------------------------------------------------------------


class L7Info(Message, gc=False):
    """One request the node's L7 proxy decided (``Flow.l7``, ``EnrichedFlow.l7``)."""

    protocol: str  # "http" | "grpc" (gRPC and other HTTP/2 calls: "http2") | "kafka"
    method: str = ""  # HTTP method (gRPC: POST)
    url: str = ""  # the request target: path and query; gRPC: /package.Service/Method
    host: str = ""
    status: int = 0  # the response's status; 403 when the proxy denied the request
    latency_ms: float = 0.0  # request headers in -> response headers out
    grpc_status: int | None = None  # gRPC: the call's grpc-status; 7 when the proxy denied it
    # Kafka: the request's API (Cilium's name: produce, fetch, ...), its version and topics,
    # and the answer's error code (29 TOPIC_AUTHORIZATION_FAILED when the proxy denied it, 100
    # UNKNOWN_TOPIC_ID when topic ids it could not name denied it)
    api_key: str = ""
    api_version: int = 0
    topics: list[str] = []
    client_id: str = ""
    error_code: int = 0
    # why the proxy closed the connection (malformed frames), or answered a forwarded request
    # itself (503 / grpc-status 14: the upstream failed), else empty
    error: str = ""
    # DNS (protocol "dns"): the query, its type, the answer's rcode (REFUSED when the proxy
    # denied it), the IPv4 addresses answered and their TTL (seconds)
    query: str = ""
    qtype: str = ""
    rcode: str = ""
    answers: list[str] = []
    ttl: int = 0


class Flow(Message):
    """One event from a node's datapath (or its L7 proxy), decoded but not enriched."""

    time: float  # unix time, seconds
    node: str
    type: str  # "drop" | "trace" | "policy-verdict"
    verdict: str  # "FORWARDED" | "DROPPED"
    reason: int = 0  # Cilium drop reason code; 0 when forwarded
    reason_name: str = ""
    direction: str = ""  # "ingress" | "egress"
    # from-endpoint | to-endpoint | to-overlay | from-overlay | from-network
    observation_point: str = ""
    src_ip: str = ""
    dst_ip: str = ""
    src_port: int = 0
    dst_port: int = 0
    protocol: str = ""  # "TCP" | "UDP" | "ICMP" | number
    tcp_flags: list[str] = []
    src_identity: int = 0
    dst_identity: int = 0
    ifindex: int = 0
    rule_id: int = 0
    is_reply: bool = False
    bytes: int = 0
    l7: L7Info | None = None  # type "l7": the request and its answer


class FlowBatch(Message):
    """Flows of one node, batched (at most 50 ms or 512 flows)."""

    node: str
    flows: list[Flow]
    lost: int = 0  # events the ring buffer could not take since the previous batch


class FQDNAddress(Message, gc=False):
    """An address a name resolved to, as long as it is allowed: until ``expires`` (unix time,
    the answer's TTL, at least the proxy's minimum), then ``grace`` seconds more."""

    ip: str
    expires: float
    grace: float = 0.0


class FQDNName(Message):
    name: str  # lowercase, no trailing dot
    addresses: list[FQDNAddress] = []


class FQDNCache(Message):
    """What one endpoint resolved through its node's DNS proxy (``fqdn`` bucket, key
    ``<node>.<endpoint ip>``): the names toFQDNs rules select addresses by."""

    node: str
    ip: str
    identity: int = 0
    endpoint: str = ""  # namespace/pod when the proxy knows it
    names: list[FQDNName] = []


class FQDNCleanRequest(Message):
    """``fqdn cache clean``: forget learned names (all, or those matching ``pattern``)."""

    pattern: str = ""  # a matchPattern; "" = every name
    endpoint_ip: str = ""  # "" = every endpoint of the node


class FQDNCleanReply(Message):
    node: str
    removed: int  # (endpoint, name) pairs removed


# --- policy service ----------------------------------------------------------------------------


class PolicyApplyRequest(Message):
    """Policy documents (decoded YAML) to validate and store; all or nothing."""

    documents: list[dict[str, Any]]
    source: str = "-"  # names the input in error messages (a file path, or "-")
    audit: bool = False  # apply every document in audit mode (`apply --audit`)
    dry_run: bool = False  # validate only: `membrane apply` checks before it changes anything


class PolicyApplyReply(Message):
    results: list[str]  # "CiliumNetworkPolicy/default/rule1 created|configured|unchanged"
    warnings: list[str] = []
    l7_at_l4: list[str] = []  # policies with L7 rules (name kept for the wire)


class PolicyRef(Message):
    name: str
    namespace: str = ""  # "" with kind "" also finds a cluster-wide policy
    kind: str = ""  # "" = whichever kind has that name


class PolicySummary(Message):
    kind: str
    namespace: str
    name: str
    rules: int
    audit: bool = False
    subjects: int = 0  # identities it selects right now


class PolicyListReply(Message):
    policies: list[PolicySummary]


class PolicyDeleteReply(Message):
    deleted: list[str]


class PolicyDocument(Message):
    kind: str
    namespace: str
    name: str
    document: dict[str, Any]


class ExplainRequest(Message):
    src_identity: int
    dst_identity: int
    protocol: int
    port: int
    src_ports: list[ContainerPort] = []
    dst_ports: list[ContainerPort] = []
    # the pods' addresses, for rules that match pod addresses (ipBlock); "": identity only
    src_ip: str = ""
    dst_ip: str = ""


class ExplainReply(Message):
    allowed: bool
    lines: list[str]


# --- services (lb) ----------------------------------------------------------------------------


class LBBackend(Message):
    """One backend of a frontend; ``id`` is stable and unique cluster-wide."""

    id: int
    ip: str
    port: int
    terminating: bool = False  # keeps its connections, gets no new ones


class LBFrontend(Message):
    """An address clients connect to, with its own id (the reverse-NAT index)."""

    id: int
    ip: str
    port: int
    protocol: str  # TCP | UDP | SCTP
    backends: list[LBBackend] = []
    node_port: bool = False  # ip is 0.0.0.0: every node's underlay address


class LBService(Message):
    """A ``services`` bucket value (key ``<namespace>.<name>``)."""

    namespace: str
    name: str
    frontends: list[LBFrontend]
    algorithm: str = "maglev"  # maglev | random
    maglev_seed: int = 0
    maglev_size: int = 16381
    affinity_timeout: int = 0  # seconds of ClientIP session affinity; 0 = none
    revision: int = 0
    source: str = "api"  # api | kubernetes


class LBApplyRequest(Message):
    documents: list[dict[str, Any]]
    source: str = "-"
    dry_run: bool = False
    # more documents, each part a JSON array of them, after ``documents``: ``membrane apply -f``
    # of a large file sends each part with a dry run while it reads the rest, then names every
    # part by its digest (``part_digests``) in the request that applies them, or sends the same
    # bytes again when that replica did not keep them; a replica that checked a part reuses its
    # parse (docs/lb.md, "Bulk applies")
    parts: list[msgspec.Raw] = []
    first: int = 1  # the number of the request's first document in the whole apply: messages
    # more parts after ``parts``, each named by the SHA-256 (hex) of its bytes instead of sent:
    # parts this replica checked with a dry run and still keeps. One it does not keep fails the
    # request with not_found (field "part_digests"), nothing changed; the sender then sends the
    # bytes (docs/lb.md, "Bulk applies")
    part_digests: list[str] = []


def part_digest(part: bytes) -> str:
    """The name of a part's bytes in ``LBApplyRequest.part_digests``: SHA-256, hex."""
    return hashlib.sha256(part).hexdigest()


class LBApplyReply(Message):
    results: list[str]


class LBCreateRequest(Message):
    """API mode: frontends "IP:PORT/PROTO" and backends "IP:PORT" given directly."""

    name: str
    namespace: str = "default"
    frontends: list[str] = []
    backends: list[str] = []
    affinity_timeout: int = 0


class LBServiceRef(Message):
    name: str
    namespace: str = "default"


class LBListReply(Message):
    services: list[LBService]


class LBDeleteReply(Message):
    deleted: list[str]


class PeerHealth(Message):
    """One node's view of another: the latest probe of each kind (milliseconds, or None when
    it got no answer within the timeout)."""

    node: str
    icmp_ms: float | None = None  # echo to the node's underlay address
    http_ms: float | None = None  # GET from this node's health endpoint to the peer's
    reachable: bool = False  # the HTTP probe, through the datapath, answered
    alive: bool = True  # the failure detector's verdict (``liveness``)
    failures: int = 0  # consecutive rounds without an HTTP answer


class NodeHealth(Message):
    """A round of health probes by one node (``membrane.health.<node>``, ``health`` bucket)."""

    node: str
    timestamp: float
    interval: float
    peers: list[PeerHealth] = msgspec.field(default_factory=list)
