"""Every NATS subject, queue group and KV bucket name membrane uses; no string subject elsewhere."""

from ipaddress import IPv4Address, IPv4Network
from typing import Final

PREFIX: Final = "membrane"

# identity service: request/reply on a queue group so replicas share the load
IDENTITY_SERVICE: Final = "membrane-identity"
IDENTITY_QUEUE: Final = "membrane-identity"
IDENTITY_ALLOCATE: Final = "membrane.identity.allocate"
IDENTITY_RELEASE: Final = "membrane.identity.release"
IDENTITY_GET: Final = "membrane.identity.get"
IDENTITY_LIST: Final = "membrane.identity.list"
IDENTITY_HEARTBEAT: Final = "membrane.identity.heartbeat"

# cluster-pool IPAM (served by the identity service, which owns allocation state in Redis)
# a node asks for its pod CIDR on IPAM_ALLOCATE.<node token> (ipam_allocate()): the bus lets an
# agent publish only under its own node's token, so no agent can take pool space for another
IPAM_ALLOCATE: Final = "membrane.ipam.allocate"
IPAM_RELEASE: Final = "membrane.ipam.release"
IPAM_LIST: Final = "membrane.ipam.list"

# policy service: request/reply on a queue group
POLICY_SERVICE: Final = "membrane-policy"
POLICY_QUEUE: Final = "membrane-policy"
POLICY_APPLY: Final = "membrane.policy.apply"
POLICY_DELETE: Final = "membrane.policy.delete"
POLICY_LIST: Final = "membrane.policy.list"
POLICY_GET: Final = "membrane.policy.get"
POLICY_EXPLAIN: Final = "membrane.policy.explain"
# recorded flows replayed against today's policies and a candidate set (policy diff, suggest)
POLICY_DIFF: Final = "membrane.policy.diff"

# datapath agents (one per node) register as a micro service for discovery and status
DATAPATH_SERVICE: Final = "membrane-datapath"
PROXY_SERVICE: Final = "membrane-proxy"  # the per-node L7 proxy (NATS micro: status only)

# JetStream KV buckets
KV_IDENTITIES: Final = "identities"
KV_NODES: Final = "nodes"
KV_IPCACHE: Final = "ipcache"
KV_ENDPOINTS: Final = "endpoints"
KV_POLICIES: Final = "policies"
KV_RESOLVED: Final = "resolved"
KV_SELECTORS: Final = "selectors"
KV_SERVICES: Final = "services"
KV_NAMESPACES: Final = "namespaces"
KV_PODS: Final = "pods"  # namespace.pod -> the pod's labels from the Kubernetes API
# node -> its latest NodeHealth (probes of every other node)
KV_HEALTH: Final = "health"
# <node>.<endpoint ip> -> FQDNCache: the names an endpoint resolved through the DNS proxy
KV_FQDN: Final = "fqdn"
# <node token> -> NodeLiveness: alive or dead as the failure detector (the identity service)
# judges from the nodes' heartbeats; written when that changes, not on every heartbeat
KV_LIVENESS: Final = "liveness"
# <node token> -> PodCIDR: the pod CIDR cluster-pool IPAM gave each node; the identity service
# alone writes it, so readers judge the agents' ipcache entries against it (ipcache_guard.py)
KV_POD_CIDRS: Final = "pod-cidrs"
# request/reply to one node's DNS proxy: FQDN_CLEAN.<node> (fqdn cache clean)
FQDN_CLEAN: Final = "membrane.fqdn.clean"


def fqdn_clean(node: str) -> str:
    return f"{FQDN_CLEAN}.{node}"


# datapath agents publish batched flows on FLOWS_PREFIX.<node>
FLOWS_PREFIX: Final = "membrane.flows"
FLOWS_ALL: Final = "membrane.flows.*"


def flows(node: str) -> str:
    return f"{FLOWS_PREFIX}.{node}"


# a node's liveness: its agent publishes NodeHeartbeat on NODE_HEARTBEAT.<node token>
# (node_heartbeat()) every few seconds; only the failure detector (the identity service)
# subscribes, and writes the verdicts to KV_LIVENESS. Not the watched ``nodes`` bucket: every
# agent follows that one, so N heartbeats there cost N^2 deliveries
NODE_HEARTBEAT: Final = "membrane.nodes.heartbeat"
NODE_HEARTBEAT_ALL: Final = "membrane.nodes.heartbeat.*"

