/* Service load balancing (kube-proxy replacement): DNAT to a backend on the first packet of a
 * connection to a frontend, the choice remembered per connection; reverse NAT of the replies.
 * services/datapath/lb_sync.py writes these maps; keep the layouts in step with it.
 *
 * Included by datapath.c after its helpers (parse, drop), so that it can use them. */
#ifndef MEMBRANE_LB_H
#define MEMBRANE_LB_H

#ifndef LB_SERVICES_MAX
#define LB_SERVICES_MAX 131072
#endif
#ifndef LB_BACKENDS_MAX
#define LB_BACKENDS_MAX 262144
#endif
#ifndef LB_MAGLEV_MAX
#define LB_MAGLEV_MAX 262144 /* chunks: 29 M slots */
#endif
#define LB_MAGLEV_CHUNK 112
#ifndef LB_NAT_MAX
#define LB_NAT_MAX 65536
#endif

#define LB_ALG_RANDOM 0
#define LB_ALG_MAGLEV 1

struct lb_service_key {
	__u32 ip; /* network byte order */
	__u16 port; /* network byte order */
	__u8 protocol;
	__u8 pad;
};

struct lb_service_value {
	__u32 id; /* frontend id: reverse-NAT index, key of its slots and Maglev table */
	__u32 count; /* active backends: slots 0..count-1 */
	__u32 affinity_timeout; /* seconds; 0 = no session affinity */
	__u32 table_size; /* Maglev table size */
	__u8 algorithm;
	__u8 pad[3];
};

/* backend slots (random selection) and Maglev table chunks share this key */
struct lb_slot_key {
	__u32 id;
	__u32 slot; /* a Maglev table's chunk: slot / LB_MAGLEV_CHUNK */
};

/* LB_MAGLEV_CHUNK slots of a Maglev table per map entry: a hash entry costs the kernel 56
 * bytes besides its value and is allocated from 512-byte blocks when it is 505 bytes or more
 * with the allocator's 8, 256-byte ones below; one 4-byte slot per entry was 72 bytes a slot.
 * 112 slots make a 504-byte entry: 4.6 bytes a slot, and a lookup is still one map lookup */
struct lb_maglev_chunk {
	__u32 backend[LB_MAGLEV_CHUNK];
};

#define LB_BACKEND_TERMINATING 0x1

struct lb_backend {
	__u32 ip; /* network byte order */
	__u16 port; /* network byte order */
	__u8 flags;
	__u8 pad;
};

/* per connection, keyed by the original tuple (client -> frontend, scope CT_EGRESS). Both
 * records live as the connection's conntrack entry would (nat_lifetime), refreshed by its
 * packets: an expired one is ignored here and deleted by the agent's sweep, so a later
 * connection on the same tuple -- the client's port reused to reach the backend directly --
 * never has its replies rewritten to the frontend's address by an old record. */
struct lb_nat {
	__u64 expires_ns;
	__u32 backend_id;
	__u32 frontend_id;
	__u8 flags; /* CT_F_CLOSING */
	__u8 pad[7];
};

/* per connection, keyed by the reply tuple (backend -> client, scope CT_INGRESS): the
 * address the client connected to (a cluster IP, or any node's address for a node port) */
struct lb_rnat {
	__u64 expires_ns;
	__u32 ip; /* network byte order */
	__u16 port; /* network byte order */
	__u8 flags; /* CT_F_CLOSING */
	__u8 pad;
};

struct lb_affinity_key {
	__u32 client; /* network byte order */
	__u32 frontend_id;
};

struct lb_affinity {
	__u64 last_ns;
	__u32 backend_id;
	__u32 pad;
};

BPF_TABLE_PINNED("hash", struct lb_service_key, struct lb_service_value, lb_services,
		 LB_SERVICES_MAX, PIN_DIR "/lb_services", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, lb_backends, LB_BACKENDS_MAX,
		 PIN_DIR "/lb_backends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_slot_key, __u32, lb_slots, LB_BACKENDS_MAX,
		 PIN_DIR "/lb_slots", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_slot_key, struct lb_maglev_chunk, lb_maglev, LB_MAGLEV_MAX,
		 PIN_DIR "/lb_maglev", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_nat, lb_nat_map, LB_NAT_MAX,
		 PIN_DIR "/lb_nat");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_rnat, lb_rnat_map, LB_NAT_MAX,
		 PIN_DIR "/lb_rnat");
