"""Every C struct that Python packs or unpacks for the datapath, as a ``struct`` format, here only.

The map codecs (``services/datapath/maps.py``, ``lb_sync.py``, ``tunnel.py``, ``nodeport.py``,
``events.py``, ``shared/policy_map.py``) take their formats from this module, and
``tests/integration/test_bpf_layouts.py`` compares each entry of :data:`STRUCTS` with the compiled
C: bcc builds a ctypes type for each struct from the program (as bcc's own tools read their
layouts), and every field here must sit at the offset and have the size of the C field, with
the same total size. Formats use standard sizes ("<", ">", "="), so their offsets do not depend
on the machine; the byte order is the one each field is written in.
"""

from __future__ import annotations

import struct
from typing import Final

U32: Final = struct.Struct("<I")
IPV4: Final = struct.Struct("4s")  # a __u32 address in network byte order (map keys)

# maps.h
ENDPOINT_INFO: Final = struct.Struct("<I4sII")  # identity, ip, flags, pad
LXC_INFO: Final = struct.Struct("<I6s6s")  # ifindex, mac, host_mac
IPCACHE_KEY: Final = struct.Struct("<I4s")  # prefixlen, ip
IPCACHE_VALUE: Final = struct.Struct("<I4s")  # identity, tunnel_endpoint
# struct policy_key: prefixlen in host order (the kernel's bpf_lpm_trie_key), then the matched
# fields big-endian so that the trie's bit order is theirs; POLICY_KEY is the whole key's layout
POLICY_KEY_PREFIXLEN: Final = struct.Struct("<I")
POLICY_KEY_DATA: Final = struct.Struct(">IB3xIBxH")  # endpoint, direction, identity, proto, port
POLICY_KEY: Final = struct.Struct("<I" + POLICY_KEY_DATA.format[1:])
POLICY_VALUE: Final = struct.Struct("<IBxH")  # rule_id, deny, pad, proxy_port
# saddr, daddr, sport, dport, protocol, scope, icmp_class
CT_KEY: Final = struct.Struct("<4s4sHHBBH")
# expires_ns, packets, bytes, rule_id, src_identity, dst_identity, flags, tcp_flags_seen, pad
CT_ENTRY: Final = struct.Struct("<QQQIIIBBH")
CT_QUOTA: Final = struct.Struct("<II")  # entries, refused

# lb.h: addresses and ports in network byte order, as bytes
LB_SERVICE_KEY: Final = struct.Struct("<4s2sBx")  # ip, port, protocol
# id, count, affinity_timeout, table_size, algorithm
LB_SERVICE_VALUE: Final = struct.Struct("<IIIIB3x")
LB_SLOT_KEY: Final = struct.Struct("<II")  # id, slot
LB_BACKEND: Final = struct.Struct("<4s2sBx")  # ip, port, flags
LB_MAGLEV_CHUNK_SLOTS: Final = 112  # bpf/lb.h LB_MAGLEV_CHUNK
LB_MAGLEV_CHUNK: Final = struct.Struct(f"<{LB_MAGLEV_CHUNK_SLOTS}I")  # backend id per slot
LB_NAT: Final = struct.Struct("<QIIB7x")  # expires_ns, backend_id, frontend_id, flags
LB_FRAG: Final = struct.Struct("<4sB3x")  # ip, reply

# overlay.h, nodeport.h
OVERLAY_CONFIG: Final = struct.Struct(
    "<4sIIHH"
)  # underlay_ip, vxlan_ifindex, mode, tunnel_port, pad
# underlay_ip, underlay_ifindex, nodeport low/high, snat low/high, masquerade
NP_CONFIG: Final = struct.Struct("<4sIHHHHB3x")
# expires_ns, backend_id, frontend_id, client_identity, snat_port, flags
NP_NAT: Final = struct.Struct("<QIII2sBx")

# events.h struct flow_event, native byte order (the kernel writes host-order integers)
FLOW_EVENT: Final = struct.Struct("=QBBBBBBBBIIIIIHHII")

# C struct name -> its layout, for the comparison with the compiled C
STRUCTS: Final[dict[str, struct.Struct]] = {
    "endpoint_info": ENDPOINT_INFO,
    "lxc_info": LXC_INFO,
    "ipcache_key": IPCACHE_KEY,
    "ipcache_value": IPCACHE_VALUE,
    "policy_key": POLICY_KEY,
    "policy_value": POLICY_VALUE,
    "ct_key": CT_KEY,
    "ct_entry": CT_ENTRY,
    "ct_quota": CT_QUOTA,
    "lb_service_key": LB_SERVICE_KEY,
    "lb_service_value": LB_SERVICE_VALUE,
    "lb_slot_key": LB_SLOT_KEY,
    "lb_backend": LB_BACKEND,
    "lb_maglev_chunk": LB_MAGLEV_CHUNK,
    "lb_nat": LB_NAT,
    "lb_frag": LB_FRAG,
    "overlay_config": OVERLAY_CONFIG,
    "np_config": NP_CONFIG,
    "np_nat": NP_NAT,
    "flow_event": FLOW_EVENT,
}
