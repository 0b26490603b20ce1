"""Compile the datapath once, open its pinned maps, and attach it to endpoints.

The maps live under ``<bpffs>/membrane/<node>/``. When they already exist (an agent ran
before), bcc reuses them instead of creating new ones, and ``attach`` swaps the programs on
every veth in one ``tc filter replace`` each: traffic sees the old program or the new one,
never none.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.datapath import maps
from services.datapath.maps import BpfMap, EndpointInfo, IPCacheValue, LxcInfo
from shared.errors import Internal
from shared.pins import pin_dir
from shared.policy_map import PolicyKey, PolicyValue

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = BPF_DIR / "datapath.c"
# headers with code that calls map methods (map.lookup(...)): bcc rewrites those calls only in
# the main source, so these are pasted into it in place of their #include
# (in this order: lb.h includes lb_icmp.h)
INLINED_HEADERS = ("lb.h", "lb_icmp.h", "overlay.h", "nodeport.h")
PROGRAMS = ("from_container", "to_container", "from_overlay", "from_netdev", "overlay_egress")
# tc hooks of the host-side veth: ingress sees what the pod sends
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
FILTER_PRIO = 1
FILTER_HANDLE = ":1"


def program_text() -> str:
    """The datapath's C source as bcc compiles it: datapath.c with INLINED_HEADERS pasted."""
    text = SOURCE.read_text()
    for header in INLINED_HEADERS:
        include = f'#include "{header}"'
        if include not in text:
            raise Internal(f"{SOURCE.name} does not include {header}")
        text = text.replace(include, (BPF_DIR / header).read_text(), 1)
    return text


@dataclass
class Programs:
    from_container: Any
    to_container: Any
    from_overlay: Any
    from_netdev: Any
    overlay_egress: Any


class Datapath:
    """The compiled programs and typed views of the pinned maps of one node."""

    def __init__(
        self,
        bpffs: Path,
        node: str,
        *,
        ct_size: int,
        events_bytes: int,
        ct_endpoint_max: int = 0,
    ) -> None:
        from bcc import BPF  # imported here: bcc is a system package, absent on dev laptops

        self.pins = pin_dir(bpffs, node)
        self.pins.mkdir(parents=True, exist_ok=True)
        self.adopted = (self.pins / "endpoints").exists()
        cflags = [
            f"-I{BPF_DIR}",
            f'-DPIN_DIR="{self.pins}"',
            f"-DCT_MAP_SIZE={ct_size}",
            f"-DCT_ENDPOINT_MAX={ct_endpoint_max or ct_size // 2}",
            # a translation record per tracked connection to a service or a node port
            f"-DLB_NAT_MAX={ct_size}",
            f"-DNP_NAT_MAX={ct_size}",
            f"-DEVENTS_BYTES={events_bytes}",
        ]
        try:
            self.bpf = BPF(text=program_text().encode(), cflags=cflags)
            fns = [self.bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS]
        except Exception as exc:  # bcc raises bare Exceptions for compile and verifier errors
            raise Internal(f"cannot load the datapath programs: {exc}") from exc
        self.programs = Programs(*fns)
        self.events_bytes = events_bytes
        table = self.bpf.get_table
        self.endpoints: BpfMap[int, EndpointInfo] = BpfMap(
            table("endpoints"),
            maps.pack_u32,
            maps.unpack_u32,
            EndpointInfo.pack,
            EndpointInfo.unpack,
        )
        self.ipcache: BpfMap[IPv4Network, IPCacheValue] = BpfMap(
            table("ipcache"),
            maps.pack_ipcache_key,
            maps.unpack_ipcache_key,
            IPCacheValue.pack,
            IPCacheValue.unpack,
        )
        self.prefixes: BpfMap[IPv4Network, int] = BpfMap(
            table("prefixes"),
            maps.pack_ipcache_key,
            maps.unpack_ipcache_key,
            maps.pack_u32,
            maps.unpack_u32,
        )
        self.policy: BpfMap[PolicyKey, PolicyValue] = BpfMap(
            table("policy"),
            PolicyKey.pack,
            PolicyKey.unpack,
            PolicyValue.pack,
            PolicyValue.unpack,
        )
        self.lxc: BpfMap[IPv4Address, LxcInfo] = BpfMap(
            table("lxc"),
            maps.pack_address,
            maps.unpack_address,
            LxcInfo.pack,
            LxcInfo.unpack,
        )
        self.overlay_config = table("overlay_config")
        self.tunnel_peers: BpfMap[IPv4Address, int] = BpfMap(
            table("tunnel_peers"),
            maps.pack_address,
            maps.unpack_address,
            maps.pack_u32,
            maps.unpack_u32,
        )
        self.ct = table("ct")  # answered connections
        self.ct_new = table("ct_new")  # connections not answered yet
        self.ct_quota = table("ct_quota")  # answered connections per endpoint (maps.h)
        # per-connection translation records, by map name (lb.h, nodeport.h): the forward ones
        # of services and node ports (masquerading's too), answered and not yet
        self.lb_nat, self.lb_nat_new = table("lb_nat_map"), table("lb_nat_new")
        self.np_nat, self.np_nat_new = table("np_nat_map"), table("np_nat_new")
        # every translation map, swept when its records expire (conntrack.py)
        self.translations = (
            self.lb_nat,
            self.lb_nat_new,
            table("lb_rnat_map"),
            table("lb_rnat_new"),
            self.np_nat,
            self.np_nat_new,
            table("np_rnat_map"),
            table("np_rnat_new"),
        )
        self.lb_quota = table("lb_quota")  # answered records per local client (lb.h)
        self.metrics = table("metrics")
        self.lost_events = table("lost_events")
        self.events = table("events")

    def events_fd(self) -> int:
        return int(self.events.map_fd)

    def lost_event_count(self) -> int:
        return sum(int(v) for v in self.lost_events[self.lost_events.Key(0)])

    def attach(self, ifindex: int) -> None:
        """Put both programs on a host-side veth (idempotent; replaces older programs)."""
        self._attach(
            ifindex,
            (
                (PARENT_INGRESS, self.programs.from_container),
                (PARENT_EGRESS, self.programs.to_container),
            ),
        )

    def attach_overlay(self, ifindex: int) -> None:
        """from_overlay on the VXLAN device's ingress, overlay_egress on its egress
        (idempotent)."""
        self._attach(
            ifindex,
            (
                (PARENT_INGRESS, self.programs.from_overlay),
                (PARENT_EGRESS, self.programs.overlay_egress),
            ),
        )

    def attach_netdev(self, ifindex: int) -> None:
        """Put from_netdev on the underlay device's ingress (idempotent): node ports."""
        self._attach(ifindex, ((PARENT_INGRESS, self.programs.from_netdev),))

    def _attach(self, ifindex: int, hooks: tuple[tuple[str, Any], ...]) -> None:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            for parent, fn in hooks:
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    FILTER_HANDLE,
                    fd=fn.fd,
                    name=fn.name,
                    parent=parent,
                    classid=1,
                    direct_action=True,
                    prio=FILTER_PRIO,
                )

    def close(self) -> None:
        """Release this process's handles; pinned maps and attached programs stay."""
        self.bpf.cleanup()
