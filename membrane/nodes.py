"""The local cluster's nodes: network namespaces on an underlay bridge in the root namespace.

Addresses: the bridge holds the first address of the underlay CIDR (NATS listens there, so the
agents inside the node namespaces reach it), node i gets the (10+i)th. The root namespace
blackholes the pod, service and underlay ranges, so that nothing for them ever leaves the
machine; the node namespaces have no default route at all.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Interface, IPv4Network

from membrane.state import ClusterInfo
from shared import agent_api, netns
from shared.errors import Internal, InvalidArgument
from shared.pins import BPFFS, remove_pins

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
FIRST_NODE_HOST = 10


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: int
    underlay: IPv4Network
    cluster_cidr: IPv4Network
    service_cidr: IPv4Network

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise InvalidArgument(
                f"cluster name {self.name!r}: 1-10 lowercase letters and digits, starting with "
                "a letter (it prefixes interface names, which are at most 15 characters)",
                field="name",
            )
        if not 0 <= self.nodes <= self.underlay.num_addresses - FIRST_NODE_HOST - 2:
            raise InvalidArgument(
                f"{self.nodes} nodes do not fit the underlay {self.underlay}", field="nodes"
            )

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface(f"{self.underlay.network_address + 1}/{self.underlay.prefixlen}")

    @property
    def blackholes(self) -> list[IPv4Network]:
        return [self.cluster_cidr, self.service_cidr, self.underlay]

    def node_name(self, index: int) -> str:
        return f"{self.name}-node-{index}"

    def node_address(self, index: int) -> IPv4Interface:
        address = self.underlay.network_address + FIRST_NODE_HOST + index
        return IPv4Interface(f"{address}/{self.underlay.prefixlen}")

    def root_ifname(self, index: int) -> str:
        return f"{self.name}-u{index}"

    def node_names(self) -> list[str]:
        return [self.node_name(i) for i in range(1, self.nodes + 1)]


def create(topology: Topology) -> None:
    """The bridge, blackholes and node namespaces (idempotent)."""
    netns.ensure_underlay(topology.bridge, topology.gateway, topology.blackholes)
    for index in range(1, topology.nodes + 1):
        netns.ensure_node(
            topology.node_name(index),
            topology.bridge,
            topology.node_address(index),
            topology.root_ifname(index),
        )


def remove(topology: Topology) -> list[str]:
    """Every pod and node namespace, link, pin and socket of the cluster; returns what went.

    Best effort: a step that fails does not stop the others; the failures are raised together
    at the end, so that one stubborn namespace never leaves the rest of the cluster behind.
    """
    removed: list[str] = []
    failures: list[str] = []

    def attempt(what: str, action: Callable[[], object]) -> None:
        try:
            action()
            removed.append(what)
        except Exception as exc:
            failures.append(f"{what}: {exc}")

    for index in range(1, topology.nodes + 1):
        node = topology.node_name(index)
        for pod in netns.list_netns(f"{node}_"):
            attempt(pod, partial(netns.delete_netns, pod))
        attempt(node, partial(netns.remove_node, node, topology.root_ifname(index)))
        remove_pins(BPFFS, node)
        shutil.rmtree(agent_api.default_socket(node).parent, ignore_errors=True)
    attempt(topology.bridge, partial(netns.remove_underlay, topology.bridge, topology.blackholes))
    if failures:
        raise Internal("could not remove everything:\n  " + "\n  ".join(failures))
    return removed


def topology_of(info: ClusterInfo) -> Topology:
    return Topology(
        name=info.name,
        nodes=info.nodes,
        underlay=IPv4Network(info.underlay_cidr),
        cluster_cidr=IPv4Network(info.cluster_cidr),
        service_cidr=IPv4Network(info.service_cidr),
    )
