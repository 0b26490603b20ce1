"""Node ports from outside the pod network: ``from_netdev`` on the node's underlay device.

The agent writes the one-entry ``np_config`` map (bpf/nodeport.h) -- this node's underlay
address and device, the node-port range, the range of ports it translates clients' connections
to -- and attaches the program to the device's tc ingress. Both are idempotent: a restarted
agent rewrites the same entry and swaps the program with ``tc filter replace`` (atomic), so
node-port connections survive the restart (their NAT records live in pinned maps).

Blocking netlink calls: run them in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final

from pyroute2 import IPRoute

from services.datapath.loader import Datapath
from shared import bpf_layouts
from shared.errors import Internal, InvalidArgument
from shared.protocols import NODE_PORT_RANGE

# The SNAT ports: above Linux's default ephemeral range (32768-60999), so that the node's own
# connections never hold the same reply tuple as a translated one.
SNAT_RANGE: Final = (61000, 65535)


@dataclass(frozen=True)
class NodePortConfig:
    """bpf/nodeport.h struct np_config."""

    underlay_ip: IPv4Address
    underlay_ifindex: int
    nodeport_range: tuple[int, int] = NODE_PORT_RANGE
    snat_range: tuple[int, int] = SNAT_RANGE
    masquerade: bool = False  # pods' connections to the world leave from underlay_ip

    _LAYOUT = bpf_layouts.NP_CONFIG

    def __post_init__(self) -> None:
        for name in ("nodeport_range", "snat_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high < 65536:
                raise InvalidArgument(f"port range {low}-{high} is not valid", field=name)
        (np_low, np_high), (snat_low, snat_high) = self.nodeport_range, self.snat_range
        if snat_low <= np_high and np_low <= snat_high:
            raise InvalidArgument("the SNAT ports overlap the node ports", field="snat_range")

    def pack(self) -> bytes:
        return self._LAYOUT.pack(
            self.underlay_ip.packed,
            self.underlay_ifindex,
            *self.nodeport_range,
            *self.snat_range,
            self.masquerade,
        )

    @classmethod
    def unpack(cls, data: bytes) -> NodePortConfig:
        ip, ifindex, np_low, np_high, snat_low, snat_high, masq = cls._LAYOUT.unpack(data)
        return cls(IPv4Address(ip), ifindex, (np_low, np_high), (snat_low, snat_high), bool(masq))


def write_config(table: Any, config: NodePortConfig) -> None:
    """Store ``config`` in the pinned one-entry array (a single map write)."""
    table[table.Key(0)] = table.Leaf.from_buffer_copy(config.pack())


def read_config(table: Any) -> NodePortConfig:
    return NodePortConfig.unpack(bytes(table[table.Key(0)]))


def ifindex(device: str) -> int:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=device)
    if not found:
        raise Internal(f"the underlay device {device} does not exist")
    return int(found[0])


def enable(
    datapath: Datapath, device: str, address: IPv4Address, masquerade: bool = False
) -> NodePortConfig:
    """Configure, then attach from_netdev to ``device`` (the order matters only on the first
    start: the program passes everything while the entry is empty)."""
    config = NodePortConfig(address, ifindex(device), masquerade=masquerade)
    write_config(datapath.bpf.get_table("np_config"), config)
    datapath.attach_netdev(config.underlay_ifindex)
    return config
