"""Flows counted by connection kind: source workload -> destination workload:port, verdict.

One aggregation for everyone who needs flows by the thousand rather than one by one: the
monitor answers ``membrane.monitor.groups.<replica>`` with it (so 100,000 flows cross the bus
as a few hundred groups), ``membrane policy diff`` and ``policy suggest`` replay the groups
through the policy service, and the UI's service map draws them as edges.

A workload is what Hubble UI draws as a box: a pod's namespace and app label
(``app.kubernetes.io/name``, ``k8s-app``, ``app``, ``name``), or its name without the
replica suffix a Deployment or StatefulSet adds; a reserved identity by its name (``world``,
``host``); a CIDR identity by its address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from shared import identities
from shared.flow_api import EnrichedFlow, FlowGroup, FlowPeer
from shared.reasons import POLICY_DENIED, POLICY_DENY

APP_LABELS = ("app.kubernetes.io/name", "k8s-app", "app", "name")
# Deployment pods: <name>-<template hash>-<5 chars>; StatefulSet and numbered pods: <name>-<n>
_REPLICA_SUFFIX = re.compile(r"(-[a-z0-9]{6,10})?-[a-z0-9]{5}$|-\d+$")
POLICY_REASONS = frozenset({POLICY_DENIED, POLICY_DENY})

GroupKey = tuple[str, str, int, int, str, str, str, int, str, int]
ConnectionKey = tuple[str, int, str, int, str]
CONNECTION_S = 10.0
VERDICT_RANK = {"FORWARDED": 0, "AUDIT": 1, "DROPPED": 2}


def workload(peer: FlowPeer) -> str:
    """The box a peer belongs to on the service map."""
    if peer.pod:
        for key in APP_LABELS:
            value = _label(peer.labels, key)
            if value:
                return f"{peer.namespace}/{value}"
        return f"{peer.namespace}/{_REPLICA_SUFFIX.sub('', peer.pod) or peer.pod}"
    if is_pod_identity(peer.identity):
        return f"identity {peer.identity}"  # a pod the monitor does not know (any more)
    name = identities.BY_ID.get(peer.identity)
    if name and peer.identity != identities.WORLD:
        return name
    return peer.ip or name or f"identity {peer.identity}"


def is_pod_identity(identity: int) -> bool:
    return identities.CLUSTER_MIN <= identity < identities.LOCAL_BASE


def _label(labels: Iterable[str], key: str) -> str:
    prefix = f"k8s:{key}="
    for label in labels:
        if label.startswith(prefix):
            return label[len(prefix) :]
    return ""


def is_connection(flow: EnrichedFlow) -> bool:
    """A flow policy decided: a new connection forwarded or audited, or dropped by policy (not
    a reply, which conntrack lets through, nor a drop for another reason such as no backend)."""
    if flow.is_reply or flow.type == "l7":  # an HTTP request rides on a connection counted once
        return False
    if flow.verdict == "DROPPED":
        return flow.drop_reason in POLICY_REASONS
    return flow.verdict in ("FORWARDED", "AUDIT")


def connection_key(flow: EnrichedFlow) -> ConnectionKey:
    s, d = flow.source, flow.destination
    return (s.ip, s.port, d.ip, d.port, flow.protocol)


def outranks(flow: EnrichedFlow, other: EnrichedFlow) -> bool:
    """Of two events of one connection, whether ``flow`` tells its outcome better: a drop beats
    an audit beats forwarded, and a policy's verdict beats a forwarding trace."""
    return (VERDICT_RANK.get(flow.verdict, 0), bool(flow.policy)) > (
        VERDICT_RANK.get(other.verdict, 0),
        bool(other.policy),
    )


def connections(flows: Iterable[EnrichedFlow]) -> list[EnrichedFlow]:
    """One event per connection attempt. A connection leaves an event at each observation point
    (a trace where it leaves its pod, one where it enters the overlay, a policy verdict or a drop
    where it arrives) and a dropped SYN is sent again: the events of one 5-tuple within
    ``CONNECTION_S`` are one connection, told by the event with its outcome (:func:`outranks`)."""
    current: dict[ConnectionKey, EnrichedFlow] = {}
    done: list[EnrichedFlow] = []
    for flow in flows:
        if not is_connection(flow):
            continue
        key = connection_key(flow)
        seen = current.get(key)
        if seen is None:
            current[key] = flow
        elif abs(flow.time - seen.time) > CONNECTION_S:  # the port used again: a new one
            done.append(seen)
            current[key] = flow
        elif outranks(flow, seen):
            current[key] = flow
    done.extend(current.values())
    return done


def group_key(flow: EnrichedFlow, names: dict[tuple[str, str, int, str], str]) -> GroupKey:
    """``names``: workloads already worked out, by (namespace, pod, identity, address)."""
    s, d = flow.source, flow.destination
    return (
        _workload_memo(s, names),
        _workload_memo(d, names),
        s.identity,
        d.identity,
        "" if s.pod else s.ip,
        "" if d.pod else d.ip,
        flow.protocol,
        d.port,
        flow.verdict,
        flow.drop_reason,
    )


def _workload_memo(peer: FlowPeer, names: dict[tuple[str, str, int, str], str]) -> str:
    key = (peer.namespace, peer.pod, peer.identity, "" if peer.pod else peer.ip)
    found = names.get(key)
    if found is None:
        found = names[key] = workload(peer)
    return found


def group(flows: Iterable[EnrichedFlow]) -> list[FlowGroup]:
    """Counts the connections (:func:`connections`) by :func:`group_key`."""
    found: dict[GroupKey, FlowGroup] = {}
    names: dict[tuple[str, str, int, str], str] = {}
    for flow in connections(flows):
        key = group_key(flow, names)
        entry = found.get(key)
        if entry is None:
            found[key] = FlowGroup(
                source=key[0],
                destination=key[1],
                src_identity=key[2],
                dst_identity=key[3],
                src_ip=key[4],
                dst_ip=key[5],
                protocol=key[6],
                port=key[7],
                verdict=key[8],
                drop_reason=key[9],
                policy=flow.policy,
                count=1,
                first=flow.time,
                last=flow.time,
            )
            continue
        entry.count += 1
        if flow.time < entry.first:
            entry.first = flow.time
        elif flow.time > entry.last:
            entry.last = flow.time
            entry.policy = flow.policy or entry.policy
    return list(found.values())


def merge(groups: Iterable[FlowGroup]) -> list[FlowGroup]:
    """Groups of several replicas (and the history stream) as one list."""
    found: dict[GroupKey, FlowGroup] = {}
    for g in groups:
        key = (
            g.source,
            g.destination,
            g.src_identity,
            g.dst_identity,
            g.src_ip,
            g.dst_ip,
            g.protocol,
            g.port,
            g.verdict,
            g.drop_reason,
        )
        entry = found.get(key)
        if entry is None:
            found[key] = msgspec.structs.replace(g)
            continue
        entry.count += g.count
        if g.last > entry.last:
            entry.policy = g.policy or entry.policy
        entry.first = min(entry.first, g.first)
        entry.last = max(entry.last, g.last)
    return sorted(found.values(), key=lambda g: (g.source, g.destination, g.port, g.verdict))
