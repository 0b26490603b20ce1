"""What the datapath and the per-node L7 proxy agree on: the proxy's port and packet marks.

A policy entry whose port carries L7 rules is never an L4 allow: the datapath steers its
connections to the node's proxy (``bpf_sk_assign`` to the listener on ``PROXY_PORT`` in the
node's namespace), or drops them when no proxy listens there (Cilium's reason 178, "Socket
lookup failed"). The proxy's upstream connections carry ``MARK_FROM_PROXY`` and the source's
identity in the upper half of the mark, so that the datapath does not redirect them again and
applies the L3/L4 policy to the original source. A pod cannot forge the mark: the kernel clears
``skb->mark`` on packets that cross from a pod's namespace into the node's.
"""

from __future__ import annotations

from typing import Final

# one listener per node namespace; each node is its own namespace, so every node uses this port
PROXY_PORT: Final = 15001
# the DNS proxy: a UDP socket and a TCP listener on this port (bpf/proxy.h: DNS_PROXY_PORT)
DNS_PROXY_PORT: Final = 15053
# the listener's address: the datapath assigns connections to it whatever their destination,
# and no connection to one of the node's own addresses reaches it (bpf/proxy.h)
PROXY_LISTEN_ADDR: Final = "127.0.0.1"

MARK_MAGIC_MASK: Final = 0x0F00
# set by the datapath on packets it assigned to the proxy's socket: the node's policy route
# (fwmark MARK_TO_PROXY -> table PROXY_ROUTE_TABLE, "local 0.0.0.0/0 dev lo") delivers them
MARK_TO_PROXY: Final = 0x0200
# set by the proxy on its upstream sockets (SO_MARK), with the source identity << 16
MARK_FROM_PROXY: Final = 0x0B00
PROXY_ROUTE_TABLE: Final = 2004
PROXY_RULE_PRIORITY: Final = 9


def from_proxy_mark(identity: int) -> int:
    """The SO_MARK of an upstream connection on behalf of ``identity`` (world beyond 16 bits)."""
    return (identity if 0 < identity <= 0xFFFF else 2) << 16 | MARK_FROM_PROXY


def redirect_port(l7: list[dict[str, object]]) -> int:
    """The proxy port an allow with these L7 rules holds (0: none). DNS rules go to the DNS
    proxy, even ``matchPattern: "*"``, which restricts nothing but lets the proxy learn the
    names that toFQDNs rules select (as in Cilium)."""
    if not l7:
        return 0
    return DNS_PROXY_PORT if any("dns" in rule for rule in l7) else PROXY_PORT
