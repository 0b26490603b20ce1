"""Every NATS subject, queue group and KV bucket name membrane uses; no string subject elsewhere."""

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

# datapath agents (one per node) register as a micro service for discovery and status
DATAPATH_SERVICE: Final = "membrane-datapath"

# JetStream KV buckets
KV_IDENTITIES: Final = "identities"
KV_NODES: Final = "nodes"
KV_IPCACHE: Final = "ipcache"
KV_ENDPOINTS: Final = "endpoints"
KV_POLICIES: Final = "policies"
KV_RESOLVED: Final = "resolved"
KV_SERVICES: Final = "services"
KV_NAMESPACES: Final = "namespaces"
# node -> its latest NodeHealth (probes of every other node)
KV_HEALTH: Final = "health"

# datapath agents publish batched flows on FLOWS_PREFIX.<node>
FLOWS_PREFIX: Final = "membrane.flows"
FLOWS_ALL: Final = "membrane.flows.*"


def flows(node: str) -> str:
    return f"{FLOWS_PREFIX}.{node}"


# datapath agents publish each round of node health probes on HEALTH_PREFIX.<node>
HEALTH_PREFIX: Final = "membrane.health"
HEALTH_ALL: Final = "membrane.health.*"


def health(node: str) -> str:
    return f"{HEALTH_PREFIX}.{node}"


# NATS micro discovery (the protocol's own subjects, used by `membrane status`)
MICRO_PING: Final = "$SRV.PING"
MICRO_INFO: Final = "$SRV.INFO"
MICRO_STATS: Final = "$SRV.STATS"
