"""Reserved identities (Cilium's numbers) and the arithmetic of cluster-pool IPAM."""

from __future__ import annotations

import ipaddress

import pytest
import redis.asyncio as aioredis

from services.identity import reserved
from services.identity.ipam import PodCIDRAllocator, parse_pool
from shared.errors import InvalidArgument
from shared.labels import LabelSet

# --- reserved identities --------------------------------------------------------------------------

CILIUM_RESERVED = {
    "unknown": 0,
    "host": 1,
    "world": 2,
    "unmanaged": 3,
    "health": 4,
    "init": 5,
    "remote-node": 6,
    "kube-apiserver": 7,
    "ingress": 8,
}


def test_reserved_numbers_are_cilium_numbers() -> None:
    assert reserved.RESERVED == CILIUM_RESERVED
    assert {number: name for name, number in CILIUM_RESERVED.items()} == reserved.BY_ID


def test_ranges() -> None:
    assert reserved.CLUSTER_MIN == 256
    assert reserved.CLUSTER_MAX == 65535
    assert reserved.LOCAL_BASE == 16777216
    assert max(reserved.BY_ID) < reserved.CLUSTER_MIN


@pytest.mark.parametrize(("name", "number"), sorted(CILIUM_RESERVED.items()))
def test_labels_of(name: str, number: int) -> None:
    labels = reserved.labels_of(number)
    assert labels.canonical == f"reserved:{name}"
    assert labels.is_reserved()
    assert labels == LabelSet.parse([f"reserved:{name}"])
    assert labels.k8s_map() == {}


def test_labels_of_unknown_number() -> None:
    with pytest.raises(KeyError):
        reserved.labels_of(9)


@pytest.mark.parametrize(
    ("number", "kind"),
    [
        *((n, "reserved") for n in range(9)),
        (256, "cluster"),
        (257, "cluster"),
        (65535, "cluster"),
        (16777216, "local"),
        (16777217, "local"),  # 1<<24 | 1, the first node-local CIDR identity
        ((1 << 24) | 0xFFFF, "local"),
    ],
)
def test_kind_of(number: int, kind: str) -> None:
    assert reserved.kind_of(number) == kind


# --- parse_pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "mask", "network"),
    [
        ("10.244.0.0/16", 24, "10.244.0.0/16"),
        ("10.244.0.0/16", 16, "10.244.0.0/16"),
        ("10.244.0.0/16", 32, "10.244.0.0/16"),
        ("10.0.0.0/8", 26, "10.0.0.0/8"),
        ("fd00::/104", 120, "fd00::/104"),
        ("fd00::/104", 128, "fd00::/104"),
        ("FD00:0::/104", 112, "fd00::/104"),
    ],
)
def test_parse_pool(cidr: str, mask: int, network: str) -> None:
    parsed, mask_size = parse_pool(cidr, mask)
    assert parsed == ipaddress.ip_network(network)
    assert mask_size == mask


@pytest.mark.parametrize(
    "cidr", ["", "banana", "10.244.0.1/16", "10.244.0.0/33", "300.0.0.0/8", "fd00::1/104"]
)
def test_parse_pool_rejects_bad_cidr(cidr: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_pool(cidr, 24)
    assert info.value.field == "cluster_cidr"
    assert repr(cidr) in info.value.message


@pytest.mark.parametrize(
    ("cidr", "mask"),
    [
        ("10.244.0.0/16", 15),
        ("10.244.0.0/16", 8),
        ("10.244.0.0/16", 33),
        ("10.244.0.0/16", -1),
        ("fd00::/104", 103),
        ("fd00::/104", 129),
    ],
)
def test_parse_pool_rejects_mask_outside_the_range(cidr: str, mask: int) -> None:
    with pytest.raises(InvalidArgument, match=f"node mask /{mask} must lie between") as info:
        parse_pool(cidr, mask)
    assert info.value.field == "node_mask_size"


# --- PodCIDRAllocator.subnet ----------------------------------------------------------------------


def allocator(cidr: str, mask: int) -> PodCIDRAllocator:
    # Constructing a client opens no connection; the allocator only registers its Lua scripts.
    return PodCIDRAllocator(aioredis.Redis(), cidr, mask)


def test_constructor_validates_the_pool() -> None:
    with pytest.raises(InvalidArgument) as info:
        allocator("10.244.0.0/16", 12)
    assert info.value.field == "node_mask_size"
    with pytest.raises(InvalidArgument) as info:
        allocator("10.244.1.0/16", 24)
    assert info.value.field == "cluster_cidr"


@pytest.mark.parametrize(
    ("cidr", "mask", "size"),
    [
        ("10.244.0.0/16", 24, 256),
        ("10.244.0.0/16", 16, 1),
        ("10.244.0.0/16", 26, 1024),
        ("10.0.0.0/8", 24, 65536),
        ("fd00::/104", 120, 65536),
        ("fd00::/112", 120, 256),
    ],
)
def test_size(cidr: str, mask: int, size: int) -> None:
    assert allocator(cidr, mask).size == size


@pytest.mark.parametrize(
    ("cidr", "mask", "index", "subnet"),
    [
        ("10.244.0.0/16", 24, 0, "10.244.0.0/24"),
        ("10.244.0.0/16", 24, 1, "10.244.1.0/24"),
        ("10.244.0.0/16", 24, 17, "10.244.17.0/24"),
        ("10.244.0.0/16", 24, 255, "10.244.255.0/24"),
        ("10.244.0.0/16", 26, 0, "10.244.0.0/26"),
        ("10.244.0.0/16", 26, 1, "10.244.0.64/26"),
        ("10.244.0.0/16", 26, 5, "10.244.1.64/26"),
        ("10.244.0.0/16", 26, 1023, "10.244.255.192/26"),
        ("10.244.0.0/16", 16, 0, "10.244.0.0/16"),
        ("10.244.0.0/16", 32, 258, "10.244.1.2/32"),
        ("10.0.0.0/8", 24, 256, "10.1.0.0/24"),
        ("10.0.0.0/8", 24, 65535, "10.255.255.0/24"),
        ("fd00::/104", 120, 0, "fd00::/120"),
        ("fd00::/104", 120, 1, "fd00::100/120"),
        ("fd00::/104", 120, 65535, "fd00::ff:ff00/120"),
        ("fd00::/104", 112, 255, "fd00::ff:0/112"),
    ],
)
def test_subnet(cidr: str, mask: int, index: int, subnet: str) -> None:
    assert allocator(cidr, mask).subnet(index) == ipaddress.ip_network(subnet)


@pytest.mark.parametrize(
    ("cidr", "mask"), [("10.244.0.0/16", 24), ("10.244.0.0/20", 27), ("fd00::/112", 120)]
)
def test_subnets_tile_the_pool(cidr: str, mask: int) -> None:
    alloc = allocator(cidr, mask)
    subnets = [alloc.subnet(i) for i in range(alloc.size)]
    assert subnets == list(ipaddress.ip_network(cidr).subnets(new_prefix=mask))
    assert all(s.prefixlen == mask for s in subnets)
    assert all(s.subnet_of(alloc.network) for s in subnets)  # type: ignore[arg-type]
