"""services/datapath/nodeport.py: the np_config entry's layout and its checks."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from services.datapath.nodeport import SNAT_RANGE, NodePortConfig
from shared.errors import InvalidArgument
from shared.protocols import NODE_PORT_RANGE


def test_layout_is_bpf_struct_np_config() -> None:
    config = NodePortConfig(IPv4Address("172.31.5.11"), 7, masquerade=True)
    packed = config.pack()
    # __u32 underlay_ip (network order), __u32 ifindex, four __u16 in host order, __u8
    # masquerade and three bytes of padding
    assert len(packed) == 20
    assert packed[:4] == bytes([172, 31, 5, 11])
    assert struct.unpack("<I4HB3x", packed[4:]) == (7, *NODE_PORT_RANGE, *SNAT_RANGE, 1)
    assert NodePortConfig.unpack(packed) == config


def test_snat_ports_stay_above_the_default_ephemeral_range() -> None:
    assert SNAT_RANGE[0] > 60999 and SNAT_RANGE[1] <= 65535


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"snat_range": (30500, 40000)}, "snat_range"),  # overlaps the node ports
        ({"snat_range": (62000, 61000)}, "snat_range"),
        ({"nodeport_range": (0, 100)}, "nodeport_range"),
        ({"snat_range": (61000, 70000)}, "snat_range"),
    ],
)
def test_bad_ranges_are_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        NodePortConfig(IPv4Address("10.0.0.1"), 1, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
