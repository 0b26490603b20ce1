"""Cilium's drop reason codes and their names, exactly as Cilium's monitor and Hubble print them.

Copied from Cilium's ``pkg/monitor/api/drop.go`` (the ``errors`` map; codes >= 130 are
``-DROP_*`` of ``bpf/lib/common.h``, those below are forwarding/metrics reasons). People who
know Cilium read membrane's drops without a table; codes Cilium retired (159, 189) are absent.
"""

from __future__ import annotations

from typing import Final

# the codes membrane's datapath emits, under the names of Cilium's DROP_* macros
INVALID_SOURCE_IP: Final = 132  # DROP_INVALID_SIP
POLICY_DENIED: Final = 133  # DROP_POLICY: no policy entry allows the packet
INVALID_PACKET: Final = 134  # DROP_INVALID
CT_INVALID_HDR: Final = 135  # DROP_CT_INVALID_HDR
UNSUPPORTED_L3: Final = 139  # DROP_UNKNOWN_L3
UNKNOWN_L4: Final = 142  # DROP_UNKNOWN_L4
NO_SERVICE: Final = 158  # DROP_NO_SERVICE: a service frontend without a backend
UNKNOWN_CT: Final = 163  # DROP_UNKNOWN_CT
NO_FIB: Final = 169  # DROP_NO_FIB
ENCAP_PROHIBITED: Final = 170  # DROP_ENCAP_PROHIBITED: a pod's UDP to a node's tunnel port
INVALID_IDENTITY: Final = 171  # DROP_INVALID_IDENTITY: a VNI that is not its source's identity
UNKNOWN_SENDER: Final = 172  # DROP_UNKNOWN_SENDER: a VXLAN frame from a node that is no peer
# a non-first IP fragment whose first fragment was never seen (its ports are unknown)
FRAG_NOT_FOUND: Final = 175  # DROP_FRAG_NOT_FOUND
# no proxy socket to assign an L7 connection to (the proxy is down or not synced yet)
PROXY_LOOKUP_FAILED: Final = 178  # DROP_PROXY_LOOKUP_FAILED
PROXY_SET_FAILED: Final = 179  # DROP_PROXY_SET_FAILED
# an allow with L7 rules whose connection the proxy could not take (fail closed)
PROXY_UNSUPPORTED: Final = 180  # DROP_PROXY_UNKNOWN_PROTO
POLICY_DENY: Final = 181  # DROP_POLICY_DENY: a deny entry matched (deny beats allow)
INVALID_VNI: Final = 183  # DROP_INVALID_VNI
TTL_EXCEEDED: Final = 196  # DROP_TTL_EXCEEDED
# a new connection of an endpoint whose identity's resolved policy has not arrived yet
EP_NOT_READY: Final = 203  # DROP_EP_NOT_READY
NO_TUNNEL_KEY: Final = 147  # DROP_NO_TUNNEL_KEY: a VXLAN packet without its tunnel metadata
UNKNOWN_TARGET: Final = 150  # DROP_UNKNOWN_TARGET: no local pod for it (or not that way)
NO_CONFIG: Final = 165  # DROP_NO_CONFIG: the endpoint has no configuration (fail closed)
NAT_NO_MAPPING: Final = 167  # DROP_NAT_NO_MAPPING: no free SNAT port for a node port

