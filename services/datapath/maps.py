"""Typed views of the BPF maps (layouts in bpf/maps.h), as mutable mappings.

The reconciling logic works on ``MutableMapping`` s, so it runs the same against a dict in a
unit test and against a pinned kernel map here. Keys and values are small frozen dataclasses
that know their C layout.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Generic, TypeVar

from shared import bpf_layouts

NO_ADDRESS = IPv4Address(0)
K = TypeVar("K")
V = TypeVar("V")

EP_ENFORCE_INGRESS = 0x1
EP_ENFORCE_EGRESS = 0x2
EP_POLICY_FAILED = 0x4
EP_AUDIT_INGRESS = 0x8
EP_AUDIT_EGRESS = 0x10
EP_POLICY_PENDING = 0x20

CT_EGRESS = 1
CT_INGRESS = 2
CT_F_CLOSING = 0x1
CT_F_REPLIED = 0x2


@dataclass(frozen=True)
class EndpointInfo:
    """The endpoint map's value; the key is the host-side veth ifindex (the endpoint id)."""

    identity: int
    ip: IPv4Address
    flags: int

    _LAYOUT = bpf_layouts.ENDPOINT_INFO

    def pack(self) -> bytes:
        return self._LAYOUT.pack(self.identity, self.ip.packed, self.flags, 0)

    @classmethod
    def unpack(cls, data: bytes) -> EndpointInfo:
        identity, ip, flags, _ = cls._LAYOUT.unpack(data)
        return cls(identity, IPv4Address(ip), flags)


@dataclass(frozen=True)
class IPCacheValue:
    identity: int
    tunnel_endpoint: IPv4Address = NO_ADDRESS

    _LAYOUT = bpf_layouts.IPCACHE_VALUE

    def pack(self) -> bytes:
        return self._LAYOUT.pack(self.identity, self.tunnel_endpoint.packed)

    @classmethod
    def unpack(cls, data: bytes) -> IPCacheValue:
        identity, tunnel = cls._LAYOUT.unpack(data)
        return cls(identity, IPv4Address(tunnel))


@dataclass(frozen=True)
class LxcInfo:
    """A local endpoint by address: where from_container delivers its packets directly."""

    ifindex: int
    mac: str  # the pod's interface
    host_mac: str  # the host side of its veth

    _LAYOUT = bpf_layouts.LXC_INFO

    def pack(self) -> bytes:
        return self._LAYOUT.pack(self.ifindex, _mac(self.mac), _mac(self.host_mac))

    @classmethod
    def unpack(cls, data: bytes) -> LxcInfo:
        ifindex, mac, host_mac = cls._LAYOUT.unpack(data)
        return cls(ifindex, mac.hex(":"), host_mac.hex(":"))


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def pack_address(address: IPv4Address) -> bytes:
    return address.packed


def unpack_address(data: bytes) -> IPv4Address:
    return IPv4Address(data)


_IPCACHE_KEY = bpf_layouts.IPCACHE_KEY


def pack_ipcache_key(net: IPv4Network) -> bytes:
    return _IPCACHE_KEY.pack(net.prefixlen, net.network_address.packed)


def unpack_ipcache_key(data: bytes) -> IPv4Network:
    prefixlen, addr = _IPCACHE_KEY.unpack(data)
    return IPv4Network((IPv4Address(addr), prefixlen))


_U32 = bpf_layouts.U32


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(data: bytes) -> int:
    return int(_U32.unpack(data)[0])


@dataclass(frozen=True)
class CTEntry:
    """One connection-tracking entry, decoded for ``membrane bpf ct``."""

    src: str
    dst: str
    sport: int
    dport: int
    protocol: int
    scope: str
    expires_in: float
    packets: int
    bytes: int
    rule_id: int
    src_identity: int
    dst_identity: int
    closing: bool
    tcp_flags_seen: int
    replied: bool  # the peer answered (else a connection not answered yet, in ct_new)


_CT_KEY = bpf_layouts.CT_KEY
_CT_VALUE = bpf_layouts.CT_ENTRY


@dataclass(frozen=True)
class NatRecord:
    """One connection's translation (a service's or a node port's), for ``membrane bpf nat``."""

    kind: str  # "service" (lb.h), "nodeport" or "masquerade" (nodeport.h)
    answered: bool  # in the answered map (else not answered yet, or held out by the quota)
    client: str
    client_port: int
    frontend: str
    frontend_port: int
    protocol: int
    backend_id: int
    expires_in: float
    closing: bool


