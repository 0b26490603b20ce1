"""IP protocol numbers and names, and the port ranges, as every service and the datapath use them.

Numbers are IANA's, as ``PolicyEntry.protocol``, BPF map keys and flow events carry them; 0 is
"any" in a policy (TCP, UDP and SCTP: a policy port without a protocol means these, as in
Cilium). Names are the Kubernetes spelling of ``protocol:`` fields.
"""

from __future__ import annotations

from typing import Final

ANY: Final = 0
ICMP: Final = 1
TCP: Final = 6
UDP: Final = 17
ICMPV6: Final = 58
SCTP: Final = 132

NAMES: Final[dict[int, str]] = {
    ANY: "ANY",
    ICMP: "ICMP",
    TCP: "TCP",
    UDP: "UDP",
    ICMPV6: "ICMPv6",
    SCTP: "SCTP",
}
# the protocols that have ports, by their Kubernetes name (Service, NetworkPolicy, containerPort)
PORT_PROTOCOLS: Final[dict[str, int]] = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}

MAX_PORT: Final = 0xFFFF
# Kubernetes' default --service-node-port-range
NODE_PORT_RANGE: Final = (30000, 32767)
