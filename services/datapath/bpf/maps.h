/* Map layouts shared by the programs and by shared/bpf_layouts.py (tests/integration/
 * test_bpf_layouts.py compares the two).
 * Every map is pinned under PIN_DIR, so a restarted agent reopens the same maps and the
 * programs that tc keeps attached go on using them in the meantime. */
#ifndef MEMBRANE_MAPS_H
#define MEMBRANE_MAPS_H

#include "events.h"

#ifndef PIN_DIR
#error "PIN_DIR must be defined (the per-node bpffs directory)"
#endif
#ifndef CT_MAP_SIZE
#define CT_MAP_SIZE 65536
#endif
#ifndef CT_ENDPOINT_MAX
#define CT_ENDPOINT_MAX (CT_MAP_SIZE / 2)
#endif
#ifndef EVENTS_BYTES
#define EVENTS_BYTES (8 << 20)
#endif

/* endpoint flags */
#define EP_ENFORCE_INGRESS 0x1
#define EP_ENFORCE_EGRESS 0x2
/* the agent could not install this endpoint's policy: deny everything (fail closed) */
#define EP_POLICY_FAILED 0x4
/* audit mode per direction: what policy would deny is allowed and reported as AUDIT */
#define EP_AUDIT_INGRESS 0x8
#define EP_AUDIT_EGRESS 0x10
/* the identity's resolved policy has not arrived yet (not even "no policy selects it"): new
 * connections are dropped (203) until it does, never let through unenforced */
#define EP_POLICY_PENDING 0x20

/* keyed by the host-side veth ifindex, which is also the endpoint id in the policy map */
struct endpoint_info {
	__u32 identity;
	__u32 ip; /* network byte order */
	__u32 flags;
	__u32 pad;
};

/* local endpoints by address, for delivery straight to their veth (no routing in between) */
struct lxc_info {
	__u32 ifindex; /* host side of the pod's veth */
	__u8 mac[6]; /* the pod's interface */
	__u8 host_mac[6]; /* the host side's */
};

struct ipcache_key {
	__u32 prefixlen;
	__u32 ip; /* network byte order */
};

struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* node underlay address, network byte order; 0 = local/none */
};

/* LPM over (endpoint, direction, identity, protocol, port); see policy_compiler.py */
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint; /* network byte order, so that LPM bit order is the field order */
	__u8 direction;
	__u8 pad[3];
	__u32 identity; /* network byte order; 0 = any */
	__u8 protocol; /* 0 = any */
	__u8 pad2;
	__u16 port; /* network byte order */
};

#define POLICY_FULL_PREFIX 128

struct policy_value {
	__u32 rule_id;
	__u8 deny;
	__u8 pad;
	/* host order; non-zero: the port carries L7 rules, its connections go to the node's
	 * proxy listening there and are never an L4 allow (shared/proxy.py) */
	__u16 proxy_port;
};

#define CT_EGRESS 1 /* opened by a local endpoint (from-container) */
#define CT_INGRESS 2 /* accepted by a local endpoint (to-container) */

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 scope; /* CT_EGRESS | CT_INGRESS */
	/* ICMP other than echo and errors: 0x100 | the request's type (a reply's class is its
	 * request's), so that one kind of ICMP exchange never answers for another; else 0 */
	__u16 icmp_class;
};

#define CT_F_CLOSING 0x1
#define CT_F_REPLIED 0x2 /* the peer answered: an established connection */

struct ct_entry {
	__u64 expires_ns; /* bpf_ktime_get_ns() deadline */
	__u64 packets;
	__u64 bytes;
	__u32 rule_id; /* the rule that allowed the connection (0: not enforced) */
	__u32 src_identity;
	__u32 dst_identity;
	__u8 flags;
	__u8 tcp_flags_seen;
	__u16 proxy_port; /* host order; non-zero: the connection goes to the L7 proxy */
};

BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints, 65536, PIN_DIR "/endpoints");
BPF_TABLE_PINNED("hash", __u32, struct lxc_info, lxc, 65536, PIN_DIR "/lxc");
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, 524288,
		 PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
/* every prefix a policy names -> its CIDR identity, whoever owns the addresses in it: the
 * ipcache answers who an address is, this map which policy prefix holds a pod address (for
 * the NetworkPolicy meaning of CIDR rules, see address_identity in datapath.c) */
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, __u32, prefixes, 65536, PIN_DIR "/prefixes",
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, policy, 1048576,
		 PIN_DIR "/policy", BPF_F_NO_PREALLOC);
/* Connections are tracked in two LRU maps: one not answered yet (a lone SYN, a datagram without
 * a reply) lives in ct_new, a short while (CT_LIFETIME_SYN / _NONTCP); its first answer moves
 * it to ct. So a pod spraying SYNs or datagrams evicts only unanswered entries -- whose loss
 * costs a policy check on their next packet -- never another pod's established connection,
 * whose loss would drop its peer's next packet as a new connection. */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct, CT_MAP_SIZE, PIN_DIR "/ct");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct_new, CT_MAP_SIZE,
		 PIN_DIR "/ct_new");
/* And a pod whose peers answer (a connection flood) may hold at most CT_ENDPOINT_MAX entries
 * of ct: past it, its further answered connections stay in ct_new (short-lived while idle,
 * evictable), so it cannot evict other endpoints' established connections either. Keyed by
 * the endpoint's address: counted up here on each move to ct, recounted exactly by the agent's
 * sweep (services/datapath/conntrack.py), since deletions and LRU evictions are not seen
 * here. `refused`: moves refused for the quota, a counter (the agent exports it). */
struct ct_quota {
	__u32 entries;
	__u32 refused;
};
BPF_TABLE_PINNED("hash", __u32, struct ct_quota, ct_quota, 65536, PIN_DIR "/ct_quota");

/* IPv4 fragments: a non-first fragment carries no ports. The first one's ports are kept by
 * (source, destination, IP id, protocol), and the later ones are judged with them -- as the
 * rest of the datagram they are -- or dropped (175) when the first was never seen. */
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 protocol;
	__u8 pad;
};

struct frag_ports {
	__u16 sport; /* host order, as in struct ct_key */
	__u16 dport;
	__u16 icmp_class;
	__u16 policy_port;
};

#ifndef FRAG_MAP_SIZE
#define FRAG_MAP_SIZE 8192
#endif
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_ports, frags, FRAG_MAP_SIZE,
		 PIN_DIR "/frags");
BPF_TABLE_PINNED("percpu_array", __u32, struct metrics_value, metrics, METRICS_ENTRIES,
		 PIN_DIR "/metrics");
/* events the ring buffer could not take */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lost_events, 1, PIN_DIR "/lost_events");

/* bcc has no pinned variant of BPF_RINGBUF_OUTPUT; this is its expansion with a pin path */
struct events_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/events"))) struct events_table_t events = {
	.max_entries = EVENTS_BYTES
};

#endif
