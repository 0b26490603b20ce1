"""Who may do what on the bus: one NATS user per role, with publish/subscribe permissions.

A credential that leaks gives no more than its role: a monitor, an agent or a dashboard cannot
change policy, allocate identities or rewrite another node's records. Permissions are subject
patterns (nats-server ``permissions``); a KV bucket ``B`` is the stream ``KV_B``, written by
publishing on ``$KV.B.<key>`` and read through the JetStream API subjects below. A role that serves
requests may publish to ``_INBOX.>`` (the requesters' inboxes; see ``Permissions.render`` for why
not ``allow_responses``); each user's own replies arrive on its own inbox prefix,
``_INBOX.<user>``, so no role can read another's replies. The table is in docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared import subjects
from shared.errors import InvalidArgument

INBOX: str = "_INBOX"
# the user names nats-server sees: letters, digits, '-' and '_' (they become a subject token)
USER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# every bucket the services use
ALL_BUCKETS = (
    subjects.KV_IDENTITIES,
    subjects.KV_NODES,
    subjects.KV_LIVENESS,
    subjects.KV_HEALTH,
    subjects.KV_IPCACHE,
    subjects.KV_ENDPOINTS,
    subjects.KV_NAMESPACES,
    subjects.KV_PODS,
    subjects.KV_POLICIES,
    subjects.KV_RESOLVED,
    subjects.KV_SELECTORS,
    subjects.KV_SERVICES,
    subjects.KV_LB_SPECS,
    subjects.KV_FQDN,
    subjects.KV_POD_CIDRS,
)


def inbox_prefix(user: str) -> str:
    return f"{INBOX}.{user}"


def stream_read(stream: str) -> list[str]:
    """Bind to a stream (creating it when missing), follow it with an ordered consumer, read
    single messages; no purge, no message delete, no update."""
    api = "$JS.API"
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"$JS.FC.{stream}.>",  # flow-control answers of push consumers
    ]


def kv_read(*buckets: str) -> list[str]:
    return [s for bucket in buckets for s in stream_read(f"KV_{bucket}")]


def kv_write(bucket: str, key: str = ">") -> str:
    """Put, delete and purge ``key`` (``>``: every key) of ``bucket``."""
    return f"$KV.{bucket}.{key}"


def micro() -> list[str]:
    """Subscriptions of a NATS micro service (discovery: $SRV.PING/INFO/STATS)."""
    return [f"{subjects.MICRO_INFO.split('.')[0]}.>"]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False  # may answer requests (services): publish to any inbox

    def render(self, user: str) -> dict[str, Any]:
        """The ``permissions`` block of a nats-server user."""
        block: dict[str, Any] = {
            "publish": {"allow": sorted({"$JS.API.INFO", *self.publish})},
            "subscribe": {"allow": sorted({f"{inbox_prefix(user)}.>", *self.subscribe})},
        }
        if self.responses:
            # not ``allow_responses``: with it, nats-server records the reply subject of every
            # message delivered to the user, a watch's JetStream deliveries too ($JS.ACK...,
            # never answered with AckNone), and past 4,096 of them scans the whole record on
            # each delivery, inside the stream's send loop: a role following a bucket of
            # 20,000 keys stalled the stream and every publish ack on it timed out
            block["publish"]["allow"].append(f"{INBOX}.>")
        return block


ADMIN = Permissions(publish=(">",), subscribe=(">",), responses=True)


def _service(
    serve: Iterable[str] = (),
    *,
    read: Iterable[str] = (),
    write: Iterable[str] = (),
    request: Iterable[str] = (),
    publish: Iterable[str] = (),
    subscribe: Iterable[str] = (),
) -> Permissions:
    return Permissions(
        publish=(*kv_read(*read), *write, *request, *publish),
        subscribe=(*serve, *micro(), *subscribe),
        responses=True,
    )


IDENTITY = _service(
    # the failure detector: the nodes' heartbeats (subjects.NODE_HEARTBEAT)
    ["membrane.identity.>", "membrane.ipam.>", subjects.NODE_HEARTBEAT_ALL],
    read=[
        subjects.KV_IDENTITIES,
        subjects.KV_NODES,
        subjects.KV_LIVENESS,
        subjects.KV_ENDPOINTS,
        subjects.KV_IPCACHE,
        subjects.KV_POD_CIDRS,
    ],
    # a dead node's pods are released by the identity service (services/identity/nodes.py);
    # the pod CIDRs it allocates are the authority every ipcache reader judges entries by
    write=[
        kv_write(subjects.KV_IDENTITIES),
        kv_write(subjects.KV_ENDPOINTS),
        kv_write(subjects.KV_IPCACHE),
        kv_write(subjects.KV_POD_CIDRS),
        kv_write(subjects.KV_LIVENESS),
    ],
)
POLICY = _service(
    ["membrane.policy.>"],
    read=[
        subjects.KV_POLICIES,
        subjects.KV_RESOLVED,
        subjects.KV_SELECTORS,
        subjects.KV_IPCACHE,
        subjects.KV_IDENTITIES,
        subjects.KV_NAMESPACES,
        subjects.KV_FQDN,  # the addresses toFQDNs selectors select
    ],
    # CIDR identities of the policies' rules go into ipcache, under keys of its own
    write=[
        kv_write(subjects.KV_POLICIES),
        kv_write(subjects.KV_RESOLVED),
        kv_write(subjects.KV_SELECTORS),
        kv_write(subjects.KV_IPCACHE, f"{subjects.POLICY_IPCACHE_OWNER}.>"),
    ],
)
LB = _service(
    ["membrane.lb.>"],
    read=[
        subjects.KV_LB_SPECS,
        subjects.KV_SERVICES,
        subjects.KV_ENDPOINTS,
        subjects.KV_NAMESPACES,
    ],
    write=[kv_write(subjects.KV_LB_SPECS), kv_write(subjects.KV_SERVICES)],
)
MONITOR = Permissions(
    publish=(
        *kv_read(*ALL_BUCKETS),
        *stream_read(subjects.STREAM_FLOW_HISTORY),
        f"$JS.API.STREAM.UPDATE.{subjects.STREAM_FLOW_HISTORY}",  # its limits
        f"{subjects.EVENTS_FLOWS_PREFIX}.>",  # enriched flows, one per message (opt-in)
        f"{subjects.EVENTS_FLOW_BATCHES_PREFIX}.>",  # in batches (and the history stream)
    ),
    subscribe=(
        "membrane.monitor.>",
        subjects.FLOWS_ALL,
        subjects.HEALTH_ALL,
        *micro(),
    ),
    responses=True,
)
# read-only for external systems: enriched flows and the monitor's query endpoints
SUBSCRIBER = Permissions(
    publish=(
        f"{subjects.MONITOR_QUERY_PREFIX}.*",
        f"{subjects.MONITOR_STATUS_PREFIX}.*",
        f"{subjects.MONITOR_GROUPS_PREFIX}.*",
        subjects.MONITOR_HISTORY,
        subjects.MONITOR_HISTORY_GROUPS,
        f"{subjects.MICRO_INFO}.{subjects.MONITOR_SERVICE}",  # to find the monitor replicas
        f"{subjects.MICRO_PING}.{subjects.MONITOR_SERVICE}",
    ),
    subscribe=(subjects.EVENTS_ALL,),
)
# the web UI: what a subscriber sees, and the nodes, their health and the pods to draw them
UI = Permissions(
    publish=(
        *SUBSCRIBER.publish,
        *kv_read(
            subjects.KV_ENDPOINTS, subjects.KV_NODES, subjects.KV_LIVENESS, subjects.KV_HEALTH
        ),
    ),
    subscribe=(*SUBSCRIBER.subscribe, *micro()),
    responses=True,
)
# the Kubernetes bridge: what the CLI's apply paths need (documents to policy and lb,
# namespaces; pods go to the agents' sockets, not over the bus)
K8S_BRIDGE = _service(
    ["membrane.k8s.>"],
    read=[
        subjects.KV_NAMESPACES,
        subjects.KV_PODS,
        subjects.KV_ENDPOINTS,
        subjects.KV_NODES,
        subjects.KV_LIVENESS,
        subjects.KV_POLICIES,
        subjects.KV_SERVICES,
    ],
    # pods' labels from the Kubernetes API (the agents wire them), namespaces' labels
    write=[kv_write(subjects.KV_NAMESPACES), kv_write(subjects.KV_PODS)],
    request=["membrane.policy.>", "membrane.lb.>", f"{subjects.MICRO_INFO}.>"],
)


def datapath(node: str) -> Permissions:
    """A node's agent: its node's own records in ``nodes`` and ``health``, its node's keys in
    ``endpoints`` and ``ipcache`` (``subjects.node_keys``), its own flow and health subjects.
    Namespaces it only reads (one it uses before it is declared has implicit labels). It asks
    cluster-pool IPAM for its pod CIDR, but may not release one: a released CIDR is handed to
    the next node that asks, and the pod CIDRs are what readers believe its entries by
    (shared/ipcache_guard.py)."""
    return _service(
        read=[
            subjects.KV_NODES,
            subjects.KV_LIVENESS,
            subjects.KV_HEALTH,
            subjects.KV_ENDPOINTS,
            subjects.KV_IPCACHE,
            subjects.KV_POD_CIDRS,
            subjects.KV_RESOLVED,
            subjects.KV_SELECTORS,
            subjects.KV_NAMESPACES,
            subjects.KV_PODS,
            subjects.KV_SERVICES,
            subjects.KV_IDENTITIES,
        ],
        write=[
            kv_write(subjects.KV_NODES, node),
            kv_write(subjects.KV_HEALTH, node),
            kv_write(subjects.KV_ENDPOINTS, subjects.node_keys(node)),
            kv_write(subjects.KV_IPCACHE, subjects.node_keys(node)),
        ],
        request=[
            # in its own node's name only (subjects.for_node)
            subjects.for_node(subjects.IDENTITY_ALLOCATE, node),
            subjects.for_node(subjects.IDENTITY_RELEASE, node),
            subjects.for_node(subjects.IDENTITY_HEARTBEAT, node),
            subjects.ipam_allocate(node),
        ],
        publish=[subjects.flows(node), subjects.health(node), subjects.node_heartbeat(node)],
    )


def proxy(node: str) -> Permissions:
    """A node's L7 proxy: reads what its verdicts need, publishes its flows as its node, writes
    the DNS caches of its node's endpoints only."""
    return _service(
        [subjects.fqdn_clean(node)],
        read=[
            subjects.KV_IPCACHE,
            subjects.KV_POD_CIDRS,
            subjects.KV_RESOLVED,
            subjects.KV_SELECTORS,
            subjects.KV_IDENTITIES,
            subjects.KV_ENDPOINTS,
            subjects.KV_FQDN,
        ],
        write=[kv_write(subjects.KV_FQDN, subjects.node_keys(node))],
        publish=[subjects.flows(node)],
    )