/* A connection's records are written to lb_nat_new / lb_rnat_new, as conntrack's first entry
 * goes to ct_new: its first answer moves them to lb_nat / lb_rnat, and only while the client
 * holds fewer than CT_ENDPOINT_MAX records there (lb_quota, counted like ct_quota). So a pod
 * opening connections nobody answers evicts only unanswered records, and a pod whose
 * connections are answered (a flood of DNS queries to a cluster IP) holds at most its share of
 * the answered ones: neither can evict another pod's records, whose loss would hand its
 * replies back with the backend's address. */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_nat, lb_nat_new, LB_NAT_MAX,
		 PIN_DIR "/lb_nat_new");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_rnat, lb_rnat_new, LB_NAT_MAX,
		 PIN_DIR "/lb_rnat_new");
BPF_TABLE_PINNED("hash", __u32, struct ct_quota, lb_quota, 65536, PIN_DIR "/lb_quota");

/* A fragmented datagram to a frontend: its first fragment is translated with the rest of the
 * connection's packets, the later ones (no ports) by (source, destination, IP id, protocol) ->
 * the address to write -- the backend's, or the frontend's on the way back. */
struct lb_frag {
	__u32 ip; /* network byte order */
	__u8 reply; /* 1: the source is rewritten (a reply), 0: the destination */
	__u8 pad[3];
};
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct lb_frag, lb_frags, FRAG_MAP_SIZE,
		 PIN_DIR "/lb_frags");

BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity, lb_affinity_map,
		 LB_NAT_MAX, PIN_DIR "/lb_affinity");

struct lb_l4 {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* network byte order, as in the packet */
	__u16 dport;
	__u8 protocol;
	__u8 syn; /* a pure SYN: a new connection */
	__u16 l4off;
	__u8 frag; /* the first fragment of a datagram: the rest follow without ports */
	__u8 pad;
	__u16 id; /* the IP id, as in the packet */
};

/* TCP or UDP over IPv4, whole or a first fragment: the traffic services take (node ports take
 * no fragment; later fragments are lb_frag_translate's) */
static __always_inline int lb_parse(struct __sk_buff *skb, struct lb_l4 *l)
{
	struct iphdr ip;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    ip.ihl < 5)
		return -1;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return -1;
	if (ip.frag_off & bpf_htons(0x1fff))
		return -1;
	l->frag = !!(ip.frag_off & bpf_htons(0x2000));
	l->id = ip.id;
	l->l4off = ETH_HLEN + ip.ihl * 4;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, l->l4off, ports, sizeof(ports)) < 0)
		return -1;
	l->saddr = ip.saddr;
	l->daddr = ip.daddr;
	l->sport = ports[0];
	l->dport = ports[1];
	l->protocol = ip.protocol;
	l->syn = 0;
	if (ip.protocol == IPPROTO_TCP) {
		__u8 flags;
		if (bpf_skb_load_bytes(skb, l->l4off + 13, &flags, 1) < 0)
			return -1;
		l->syn = (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	}
	return 0;
}

/* The packet's own tuple as a translation map's key (ports in host order, as in ct_key) */
static __always_inline struct ct_key lb_key(struct lb_l4 *l, __u8 scope)
{
	struct ct_key key = {
		.saddr = l->saddr,
		.daddr = l->daddr,
		.sport = bpf_ntohs(l->sport),
		.dport = bpf_ntohs(l->dport),
		.protocol = l->protocol,
		.scope = scope,
	};
	return key;
}

/* Rewrite one address (at addr_off) and one port (at port_off), fixing both checksums. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, struct lb_l4 *l, __u32 addr_off,
				      __u32 old_ip, __u32 new_ip, __u32 port_off, __u16 old_port,
				      __u16 new_port)
{
	__u32 csum_off = l->l4off + (l->protocol == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = l->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					mangled | BPF_F_PSEUDO_HDR | sizeof(new_ip)) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_ip,
					new_ip, sizeof(new_ip)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_ip, sizeof(new_ip), 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					mangled | sizeof(new_port)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
			return -1;
	}
	return 0;
}

/* The same on every node, so that Maglev sends a flow to the same backend wherever it enters. */
static __always_inline __u32 lb_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = (k << 15) | (k >> 17);
	h ^= k * 0x1b873593;
	return ((h << 13) | (h >> 19)) * 5 + 0xe6546b64;
}

