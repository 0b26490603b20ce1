"""Reserved identities, with Cilium's numbers and names."""

from __future__ import annotations

from shared.labels import SOURCE_RESERVED, Label, LabelSet

RESERVED: dict[str, int] = {
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
BY_ID: dict[int, str] = {number: name for name, number in RESERVED.items()}

# The first cluster-local identity, and the base of node-local CIDR identities (never on wire).
CLUSTER_MIN = 256
CLUSTER_MAX = 65535
LOCAL_BASE = 1 << 24


def labels_of(number: int) -> LabelSet:
    return LabelSet([Label(SOURCE_RESERVED, BY_ID[number])])


def kind_of(number: int) -> str:
    if number < CLUSTER_MIN:  # 1-255 is Cilium's reserved range, named or not
        return "reserved"
    if number >= LOCAL_BASE:
        return "local"
    return "cluster"