# the codes services/datapath/bpf/drop_reasons.h defines, by macro name (a unit test keeps the
# two equal); the others above are Cilium codes the datapath does not emit (yet)
DATAPATH_DROPS: Final[dict[str, int]] = {
    "DROP_INVALID_SIP": INVALID_SOURCE_IP,
    "DROP_POLICY": POLICY_DENIED,
    "DROP_INVALID": INVALID_PACKET,
    "DROP_CT_INVALID_HDR": CT_INVALID_HDR,
    "DROP_UNSUPPORTED_L3": UNSUPPORTED_L3,
    "DROP_NO_TUNNEL_KEY": NO_TUNNEL_KEY,
    "DROP_UNKNOWN_TARGET": UNKNOWN_TARGET,
    "DROP_NO_SERVICE": NO_SERVICE,
    "DROP_NO_CONFIG": NO_CONFIG,
    "DROP_NAT_NO_MAPPING": NAT_NO_MAPPING,
    "DROP_ENCAP_PROHIBITED": ENCAP_PROHIBITED,
    "DROP_INVALID_IDENTITY": INVALID_IDENTITY,
    "DROP_UNKNOWN_SENDER": UNKNOWN_SENDER,
    "DROP_PROXY_LOOKUP_FAILED": PROXY_LOOKUP_FAILED,
    "DROP_PROXY_SET_FAILED": PROXY_SET_FAILED,
    "DROP_PROXY_UNSUPPORTED": PROXY_UNSUPPORTED,
    "DROP_POLICY_DENY": POLICY_DENY,
    "DROP_INVALID_VNI": INVALID_VNI,
    "DROP_FRAG_NOT_FOUND": FRAG_NOT_FOUND,
    "DROP_EP_NOT_READY": EP_NOT_READY,
}

REASONS: Final[dict[int, str]] = {
    0: "Success",
    2: "Invalid packet",
    3: "Interface",
    4: "Interface Decrypted",
    5: "LB, sock cgroup: No backend slot entry found",
    6: "LB, sock cgroup: No backend entry found",
    7: "LB, sock cgroup: Reverse entry update failed",
    8: "LB, sock cgroup: Reverse entry stale",
    9: "Fragmented packet",
    10: "Fragmented packet entry update failed",
    11: "Missed tail call to custom program",
    12: "Interface Decrypting",
    13: "Interface Encrypting",
    14: "LB: sock cgroup: Reverse entry delete succeeded",
    15: "MTU error message",
    130: "Invalid source mac",
    131: "Invalid destination mac",
    132: "Invalid source ip",
    133: "Policy denied",
    134: "Invalid packet",
    135: "CT: Truncated or invalid header",
    136: "Fragmentation needed",
    137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol",
    140: "Missed tail call",
    141: "Error writing to packet",
    142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code",
    144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type",
    147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options",
    149: "Invalid Geneve option",
    150: "Unknown L3 target address",
    151: "Stale or unroutable IP",
    152: "No matching local container found",
    153: "Error while correcting L3 checksum",
    154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed",
    156: "Invalid IPv6 extension header",
    157: "IP fragmentation not supported",
    158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    161: "NAT 46/64 not enabled",
    162: "Reached EDT rate-limiting drop horizon",
    163: "Unknown connection tracking state",
    164: "Local host is unreachable",
    165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol",
    167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade",
    169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited",
    171: "Invalid identity",
    172: "Unknown sender",
    173: "NAT not needed",
    174: "Is a ClusterIP",
    175: "First logical datagram fragment not found",
    176: "Forbidden ICMPv6 message",
    177: "Denied by LB src range check",
    178: "Socket lookup failed",
    179: "Socket assign failed",
    180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist",
    182: "VLAN traffic disallowed by VLAN filter",
    183: "Incorrect VNI from VTEP",
    184: "Failed to update or lookup TC buffer",
    185: "No SID was found for the IP address",
    186: "SRv6 state was removed during tail call",
    187: "L3 translation from IPv4 to IPv6 failed (NAT46)",
    188: "L3 translation from IPv6 to IPv4 failed (NAT64)",
    190: "No conntrack map found",
    191: "No nat map found",
    192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation",
    194: "No egress gateway found",
    195: "Traffic is unencrypted",
    196: "TTL exceeded",
    197: "No node ID found",
    198: "Rate limited",
    199: "IGMP handled",
    200: "IGMP subscribed",
    201: "Multicast handled",
    202: "Host datapath not ready",
    203: "Endpoint policy program not available",
    204: "No Egress IP configured",
    205: "Punt to proxy",
    206: "No device",
    207: "First logical datagram fragment not found from world",
}


def reason_name(code: int) -> str:
    """Cilium's name of a drop reason; an unknown code still reads as a reason."""
    name = REASONS.get(code)
    return name if name is not None else f"Unknown reason {code}"