# datapath agents publish each round of node health probes on HEALTH_PREFIX.<node>
HEALTH_PREFIX: Final = "membrane.health"
HEALTH_ALL: Final = "membrane.health.*"


def health(node: str) -> str:
    return f"{HEALTH_PREFIX}.{node}"


# NATS micro discovery (the protocol's own subjects, used by `membrane status`)
MICRO_PING: Final = "$SRV.PING"
MICRO_INFO: Final = "$SRV.INFO"
MICRO_STATS: Final = "$SRV.STATS"

# monitor service: every replica holds the flows of its share of the batches, so queries go to
# each replica (per-replica subjects, found by discovery); history of drops/audits is one
# JetStream stream, read by whichever replica takes the request
MONITOR_SERVICE: Final = "membrane-monitor"
MONITOR_QUEUE: Final = "membrane-monitor"
MONITOR_QUERY_PREFIX: Final = "membrane.monitor.query"
MONITOR_STATUS_PREFIX: Final = "membrane.monitor.status"
MONITOR_HISTORY: Final = "membrane.monitor.history"
# the same flows counted by connection kind (shared.flow_groups): per replica, and of the history
MONITOR_GROUPS_PREFIX: Final = "membrane.monitor.groups"
MONITOR_HISTORY_GROUPS: Final = "membrane.monitor.history-groups"
# the web UI (its URL in its NATS micro metadata, `url`)
UI_SERVICE: Final = "membrane-ui"
# events for anyone (the subscriber role reads these)
EVENTS_ALL: Final = "membrane.events.>"
# enriched flows for anyone: membrane.events.flows.<verdict>.<namespace>
EVENTS_FLOWS_PREFIX: Final = "membrane.events.flows"
EVENTS_FLOWS_ALL: Final = "membrane.events.flows.>"
# the same flows in batches of JSON lines (shared.flow_api):
# membrane.events.flowbatches.<verdict>.<namespace>
EVENTS_FLOW_BATCHES_PREFIX: Final = "membrane.events.flowbatches"
EVENTS_FLOW_BATCHES_ALL: Final = "membrane.events.flowbatches.>"
# the namespace token of flows whose source and destination are no pod
NO_NAMESPACE: Final = "_"
# JetStream stream keeping DROPPED and AUDIT enriched flows for history queries
STREAM_FLOW_HISTORY: Final = "MEMBRANE_FLOW_HISTORY"


def monitor_query(replica: str) -> str:
    return f"{MONITOR_QUERY_PREFIX}.{replica}"


def monitor_groups(replica: str) -> str:
    return f"{MONITOR_GROUPS_PREFIX}.{replica}"


def monitor_status(replica: str) -> str:
    return f"{MONITOR_STATUS_PREFIX}.{replica}"


def event_flows(verdict: str, namespace: str) -> str:
    """The subject of an enriched flow; NATS tokens cannot be empty or hold dots."""
    token = namespace.replace(".", "_") if namespace else NO_NAMESPACE
    return f"{EVENTS_FLOWS_PREFIX}.{verdict}.{token}"


def event_flow_batches(verdict: str, namespace: str) -> str:
    """The subject of a batch of enriched flows of one verdict and namespace."""
    token = namespace.replace(".", "_") if namespace else NO_NAMESPACE
    return f"{EVENTS_FLOW_BATCHES_PREFIX}.{verdict}.{token}"


# lb service: Services, EndpointSlices and API-driven frontends -> the `services` bucket
LB_SERVICE: Final = "membrane-lb"
LB_QUEUE: Final = "membrane-lb"
LB_APPLY: Final = "membrane.lb.apply"
LB_CREATE: Final = "membrane.lb.create"
LB_DELETE: Final = "membrane.lb.delete"
LB_LIST: Final = "membrane.lb.list"
LB_GET: Final = "membrane.lb.get"
# the lb service's own record of what was applied (Service specs, EndpointSlices)
KV_LB_SPECS: Final = "lb-specs"
LB_DELETE_SLICE: Final = "membrane.lb.delete-slice"


