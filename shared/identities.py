"""Identity numbers every service agrees on: Cilium's reserved identities and the ranges."""

from __future__ import annotations

from typing import Final

HOST: Final = 1
WORLD: Final = 2
UNMANAGED: Final = 3
HEALTH: Final = 4
INIT: Final = 5
REMOTE_NODE: Final = 6
KUBE_APISERVER: Final = 7
INGRESS: Final = 8

RESERVED: Final[dict[str, int]] = {
    "unknown": 0,
    "host": HOST,
    "world": WORLD,
    "unmanaged": UNMANAGED,
    "health": HEALTH,
    "init": INIT,
    "remote-node": REMOTE_NODE,
    "kube-apiserver": KUBE_APISERVER,
    "ingress": INGRESS,
}
BY_ID: Final[dict[int, str]] = {number: name for name, number in RESERVED.items()}

# The first cluster-local identity, and the base of node-local CIDR identities (never on wire).
CLUSTER_MIN: Final = 256
CLUSTER_MAX: Final = 65535
LOCAL_BASE: Final = 1 << 24