static __always_inline __u32 lb_hash(struct lb_l4 *l)
{
	__u32 h = lb_mix(0x9e3779b9, l->saddr);
	h = lb_mix(h, l->daddr);
	h = lb_mix(h, ((__u32)l->sport << 16) | l->dport);
	h ^= l->protocol;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline int lb_usable(struct lb_backend *b)
{
	return b && !(b->flags & LB_BACKEND_TERMINATING);
}

static __always_inline __u32 lb_select(struct lb_service_value *svc, struct lb_l4 *l, __u64 now)
{
	struct lb_affinity_key akey = { .client = l->saddr, .frontend_id = svc->id };
	if (svc->affinity_timeout) {
		struct lb_affinity *a = lb_affinity_map.lookup(&akey);
		if (a && now - a->last_ns < (__u64)svc->affinity_timeout * NSEC &&
		    lb_usable(lb_backends.lookup(&a->backend_id))) {
			a->last_ns = now;
			return a->backend_id;
		}
	}
	struct lb_slot_key skey = { .id = svc->id };
	__u32 id;
	if (svc->algorithm == LB_ALG_MAGLEV && svc->table_size) {
		__u32 slot = lb_hash(l) % svc->table_size;
		skey.slot = slot / LB_MAGLEV_CHUNK;
		struct lb_maglev_chunk *chunk = lb_maglev.lookup(&skey);
		if (!chunk)
			return 0;
		__u32 index = slot % LB_MAGLEV_CHUNK;
		/* the compiler knows index < LB_MAGLEV_CHUNK, the verifier does not after a
		 * division by a number that is not a power of two: hide it, check it */
		asm volatile("" : "+r"(index));
		if (index >= LB_MAGLEV_CHUNK)
			return 0;
		id = chunk->backend[index];
	} else {
		skey.slot = bpf_get_prandom_u32() % svc->count;
		__u32 *slot_id = lb_slots.lookup(&skey);
		if (!slot_id)
			return 0;
		id = *slot_id;
	}
	if (!id)
		return 0;
	if (svc->affinity_timeout) {
		struct lb_affinity fresh = { .last_ns = now, .backend_id = id };
		lb_affinity_map.update(&akey, &fresh);
	}
	return id;
}

/* A translation record's lifetime, as its connection's conntrack entry's: a handshake not yet
 * answered as long as a UDP flow, an established TCP connection as long as its entry, one
 * that saw FIN or RST ten seconds. (Node ports' records too, nodeport.h.) */
static __always_inline __u64 nat_lifetime(struct lb_l4 *l, __u8 tcp_flags, __u8 *closing)
{
	if (l->protocol != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP;
	if (tcp_flags & (TCP_FIN | TCP_RST))
		*closing = CT_F_CLOSING;
	if (*closing)
		return CT_LIFETIME_CLOSE;
	return l->syn ? CT_LIFETIME_NONTCP : CT_LIFETIME_TCP;
}

static __always_inline void nat_refresh(__u64 *expires, __u8 *flags, struct lb_l4 *l,
					__u8 tcp_flags, __u64 now)
{
	__u8 closing = *flags & CT_F_CLOSING;
	__u64 lifetime = nat_lifetime(l, tcp_flags, &closing);
	if (closing != (*flags & CT_F_CLOSING))
		*flags |= CT_F_CLOSING;
	/* written at most once a second per record, unless closing shortens it */
	if (now + lifetime > *expires + NSEC || closing)
		*expires = now + lifetime;
}

static __always_inline __u8 nat_tcp_flags(struct __sk_buff *skb, struct lb_l4 *l)
{
	__u8 f = 0;
	if (l->protocol == IPPROTO_TCP)
		bpf_skb_load_bytes(skb, l->l4off + 13, &f, 1);
	return f;
}

/* A new choice of backend for a connection, remembered (lb_remember) only once the egress
 * policy let the translated packet through: a pod trying denied connections to a service
 * leaves no NAT state behind to evict others'. backend_id 0: nothing to remember. */
struct lb_choice {
	struct ct_key orig; /* client -> frontend, scope CT_EGRESS */
	struct ct_key reply; /* backend -> client, scope CT_INGRESS */
	struct lb_nat nat;
	struct lb_rnat rnat;
	__u32 backend_id;
};

/* The kernel's LRU evicts first what was never looked up since it was written: a fresh record,
 * waiting for its connection's answer, would go before a spray's records, which their own
 * retransmissions looked up. A lookup right after the write puts it on equal terms, so that
 * under a spray the unanswered map turns over oldest first. */
static __always_inline void lb_remember(struct lb_choice *c)
{
	lb_nat_new.update(&c->orig, &c->nat);
	lb_rnat_new.update(&c->reply, &c->rnat);
	lb_nat_new.lookup(&c->orig);
	lb_rnat_new.lookup(&c->reply);
}

/* A connection's record: the live one of the answered map, else the unanswered map's (a tuple
 * reused after its answered record expired has its new record there), else the expired one or
 * NULL. (bcc allows no map call in a macro: one such function per pair of maps.) */
static __always_inline struct lb_nat *lb_nat_find(struct ct_key *orig, __u64 now)
{
	struct lb_nat *a = lb_nat_map.lookup(orig);
	if (a && a->expires_ns >= now)
		return a;
	struct lb_nat *u = lb_nat_new.lookup(orig);
	return u ? u : a;
}

static __always_inline struct lb_rnat *lb_rnat_find(struct ct_key *reply, __u64 now,
						    int *unanswered)
{
	struct lb_rnat *a = lb_rnat_map.lookup(reply);
	if (a && a->expires_ns >= now)
		return a;
	struct lb_rnat *u = lb_rnat_new.lookup(reply);
	if (!u)
		return a;
	*unanswered = 1;
	return u;
}

/* May the local pod `client` hold one more answered translation record (lb_quota: its service
 * connections', and its masqueraded ones', nodeport.h)? Counts it if so. */
static __always_inline int lb_share_take(__u32 client)
{
	struct ct_quota *q = lb_quota.lookup(&client);
	if (!q) {
		struct ct_quota first = { .entries = 1 };
		lb_quota.update(&client, &first);
		return 1;
	}
	return quota_take(q);
}

/* An answer: the connection's records move to the answered maps, if the client's share of them
 * allows (else they stay where they are, evictable, and the connection goes on from there).
 * `r`, the reply record found in lb_rnat_new, is copied before it is deleted. */
static __always_inline void lb_promote(struct ct_key *reply, struct lb_rnat *r)
{
	struct ct_key orig = {
		.saddr = reply->daddr,
		.daddr = r->ip,
		.sport = reply->dport,
		.dport = bpf_ntohs(r->port),
		.protocol = reply->protocol,
		.scope = CT_EGRESS,
	};
	struct lb_nat *n = lb_nat_new.lookup(&orig);
	if (!n)
		return;
	if (!lb_share_take(reply->daddr))
		return;
	struct lb_nat nat = *n;
	struct lb_rnat rnat = *r;
	lb_rnat_map.update(reply, &rnat);
	lb_nat_map.update(&orig, &nat);
	lb_nat_new.delete(&orig);
	lb_rnat_new.delete(reply);
}

/* A first fragment, translated: the datagram's later fragments get the same address */
static __always_inline void lb_frag_first(struct lb_l4 *l, __u32 ip, __u8 reply)
{
	if (!l->frag)
		return;
	struct frag_key key = {
		.saddr = l->saddr, .daddr = l->daddr, .id = l->id, .protocol = l->protocol
	};
	struct lb_frag f = { .ip = ip, .reply = reply };
	lb_frags.update(&key, &f);
}

/* A later fragment of a datagram whose first fragment was translated: the same address is
 * written (the IP header's checksum fixed; the transport checksum, in the first fragment, was
 * fixed there for the whole datagram). Anything else is left alone. */
static __always_inline void lb_frag_translate(struct __sk_buff *skb, __u8 reply)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    !(ip.frag_off & bpf_htons(0x1fff)))
		return;
	struct frag_key key = {
		.saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .protocol = ip.protocol
	};
	struct lb_frag *f = lb_frags.lookup(&key);
	if (!f || f->reply != reply)
		return;
	__u32 old = reply ? ip.saddr : ip.daddr;
	__u32 fresh = f->ip;
	__u32 off = ETH_HLEN + (reply ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, fresh,
				sizeof(fresh)) < 0)
		return;
	bpf_skb_store_bytes(skb, off, &fresh, sizeof(fresh), 0);
}