# --- KV keys: every writer and reader of a bucket spells its keys with these -------------------
#
# What an agent writes (``endpoints``, ``ipcache``) is keyed under its node's token first, so
# that nats-server can let each agent write its own node's keys and no other
# (``$KV.<bucket>.<node token>.>``, shared/roles.py). Readers take the keys as opaque names and
# read node, namespace and name from the values; only the builders below know the layout.

# ``ipcache`` entries the policy service writes (its rules' CIDR identities): a first token no
# node can have (node names are DNS-1123 subdomains: no '_')
POLICY_IPCACHE_OWNER: Final = "_policy"


def node_token(node: str) -> str:
    """A node's name as one subject token: DNS-1123 node names may hold dots (FQDNs), never
    '_', so the mapping is one to one."""
    return node.replace(".", "_")


def for_node(subject: str, node: str) -> str:
    """``subject`` as ``node`` (only) calls it: the bus lets an agent publish only under its
    own node's token, and the service checks the request names that node (its ``owner`` or
    ``node``), so no agent can act in another node's name. The CLI (admin) keeps ``subject``."""
    return f"{subject}.{node_token(node)}"


def ipam_allocate(node: str) -> str:
    """The subject on which ``node`` (only) asks cluster-pool IPAM for its pod CIDR."""
    return for_node(IPAM_ALLOCATE, node)


def node_heartbeat(node: str) -> str:
    """The subject on which ``node`` (only) says it is alive."""
    return for_node(NODE_HEARTBEAT, node)


def node_of_token(token: str) -> str:
    """A node's name from its subject token (``node_token`` undone: names hold no '_')."""
    return token.replace("_", ".")


def node_keys(node: str) -> str:
    """The key filter of every ``endpoints`` / ``ipcache`` key of one node."""
    return f"{node_token(node)}.>"


def pod_key(namespace: str, name: str) -> str:
    """``pods`` (the Kubernetes API's pods), and a pod's name wherever one node indexes pods."""
    return f"{namespace}.{name}"


def endpoint_key(node: str, namespace: str, name: str) -> str:
    """``endpoints``: one pod, under the node that hosts it."""
    return f"{node_token(node)}.{namespace}.{name}"


def pod_endpoint_keys(namespace: str, name: str) -> str:
    """The key filter of a pod's ``endpoints`` entries on any node (one, while it exists).
    Namespaces are DNS labels (no dots), so ``*.<namespace>.<name>`` names one pod."""
    return f"*.{pod_key(namespace, name)}"


def service_key(namespace: str, name: str) -> str:
    """``services``: one Service (or API-driven service) record."""
    return f"{namespace}.{name}"


def policy_key(kind: str, namespace: str, name: str) -> str:
    """``policies``: kind, namespace and name (a CNP and a NetworkPolicy may share the rest)."""
    return f"{kind}/{namespace}/{name}"


def ipcache_key(prefix: IPv4Address | IPv4Network, node: str = "") -> str:
    """``ipcache``: a pod's or node's address under the node that wrote it; without a node,
    a CIDR of the policies' rules (the policy service's own keys)."""
    owner = node_token(node) if node else POLICY_IPCACHE_OWNER
    return f"{owner}.{prefix}"


def ipcache_key_owner(key: str) -> str:
    """Who wrote an ``ipcache`` key: a node's token, or ``POLICY_IPCACHE_OWNER``."""
    return key.split(".", 1)[0]


def pod_cidr_key(node: str) -> str:
    """``pod-cidrs``: a node's pod CIDR, under its token (the first token of its
    ``ipcache`` keys)."""
    return node_token(node)


def identity_key(identity: int) -> str:
    """``identities`` and ``resolved``: the identity's number."""
    return str(identity)


def selector_key(peer_set: int) -> str:
    """``selectors``: the peer set's id."""
    return str(peer_set)


def fqdn_key(node: str, endpoint_ip: str) -> str:
    """``fqdn``: one endpoint's DNS cache, written by its node's proxy (under its node's
    token, as ``endpoints`` and ``ipcache``)."""
    return f"{node_token(node)}.{endpoint_ip}"


# the Kubernetes bridge: API objects in, the apply paths out; one leader (a Lease) writes
K8S_SERVICE: Final = "membrane-k8s"
K8S_QUEUE: Final = "membrane-k8s"
K8S_STATUS: Final = "membrane.k8s.status"
