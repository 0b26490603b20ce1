"""The node's VXLAN device (external / collect_md mode) and the overlay's settings in BPF.

One device per node carries the traffic to every other node: the remote address and the VNI
are set per packet by the datapath (``bpf_skb_set_tunnel_key``), so nothing here changes when
nodes come and go. Like Cilium, the device listens on UDP 8472 by default.

Blocking netlink calls: run them in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shared import bpf_layouts
from shared.errors import AlreadyExists, Internal, InvalidArgument

ROUTING_MODES: Final = ("tunnel", "native")
ROUTING_NATIVE: Final = 0  # bpf/overlay.h ROUTING_*
ROUTING_TUNNEL: Final = 1
IFF_NOARP: Final = 0x80
VXLAN_OVERHEAD: Final = 50  # outer Ethernet + IPv4 + UDP + VXLAN headers


def check_mode(mode: str, field: str) -> str:
    if mode not in ROUTING_MODES:
        raise InvalidArgument(
            f"routing mode {mode!r}: one of {', '.join(ROUTING_MODES)}", field=field
        )
    return mode


@dataclass(frozen=True)
class OverlayConfig:
    """bpf/overlay.h struct overlay_config."""

    underlay_ip: IPv4Address
    vxlan_ifindex: int
    mode: int
    tunnel_port: int

    _LAYOUT = bpf_layouts.OVERLAY_CONFIG

    def pack(self) -> bytes:
        return self._LAYOUT.pack(
            self.underlay_ip.packed, self.vxlan_ifindex, self.mode, self.tunnel_port, 0
        )

    @classmethod
    def unpack(cls, data: bytes) -> OverlayConfig:
        ip, ifindex, mode, port, _ = cls._LAYOUT.unpack(data)
        return cls(IPv4Address(ip), ifindex, mode, port)


def write_config(table: Any, config: OverlayConfig) -> None:
    """Store ``config`` in the pinned one-entry array (a single map write)."""
    key = table.Key(0)
    table[key] = table.Leaf.from_buffer_copy(config.pack())


def read_config(table: Any) -> OverlayConfig:
    return OverlayConfig.unpack(bytes(table[table.Key(0)]))


def ensure_vxlan(device: str, port: int, local: IPv4Address, underlay_mtu: int) -> int:
    """The VXLAN device in external mode on ``port`` with ``local`` (the underlay address) as
    its source, up; its ifindex (idempotent).

    The kernel's VXLAN socket listens on every address of the node whatever ``local`` says:
    from_overlay drops a frame that was not sent to ``local`` (bpf/overlay.h).
    An existing device with other settings is replaced (a node switched ports, say)."""
    if not 0 < port < 65536:
        raise InvalidArgument(f"UDP port {port} out of range", field="tunnel_port")
    with IPRoute() as ipr:
        link = _get(ipr, device)
        if link is not None and not _matches(link, port, local):
            if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan":
                raise AlreadyExists(f"link {device} exists and is not a vxlan", field="device")
            ipr.link("del", index=int(link["index"]))
            link = None
        if link is None:
            try:
                ipr.link(
                    "add",
                    ifname=device,
                    kind="vxlan",
                    vxlan_collect_metadata=1,
                    # Group Based Policy: the group id says how to read the VNI (a node-port
                    # client's CIDR identity, bpf/overlay.h GBP_CIDR)
                    vxlan_gbp=True,
                    vxlan_port=port,
                    vxlan_local=str(local),
                    vxlan_learning=0,
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise Internal(
                        f"cannot create the VXLAN device {device}: kernel refused: "
                        f"{exc.args[-1] if exc.args else exc.code}"
                    ) from exc
            link = _get(ipr, device)
            if link is None:
                raise Internal(f"VXLAN device {device} vanished right after it was created")
        index = int(link["index"])
        _sysctl(f"net/ipv6/conf/{device}/disable_ipv6", "1")
        _sysctl(f"net/ipv4/conf/{device}/rp_filter", "0")
        ipr.link("set", index=index, mtu=underlay_mtu - VXLAN_OVERHEAD, state="up")
        # routes into the device (the node's own traffic to other nodes' pods) need no
        # neighbour: overlay_egress sets the tunnel key, the far side the Ethernet header
        ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
        return index


def link_mtu(ifname: str) -> int:
    with IPRoute() as ipr:
        link = _get(ipr, ifname)
        if link is None:
            raise Internal(f"link {ifname} does not exist")
        return int(link.get("mtu") or 1500)


def _get(ipr: Any, name: str) -> Any | None:
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def _matches(link: Any, port: int, local: IPv4Address) -> bool:
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan" or data is None:
        return False
    return (
        bool(data.get("IFLA_VXLAN_COLLECT_METADATA"))
        and any(attr[0] == "IFLA_VXLAN_GBP" for attr in data["attrs"])
        and data.get("IFLA_VXLAN_PORT") == port
        and data.get("IFLA_VXLAN_LOCAL") == str(local)
    )


def _sysctl(key: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
    except OSError:
        pass  # an optional knob (IPv6 may be compiled out)
