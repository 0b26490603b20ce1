"""Identity numbers every service agrees on: Cilium's reserved identities and the ranges."""

from __future__ import annotations

import hashlib
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
LOCAL_SPAN: Final = 1 << 24  # a CIDR identity is LOCAL_BASE | n, n in 1 .. LOCAL_SPAN - 1


def cidr_slot(network: object) -> int:
    """The first choice of ``n`` for a network's CIDR identity: a hash of its text, so that a
    network keeps its number across restarts and everyone computing it agrees (the policy
    service probes upwards from it on a collision; the datapath's DNS fast path uses it only
    when no other network holds that number)."""
    digest = hashlib.blake2s(str(network).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (LOCAL_SPAN - 1) + 1


# Policy-map identities of pod *addresses* (never a real identity, never on the wire): a CIDR
# rule with the NetworkPolicy meaning (ipBlock) matches pod addresses too, per address. The
# datapath looks a pod address up in the policy prefixes (longest match; ``WORLD`` when none)
# and consults the slot ``ADDRESS | that identity`` besides the pod's own identity; such rules
# select ``ADDRESS | n`` for every CIDR identity n they select. See docs/policy.md.
ADDRESS: Final = 1 << 31