def decode_nat(kind: str, answered: bool, key: bytes, value: bytes, now_ns: int) -> NatRecord:
    saddr, daddr, sport, dport, proto, _, _ = _CT_KEY.unpack(key)
    if kind == "service":
        expires, backend_id, _, flags = bpf_layouts.LB_NAT.unpack(value)
    else:
        expires, backend_id, _, _, _, flags = bpf_layouts.NP_NAT.unpack(value)
        kind = kind if backend_id else "masquerade"  # a pod's connection to the world
    return NatRecord(
        kind=kind,
        answered=answered,
        client=socket.inet_ntoa(saddr),
        client_port=sport,
        frontend=socket.inet_ntoa(daddr),
        frontend_port=dport,
        protocol=proto,
        backend_id=backend_id,
        expires_in=round((expires - now_ns) / 1e9, 1),
        closing=bool(flags & CT_F_CLOSING),
    )


def decode_ct(key: bytes, value: bytes, now_ns: int) -> CTEntry:
    saddr, daddr, sport, dport, proto, scope, _ = _CT_KEY.unpack(key)
    expires, packets, nbytes, rule_id, src_id, dst_id, flags, seen, _ = _CT_VALUE.unpack(value)
    return CTEntry(
        src=socket.inet_ntoa(saddr),
        dst=socket.inet_ntoa(daddr),
        sport=sport,
        dport=dport,
        protocol=proto,
        scope="egress" if scope == CT_EGRESS else "ingress",
        expires_in=round((expires - now_ns) / 1e9, 1),
        packets=packets,
        bytes=nbytes,
        rule_id=rule_id,
        src_identity=src_id,
        dst_identity=dst_id,
        closing=bool(flags & CT_F_CLOSING),
        tcp_flags_seen=seen,
        replied=bool(flags & CT_F_REPLIED),
    )


class BpfMap(MutableMapping[K, V], Generic[K, V]):
    """A kernel map (bcc table) seen through codecs for its key and value."""

    def __init__(
        self,
        table: Any,
        pack_key: Callable[[K], bytes],
        unpack_key: Callable[[bytes], K],
        pack_value: Callable[[V], bytes],
        unpack_value: Callable[[bytes], V],
    ) -> None:
        self.table = table
        self._key_type = table.Key
        self._leaf_type = table.Leaf
        self._pack_key = pack_key
        self._unpack_key = unpack_key
        self._pack_value = pack_value
        self._unpack_value = unpack_value

    def _ckey(self, key: K) -> Any:
        return self._key_type.from_buffer_copy(self._pack_key(key))

    def __getitem__(self, key: K) -> V:
        try:
            leaf = self.table[self._ckey(key)]
        except KeyError:
            raise KeyError(key) from None
        return self._unpack_value(bytes(leaf))

    def __setitem__(self, key: K, value: V) -> None:
        """Raises OSError when the kernel refuses (a full map, say), whatever bcc raised, so
        that callers have one thing to catch for their fail-closed handling."""
        try:
            packed = self._pack_value(value)
            ckey = self._ckey(key)
        except (struct.error, OverflowError, ValueError) as exc:
            raise OSError(f"cannot encode {key!r} -> {value!r}: {exc}") from exc
        try:
            self.table[ckey] = self._leaf_type.from_buffer_copy(packed)
        except Exception as exc:  # bcc raises a bare Exception("Could not update table")
            raise OSError(str(exc)) from exc

    def __delitem__(self, key: K) -> None:
        try:
            del self.table[self._ckey(key)]
        except KeyError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[K]:
        for key in self.table.keys():  # noqa: SIM118 - a bcc table, not a dict
            yield self._unpack_key(bytes(key))

    def __len__(self) -> int:
        return sum(1 for _ in self.table.keys())  # noqa: SIM118

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, leaf in self.table.items():
            yield bytes(key), bytes(leaf)


def percpu_sum(values: Any, fields: tuple[str, ...]) -> tuple[int, ...]:
    """Sum a per-CPU map value (bcc gives one ctypes struct or int per CPU)."""
    totals = [0] * len(fields)
    for cpu_value in values:
        for i, name in enumerate(fields):
            totals[i] += int(getattr(cpu_value, name) if name else cpu_value)
    return tuple(totals)