SERVICE_ROLES = {
    "identity": IDENTITY,
    "policy": POLICY,
    "lb": LB,
    "monitor": MONITOR,
    "ui": UI,
    "k8s-bridge": K8S_BRIDGE,
}
PER_NODE_ROLES = {"datapath": datapath, "proxy": proxy}
ROLES = ("admin", "subscriber", *SERVICE_ROLES, *PER_NODE_ROLES)


# a service of the registry (membrane/registry.py) whose name is not its role's
SERVICE_ROLE_NAMES = {"k8s": "k8s-bridge", "bridge": "k8s-bridge", "l7": "proxy"}


def role_of_service(service: str) -> str:
    """The role a service runs as. A service without a role is refused rather than run as
    admin: give it one here (and a row in docs/security.md) when adding it."""
    role = SERVICE_ROLE_NAMES.get(service, service)
    if role in SERVICE_ROLES or role in PER_NODE_ROLES:
        return role
    raise InvalidArgument(
        f"service {service!r} has no NATS role: give it one in shared/roles.py "
        "(SERVICE_ROLES or PER_NODE_ROLES); services never run as admin",
        field="service",
    )


def permissions(role: str, node: str = "") -> Permissions:
    if role == "admin":
        return ADMIN
    if role == "subscriber":
        return SUBSCRIBER
    if role in SERVICE_ROLES:
        return SERVICE_ROLES[role]
    if role in PER_NODE_ROLES:
        if not node:
            raise InvalidArgument(f"role {role} is per node: give the node", field="node")
        return PER_NODE_ROLES[role](node)
    raise InvalidArgument(f"unknown role {role!r}; roles: {', '.join(ROLES)}", field="role")


def check_user_name(name: str) -> str:
    if not USER_RE.match(name):
        raise InvalidArgument(
            f"credential name {name!r}: 1-63 lowercase letters, digits, '-' or '_'", field="name"
        )
    return name