/* from-container, before policy: a packet to a frontend goes to the connection's backend (the
 * one chosen on its first packet, or a new choice when that backend went away). The policy
 * and conntrack that follow see the backend's address, so policy applies to its identity. */
static __always_inline int lb_from_container(struct __sk_buff *skb, struct lb_choice *c)
{
	struct lb_l4 l;
	if (lb_parse(skb, &l) < 0) {
		lb_frag_translate(skb, 0);
		return TC_ACT_OK;
	}
	struct lb_service_key skey = { .ip = l.daddr, .port = l.dport, .protocol = l.protocol };
	struct lb_service_value *svc = lb_services.lookup(&skey);
	if (!svc)
		return TC_ACT_OK;
	/* a spoofed source must not leave NAT state behind: handle() drops the packet */
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	if (!ep || ep->ip != l.saddr)
		return TC_ACT_OK;
	struct ct_key orig = lb_key(&l, CT_EGRESS);
	__u64 now = bpf_ktime_get_coarse_ns();
	struct lb_backend *backend = NULL;
	__u32 backend_id = 0;
	struct lb_nat *nat = lb_nat_find(&orig, now);
	__u8 tcp_flags = nat_tcp_flags(skb, &l);
	if (nat && nat->frontend_id == svc->id && !l.syn && nat->expires_ns >= now) {
		backend_id = nat->backend_id;
		backend = lb_backends.lookup(&backend_id);
		if (backend)
			nat_refresh(&nat->expires_ns, &nat->flags, &l, tcp_flags, now);
	}
	if (!backend) {
		if (svc->count)
			backend_id = lb_select(svc, &l, now);
		backend = backend_id ? lb_backends.lookup(&backend_id) : NULL;
		if (!backend) {
			struct packet p = {};
			parse(skb, &p);
			return drop(DROP_NO_SERVICE, DIR_EGRESS, OBS_FROM_ENDPOINT, &p, ifindex,
				    ep->identity, 0, 0);
		}
		c->orig = orig;
		c->nat.backend_id = backend_id;
		c->nat.frontend_id = svc->id;
		nat_refresh(&c->nat.expires_ns, &c->nat.flags, &l, tcp_flags, now);
		c->rnat.expires_ns = c->nat.expires_ns;
		c->rnat.flags = c->nat.flags;
		c->reply.saddr = backend->ip;
		c->reply.daddr = l.saddr;
		c->reply.sport = bpf_ntohs(backend->port);
		c->reply.dport = bpf_ntohs(l.sport);
		c->reply.protocol = l.protocol;
		c->reply.scope = CT_INGRESS;
		c->rnat.ip = l.daddr;
		c->rnat.port = l.dport;
		c->backend_id = backend_id;
	}
	if (lb_rewrite(skb, &l, ETH_HLEN + offsetof(struct iphdr, daddr), l.daddr, backend->ip,
		       l.l4off + 2, l.dport, backend->port) < 0) {
		struct packet p = {};
		parse(skb, &p);
		return drop(DROP_INVALID, DIR_EGRESS, OBS_FROM_ENDPOINT, &p, ifindex, ep->identity, 0,
			    0);
	}
	lb_frag_first(&l, backend->ip, 0);
	return TC_ACT_OK;
}

#include "lb_icmp.h"

/* to-container, after policy: a reply from a backend is given the frontend's address back,
 * and so is an ICMP error about a connection to a frontend (lb_icmp.h). */
static __always_inline void lb_to_container(struct __sk_buff *skb)
{
	struct lb_l4 l;
	if (lb_parse(skb, &l) < 0) {
		lb_frag_translate(skb, 1);
		lb_icmp_error_to_container(skb);
		return;
	}
	struct ct_key reply = lb_key(&l, CT_INGRESS);
	int unanswered = 0;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct lb_rnat *r = lb_rnat_find(&reply, now, &unanswered);
	if (!r || r->expires_ns < now)
		return;
	nat_refresh(&r->expires_ns, &r->flags, &l, nat_tcp_flags(skb, &l), now);
	if (lb_rewrite(skb, &l, ETH_HLEN + offsetof(struct iphdr, saddr), l.saddr, r->ip, l.l4off,
		       l.sport, r->port) < 0)
		return;
	lb_frag_first(&l, r->ip, 1);
	if (unanswered)
		lb_promote(&reply, r);
}

#endif
