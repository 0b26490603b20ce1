/* membrane's per-node datapath: identity-aware L3/L4 policy with connection tracking.
 *
 * from_container: tc ingress of a pod's host-side veth (packets the pod sends);
 *                 enforces the pod's egress policy.
 * to_container:   tc egress of the same veth (packets delivered to the pod);
 *                 enforces the pod's ingress policy.
 *
 * Compiled once per agent; everything per endpoint lives in maps keyed by the veth ifindex. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#include "maps.h"
#include "drop_reasons.h"

#define ID_WORLD 2
#define ID_ADDRESS (1u << 31) /* a pod address's policy slot (shared/identities.py ADDRESS) */
#define ID_CLUSTER_MIN 256 /* also in overlay.h: identical definitions */
#define ID_LOCAL_BASE (1 << 24) /* node-local CIDR identities; also in nodeport.h */

#define NSEC 1000000000ULL
/* Cilium's: an established TCP connection 6 h, one not answered yet (SYN) 60 s, one closing
 * 10 s, anything else 60 s since its last packet */
#define CT_LIFETIME_TCP (21600 * NSEC)
#define CT_LIFETIME_SYN (60 * NSEC)
#define CT_LIFETIME_NONTCP (60 * NSEC)
#define CT_LIFETIME_CLOSE (10 * NSEC)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

struct packet {
	struct ct_key tuple; /* scope filled in by the caller */
	__u8 tcp_flags;
	__u8 icmp_related; /* an ICMP error about a connection; inner tuple in `inner` */
	__u16 policy_port; /* host order: L4 destination port, or the ICMP type */
	struct ct_key inner;
	__u32 len;
	__u8 opened; /* set by enforce(): this packet opened a connection (it made the ct entry) */
	__u8 redirect_ok; /* set by the caller: a tc ingress hook that can steer to the proxy */
	__u16 proxy_port; /* set by enforce(): the connection goes to the L7 proxy on this port */
	/* set by enforce(): the packet answers a connection a local pod opened and the proxy took
	 * over; coming from another node, it answers the proxy's upstream (made as that pod) */
	__u8 proxy_reply;
	__u32 proxy_identity; /* set by the caller: the client's, on the proxy's upstream packets */
};

static __always_inline int icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* the request a reply answers (timestamp, information, address mask), else the type itself */
static __always_inline __u8 icmp_request_type(__u8 type)
{
	return type == ICMP_TIMESTAMPREPLY || type == ICMP_INFO_REPLY || type == ICMP_ADDRESSREPLY
		       ? type - 1
		       : type;
}

static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto, __u32 *saddr,
				    __u32 *daddr, struct ct_key *t, __u8 *flags, __u16 *icmp_type)
{
	t->saddr = *saddr;
	t->daddr = *daddr;
	t->protocol = proto;
	t->sport = 0;
	t->dport = 0;
	t->icmp_class = 0;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		__u16 ports[2]; /* the first four bytes of all three headers */
		if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
			return -DROP_CT_INVALID_HDR;
		t->sport = bpf_ntohs(ports[0]);
		t->dport = bpf_ntohs(ports[1]);
		if (proto == IPPROTO_TCP && flags) {
			__u8 f;
			if (bpf_skb_load_bytes(skb, off + 13, &f, 1) < 0)
				return -DROP_CT_INVALID_HDR;
			*flags = f;
		}
	} else if (proto == IPPROTO_ICMP) {
		struct icmphdr icmp;
		if (bpf_skb_load_bytes(skb, off, &icmp, sizeof(icmp)) < 0)
			return -DROP_CT_INVALID_HDR;
		*icmp_type = icmp.type;
		/* echo: the id plays the source port of the request, so replies map back to it */
		if (icmp.type == ICMP_ECHO)
			t->sport = bpf_ntohs(icmp.un.echo.id);
		else if (icmp.type == ICMP_ECHOREPLY)
			t->dport = bpf_ntohs(icmp.un.echo.id);
		else if (!icmp_error(icmp.type))
			t->icmp_class = 0x100 | icmp_request_type(icmp.type);
	}
	return 0;
}

static __always_inline int parse_slow(struct __sk_buff *skb, struct packet *p)
{
	struct iphdr ip;
	__u16 icmp_type = 0;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return -DROP_INVALID;
	__u32 off = ETH_HLEN + ip.ihl * 4;
	p->len = skb->len;
	p->tcp_flags = 0;
	p->icmp_related = 0;
	struct frag_key fkey = {
		.saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .protocol = ip.protocol
	};
	/* a later fragment carries no ports: it is the rest of its first fragment's datagram,
	 * judged with that one's ports (frags, maps.h), never with ports 0 */
	if (ip.frag_off & bpf_htons(0x1fff)) {
		struct frag_ports *first = frags.lookup(&fkey);
		if (!first)
			return -DROP_FRAG_NOT_FOUND;
		p->tuple.saddr = ip.saddr;
		p->tuple.daddr = ip.daddr;
		p->tuple.protocol = ip.protocol;
		p->tuple.sport = first->sport;
		p->tuple.dport = first->dport;
		p->tuple.icmp_class = first->icmp_class;
		p->policy_port = first->policy_port;
		return 0;
	}
	int ret = parse_l4(skb, off, ip.protocol, &ip.saddr, &ip.daddr, &p->tuple, &p->tcp_flags,
			   &icmp_type);
	if (ret < 0)
		return ret;
	p->policy_port = ip.protocol == IPPROTO_ICMP ? icmp_type : p->tuple.dport;
	if (ip.frag_off & bpf_htons(0x2000)) { /* a first fragment: more follow */
		struct frag_ports ports = {
			.sport = p->tuple.sport,
			.dport = p->tuple.dport,
			.icmp_class = p->tuple.icmp_class,
			.policy_port = p->policy_port,
		};
		frags.update(&fkey, &ports);
	}
	if (ip.protocol == IPPROTO_ICMP && icmp_error(icmp_type)) {
		/* the error quotes the IP header and 8 bytes of the packet it is about */
		struct iphdr inner;
		__u32 ioff = off + sizeof(struct icmphdr);
		if (bpf_skb_load_bytes(skb, ioff, &inner, sizeof(inner)) < 0 || inner.ihl < 5)
			return 0;
		__u16 unused = 0;
		if (parse_l4(skb, ioff + inner.ihl * 4, inner.protocol, &inner.saddr, &inner.daddr,
			     &p->inner, NULL, &unused) == 0)
			p->icmp_related = 1;
	}
	return 0;
}

/* The common case -- TCP or UDP, no IP options, not a fragment, headers in the linear
 * part -- read in place; everything else goes through bpf_skb_load_bytes. */
static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->version != 4 ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return parse_slow(skb, p);
	p->len = skb->len;
	p->icmp_related = 0;
	p->tcp_flags = 0;
	p->tuple.saddr = ip->saddr;
	p->tuple.daddr = ip->daddr;
	p->tuple.protocol = ip->protocol;
	p->tuple.icmp_class = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);
		if ((void *)(th + 1) > data_end)
			return parse_slow(skb, p);
		p->tuple.sport = bpf_ntohs(th->source);
		p->tuple.dport = bpf_ntohs(th->dest);
		p->tcp_flags = ((__u8 *)th)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);
		if ((void *)(uh + 1) > data_end)
			return parse_slow(skb, p);
		p->tuple.sport = bpf_ntohs(uh->source);
		p->tuple.dport = bpf_ntohs(uh->dest);
	} else {
		return parse_slow(skb, p);
	}
	p->policy_port = p->tuple.dport;
	return 0;
}

static __always_inline void count(__u8 reason, __u8 direction, __u32 len)
{
	__u32 index = METRICS_INDEX(reason, direction);
	struct metrics_value *v = metrics.lookup(&index);
	if (v) {
		v->packets += 1; /* per-CPU: no atomics needed */
		v->bytes += len;
	}
}

static __always_inline void emit(__u8 type, __u8 reason, __u8 direction, __u8 obs,
				 struct packet *p, __u32 ifindex, __u32 src_id, __u32 dst_id,
				 __u32 rule_id, __u8 flags)
{
	struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->reason = reason;
	e->direction = direction;
	e->obs_point = obs;
	e->protocol = p->tuple.protocol;
	e->tcp_flags = p->tcp_flags;
	e->flags = flags;
	e->pad = 0;
	e->ifindex = ifindex;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->saddr = p->tuple.saddr;
	e->daddr = p->tuple.daddr;
	e->sport = p->tuple.sport;
	e->dport = p->tuple.dport;
	if (p->tuple.protocol == IPPROTO_ICMP) {
		e->sport = 0;
		e->dport = p->policy_port; /* show the ICMP type, as Hubble does */
	}
	e->rule_id = rule_id;
	e->len = p->len;
	/* no wake-up per event: it costs the sender microseconds (an IPI to the reader); the
	 * agent drains the ring on a short timer instead */
	events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline int drop(__u8 reason, __u8 direction, __u8 obs, struct packet *p,
				__u32 ifindex, __u32 src_id, __u32 dst_id, __u32 rule_id)
{
	count(reason, direction, p->len);
	emit(EVENT_DROP, reason, direction, obs, p, ifindex, src_id, dst_id, rule_id, 0);
	return TC_ACT_SHOT;
}

static __always_inline __u32 lookup_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .ip = addr };
	struct ipcache_value *v = ipcache.lookup(&key);
	return v ? v->identity : ID_WORLD;
}

/* The policy slot of a pod's *address* (shared/identities.py ADDRESS): rules with the
 * NetworkPolicy meaning of a CIDR (ipBlock) match pod addresses too, per address, through the
 * most specific policy prefix holding the address (world when none). Only for an address that
 * belongs to the pod identity the packet carries -- so a forged source address (a VNI paired
 * with someone else's address) matches no ipBlock. 0: no address slot. */
static __always_inline __u32 address_identity(__u32 addr, __u32 peer_id)
{
	if (peer_id < ID_CLUSTER_MIN || peer_id >= ID_LOCAL_BASE)
		return 0; /* not a pod: its address already is its identity */
	if (lookup_identity(addr) != peer_id)
		return 0;
	struct ipcache_key key = { .prefixlen = 32, .ip = addr };
	__u32 *id = prefixes.lookup(&key);
	return ID_ADDRESS | (id ? *id : ID_WORLD);
}

/* Longest-prefix lookups of (peer, proto, port), of the peer's address slot when it has one,
 * and of (any, proto, port); a deny from any wins, then an allow in that order (the most
 * specific names the rule). Returns 0 or a drop reason; `proxy_port` is the allow's L7 proxy
 * port (0: a plain L4 allow). */
static __always_inline int policy_check(__u32 endpoint, __u8 direction, __u32 peer,
					__u32 addr_peer, __u8 proto, __u16 port, __u32 *rule_id,
					__u16 *proxy_port)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.endpoint = bpf_htonl(endpoint),
		.direction = direction,
		.identity = bpf_htonl(peer),
		.protocol = proto,
		.port = bpf_htons(port),
	};
	struct policy_value *specific = policy.lookup(&key);
	struct policy_value *by_address = NULL;
	if (addr_peer) {
		key.identity = bpf_htonl(addr_peer);
		by_address = policy.lookup(&key);
	}
	key.identity = 0;
	struct policy_value *any = policy.lookup(&key);

	if (specific && specific->deny) {
		*rule_id = specific->rule_id;
		return DROP_POLICY_DENY;
	}
	if (by_address && by_address->deny) {
		*rule_id = by_address->rule_id;
		return DROP_POLICY_DENY;
	}
	if (any && any->deny) {
		*rule_id = any->rule_id;
		return DROP_POLICY_DENY;
	}
	if (specific) {
		*rule_id = specific->rule_id;
		*proxy_port = specific->proxy_port;
		return 0;
	}
	if (by_address) {
		*rule_id = by_address->rule_id;
		*proxy_port = by_address->proxy_port;
		return 0;
	}
	if (any) {
		*rule_id = any->rule_id;
		*proxy_port = any->proxy_port;
		return 0;
	}
	*rule_id = 0;
	return DROP_POLICY;
}

static __always_inline struct ct_entry *ct_lookup(struct ct_key *key, __u64 now)
{
	struct ct_entry *e = ct.lookup(key);
	if (e && e->expires_ns < now)
		return NULL;
	return e;
}

static __always_inline struct ct_entry *ct_new_lookup(struct ct_key *key, __u64 now)
{
	struct ct_entry *e = ct_new.lookup(key);
	if (e && e->expires_ns < now)
		return NULL;
	return e;
}

/* One more entry within an endpoint's share (CT_ENDPOINT_MAX)? Counts it, or the refusal. */
static __always_inline int quota_take(struct ct_quota *q)
{
	if (q->entries >= CT_ENDPOINT_MAX) {
		__sync_fetch_and_add(&q->refused, 1);
		return 0;
	}
	__sync_fetch_and_add(&q->entries, 1);
	return 1;
}

/* May the endpoint at `ep_ip` hold one more answered connection in ct (maps.h ct_quota)?
 * Counts it if so. */
static __always_inline int ct_quota_take(__u32 ep_ip)
{
	struct ct_quota *q = ct_quota.lookup(&ep_ip);
	if (!q) {
		struct ct_quota first = { .entries = 1 };
		ct_quota.update(&ep_ip, &first);
		return 1;
	}
	return quota_take(q);
}

/* A connection in either map, answered or not (for lookups that do not refresh) */
static __always_inline struct ct_entry *ct_tracked(struct ct_key *key, __u64 now)
{
	struct ct_entry *e = ct_lookup(key, now);
	return e ? e : ct_new_lookup(key, now);
}

/* An entry answers only for the identities it was made with: the local endpoint's (which a
 * relabel changes) and, when the packet carries it (a VNI, a node-port client), the peer's. So
 * a tuple reused by someone else -- a node port's SNAT port given to another client -- meets
 * policy as a new connection instead of riding the old one's verdict. `scope` is the entry's. */
static __always_inline int ct_owned(struct ct_entry *e, __u8 scope, __u32 own_id, __u32 peer_id)
{
	__u32 own = scope == CT_EGRESS ? e->src_identity : e->dst_identity;
	__u32 peer = scope == CT_EGRESS ? e->dst_identity : e->src_identity;
	return own == own_id && (!peer_id || peer == peer_id);
}

/* Counters are informational: plain adds (a lost increment under contention is acceptable;
 * a locked add on every packet is not). The expiry is written only when it moves by more
 * than a second, so that established traffic mostly reads the entry. `reply`: the packet is
 * the peer's answer, which makes a TCP connection established. */
static __always_inline void ct_refresh(struct ct_entry *e, struct packet *p, __u64 now,
				       int reply)
{
	__u64 lifetime = CT_LIFETIME_NONTCP;
	e->packets += 1;
	e->bytes += p->len;
	if (reply && !(e->flags & CT_F_REPLIED))
		e->flags |= CT_F_REPLIED;
	if (p->tuple.protocol == IPPROTO_TCP) {
		if ((e->tcp_flags_seen | p->tcp_flags) != e->tcp_flags_seen)
			e->tcp_flags_seen |= p->tcp_flags;
		if ((p->tcp_flags & (TCP_FIN | TCP_RST)) && !(e->flags & CT_F_CLOSING))
			e->flags |= CT_F_CLOSING;
		lifetime = (e->flags & CT_F_CLOSING) ? CT_LIFETIME_CLOSE
			   : (e->flags & CT_F_REPLIED) ? CT_LIFETIME_TCP
						       : CT_LIFETIME_SYN;
	}
	if (now + lifetime > e->expires_ns + NSEC || (e->flags & CT_F_CLOSING))
		e->expires_ns = now + lifetime;
}

/* A SYN on a tuple whose connection is closing opens a new connection: it must meet the
 * policy as it is now, not inherit the old connection's verdict. */
static __always_inline int pure_syn(struct packet *p)
{
	return p->tuple.protocol == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

static __always_inline int reopens(struct ct_entry *e, struct packet *p)
{
	return (e->flags & CT_F_CLOSING) && pure_syn(p);
}

static __always_inline void reverse(struct ct_key *dst, struct ct_key *src, __u8 scope)
{
	dst->saddr = src->daddr;
	dst->daddr = src->saddr;
	dst->sport = src->dport;
	dst->dport = src->sport;
	dst->protocol = src->protocol;
	dst->scope = scope;
	dst->icmp_class = src->icmp_class;
}

/* The Ethernet header of a frame about to enter a local pod: its MAC as the destination, the
 * host side of its veth as the source. Negative when the frame could not be written. */
static __always_inline int set_pod_eth(struct __sk_buff *skb, struct lxc_info *dst)
{
	struct ethhdr eth = {};
	__builtin_memcpy(eth.h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, dst->host_mac, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);
	return bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0);
}

/* The proxy port of a local destination's ingress entry for a new connection (0: none, or
 * the destination's own policy decides at to_container as usual). */
static __always_inline __u16 local_ingress_proxy(struct packet *p, __u32 src_id)
{
	__u32 daddr = p->tuple.daddr;
	struct lxc_info *dst = lxc.lookup(&daddr);
	if (!dst)
		return 0;
	__u32 dst_ifindex = dst->ifindex;
	struct endpoint_info *dep = endpoints.lookup(&dst_ifindex);
	if (!dep || !(dep->flags & EP_ENFORCE_INGRESS) || (dep->flags & EP_POLICY_FAILED))
		return 0;
	__u32 rule_id = 0;
	__u16 proxy_port = 0;
	__u32 addr_id = address_identity(p->tuple.saddr, src_id);
	if (policy_check(dst_ifindex, DIR_INGRESS, src_id, addr_id, p->tuple.protocol,
			 p->policy_port, &rule_id, &proxy_port))
		return 0;
	return proxy_port;
}

#include "proxy.h" /* L7: to_proxy(), from_proxy_identity() */

/* --- service load balancing (lb.h): DNAT before egress policy, reverse NAT after ingress --- */
#include "lb.h"
#include "overlay.h" /* multi-node: to_overlay, the from_overlay program */
#include "nodeport.h" /* node ports from outside the pod network: from_netdev */

/* A packet for a pod on this node goes straight to that pod's veth, where to_container
 * enforces its ingress policy: the node's routing and netfilter are skipped (as Cilium does).
 * Anything else takes the node's routing table. */
static __always_inline int forward(struct __sk_buff *skb, __u8 direction, struct packet *p)
{
	__u32 daddr = p->tuple.daddr;
	if (direction != DIR_EGRESS)
		return TC_ACT_OK;
	struct lxc_info *dst = lxc.lookup(&daddr);
	if (!dst) {
		int np = nodeport_reply(skb, p); /* nodeport.h: a reply to a node-port client */
		if (np >= 0)
			return np;
		/* overlay.h: another node's pod, in tunnel mode (or a pod's frame to a tunnel port,
		 * dropped) */
		int ret = to_overlay(skb, p);
		if (ret != TC_ACT_OK)
			return ret;
		np = masquerade(skb, p); /* nodeport.h: to the world, from the node's address */
		return np >= 0 ? np : TC_ACT_OK;
	}
	if (set_pod_eth(skb, dst) < 0)
		return TC_ACT_OK;
	return bpf_redirect(dst->ifindex, 0);
}

/* An ICMP error a local endpoint receives comes from the peer it sent the quoted packet to or
 * from a router on the way, which in this network is a node (host, remote-node). Anyone else
 * quoting the endpoint's connection forges the error: to break the connection, or to get ICMP
 * past policy. */
static __always_inline int icmp_error_from_path(struct packet *p)
{
	if (p->tuple.saddr == p->inner.daddr)
		return 1;
	__u32 id = lookup_identity(p->tuple.saddr);
	return id == ID_HOST || id == ID_REMOTE_NODE;
}

/* Conntrack and the endpoint's policy for one parsed packet: TC_ACT_OK when it may pass (the
 * caller then forwards or delivers it), else it is dropped here. `own` is the local endpoint's
 * scope (CT_EGRESS when it sends), `other` the scope in which its peer's side of the same
 * traffic is tracked. `peer_hint` is the peer's identity when the caller knows it (the VNI of a
 * packet from the overlay); 0 means "look it up in the ipcache". */
static __always_inline int enforce(struct packet *p, struct endpoint_info *ep, __u32 ifindex,
				   __u8 direction, __u8 obs, __u8 own, __u8 other, __u32 peer_hint)
{
	/* established traffic needs no ipcache lookup: conntrack first, the ipcache only when new.
	 * Conntrack lifetimes are seconds long: the coarse clock (a cached read) is enough. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 own_id = ep->identity;
	struct ct_key key = p->tuple;
	key.scope = own;
	struct ct_entry *e = ct_lookup(&key, now);
	/* an entry of this tuple that no longer applies (closing, or another identity's) goes
	 * when the packet opens a new connection */
	int stale = e != NULL;
	if (e && ct_owned(e, own, own_id, peer_hint) && !reopens(e, p)) {
		ct_refresh(e, p, now, 0);
		count(0, direction, p->len);
		p->proxy_port = e->proxy_port;
		return TC_ACT_OK;
	}
	/* a reply never opens: a SYN is a new connection even against a tracked one's
	 * direction, so it need not look for one */
	if (!pure_syn(p)) {
		struct ct_key rkey = {};
		reverse(&rkey, &p->tuple, other);
		e = ct_lookup(&rkey, now);
		if (e && ct_owned(e, other, own_id, peer_hint)) {
			ct_refresh(e, p, now, 1);
			count(0, direction, p->len);
			p->proxy_reply = e->proxy_port != 0;
			return TC_ACT_OK;
		}
		/* the first answer to a connection: established from now on, it moves to ct --
		 * unless the endpoint holds its quota of ct: then it goes on from ct_new, kept
		 * alive by its packets, at its own risk rather than other endpoints' */
		e = ct_new_lookup(&rkey, now);
		if (e && ct_owned(e, other, own_id, peer_hint)) {
			if (!ct_quota_take(ep->ip)) {
				ct_refresh(e, p, now, 0);
				count(0, direction, p->len);
				p->proxy_reply = e->proxy_port != 0;
				return TC_ACT_OK;
			}
			struct ct_entry up = *e;
			ct_refresh(&up, p, now, 1);
			ct.update(&rkey, &up);
			ct_new.delete(&rkey);
			count(0, direction, p->len);
			p->proxy_reply = up.proxy_port != 0;
			return TC_ACT_OK;
		}
	}
	/* a connection not answered yet: more of its packets (a SYN sent again, a stream of
	 * datagrams) */
	e = ct_new_lookup(&key, now);
	if (e && ct_owned(e, own, own_id, peer_hint) && !reopens(e, p)) {
		p->proxy_port = e->proxy_port;
		count(0, direction, p->len);
		/* the node's proxy answers a connection steered to it without passing here (its
		 * answers leave through the host or the overlay): the client's first packet after
		 * its SYN shows it was answered */
		if (e->proxy_port && !pure_syn(p) && ct_quota_take(ep->ip)) {
			struct ct_entry up = *e;
			ct_refresh(&up, p, now, 1);
			ct.update(&key, &up);
			ct_new.delete(&key);
			return TC_ACT_OK;
		}
		ct_refresh(e, p, now, 0);
		return TC_ACT_OK;
	}
	/* An ICMP error about a connection this endpoint is part of, in either role. The quoted
	 * packet must involve the endpoint itself -- sent by it (an error it receives) or to it
	 * (an error it sends back to the sender) -- or a pod could smuggle any ICMP past policy
	 * by quoting some other pod's connection. */
	if (p->icmp_related &&
	    (direction == DIR_INGRESS ? p->inner.saddr == ep->ip && icmp_error_from_path(p)
				      : p->inner.daddr == ep->ip && p->inner.saddr == p->tuple.daddr)) {
		struct ct_key ikey = p->inner;
		ikey.scope = other;
		if (ct_tracked(&ikey, now)) {
			count(0, direction, p->len);
			return TC_ACT_OK;
		}
		reverse(&ikey, &p->inner, own);
		if (ct_tracked(&ikey, now)) {
			count(0, direction, p->len);
			return TC_ACT_OK;
		}
	}

	/* a new connection */
	__u32 peer_id = peer_hint ? peer_hint
				  : lookup_identity(direction == DIR_EGRESS ? p->tuple.daddr
									    : p->tuple.saddr);
	__u32 src_id = direction == DIR_EGRESS ? ep->identity : peer_id;
	__u32 dst_id = direction == DIR_EGRESS ? peer_id : ep->identity;
	__u32 enforced = direction == DIR_EGRESS ? EP_ENFORCE_EGRESS : EP_ENFORCE_INGRESS;
	__u32 audit = direction == DIR_EGRESS ? EP_AUDIT_EGRESS : EP_AUDIT_INGRESS;
	__u32 rule_id = 0;
	__u16 proxy_port = 0;
	__u8 type = EVENT_TRACE;
	__u8 verdict = EVENT_F_ALLOWED;
	int reason = 0;
	if (ep->flags & EP_POLICY_FAILED)
		return drop(DROP_POLICY, direction, obs, p, ifindex, src_id, dst_id, 0);
	if (ep->flags & EP_POLICY_PENDING)
		return drop(DROP_EP_NOT_READY, direction, obs, p, ifindex, src_id, dst_id, 0);
	if (ep->flags & enforced) {
		__u32 addr_id = address_identity(
			direction == DIR_EGRESS ? p->tuple.daddr : p->tuple.saddr, peer_id);
		reason = policy_check(ifindex, direction, peer_id, addr_id, p->tuple.protocol,
				      p->policy_port, &rule_id, &proxy_port);
		/* L7 rules are enforced by the proxy or not at all: never an L4 allow, in audit
		 * mode neither (fail closed). The proxy's own upstream connection has been checked
		 * at L7: for it the entry is the L3/L4 allow. */
		if (proxy_port && p->proxy_identity) {
			proxy_port = 0;
			obs = OBS_FROM_PROXY;
		}
		/* DNS rules are egress only: this is from_container, at tc ingress, which can steer
		 * UDP and TCP to the DNS proxy whatever the destination */
		if (proxy_port && !p->redirect_ok &&
		    !(proxy_port == DNS_PROXY_PORT && direction == DIR_EGRESS))
			return drop(DROP_PROXY_UNSUPPORTED, direction, obs, p, ifindex, src_id, dst_id,
				    rule_id);
		if (reason && !(ep->flags & audit))
			return drop(reason, direction, obs, p, ifindex, src_id, dst_id, rule_id);
		if (reason)
			verdict = EVENT_F_AUDIT; /* let through, but say what would have happened */
		type = EVENT_POLICY_VERDICT;
	}
	/* a local destination whose ingress has L7 rules: the proxy, here at tc ingress, since
	 * its to_container (tc egress) could not steer the connection there */
	if (!proxy_port && p->redirect_ok && direction == DIR_EGRESS)
		proxy_port = local_ingress_proxy(p, src_id);
	if (proxy_port) {
		p->proxy_port = proxy_port;
		obs = OBS_TO_PROXY;
	}
	struct ct_entry fresh = {
		.packets = 1,
		.bytes = p->len,
		.rule_id = rule_id,
		.src_identity = src_id,
		.dst_identity = dst_id,
		.tcp_flags_seen = p->tcp_flags,
		.proxy_port = proxy_port,
	};
	fresh.expires_ns =
		now + (p->tuple.protocol == IPPROTO_TCP ? CT_LIFETIME_SYN : CT_LIFETIME_NONTCP);
	if (stale)
		ct.delete(&key);
	ct_new.update(&key, &fresh);
	p->opened = 1;
	count(0, direction, p->len);
	emit(type, reason, direction, obs, p, ifindex, src_id, dst_id, rule_id, verdict);
	return TC_ACT_OK;
}

/* Shared by both directions of a pod's veth. */
static __always_inline int handle(struct __sk_buff *skb, __u8 direction, __u8 obs, __u8 own,
				  __u8 other, struct lb_choice *lb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	struct packet p = {};

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		p.len = skb->len;
		count(DROP_UNSUPPORTED_L3, direction, skb->len);
		emit(EVENT_DROP, DROP_UNSUPPORTED_L3, direction, obs, &p, ifindex, 0, 0, 0, 0);
		return TC_ACT_SHOT;
	}
	int ret = parse(skb, &p);
	if (ret < 0)
		return drop(-ret, direction, obs, &p, ifindex, 0, 0, 0);

	/* an endpoint the agent has not configured (or one being torn down) gets nothing */
	if (!ep)
		return drop(DROP_NO_CONFIG, direction, obs, &p, ifindex, 0, 0, 0);
	/* a pod may only send from its own address */
	if (direction == DIR_EGRESS && p.tuple.saddr != ep->ip)
		return drop(DROP_INVALID_SIP, direction, obs, &p, ifindex, ep->identity, 0, 0);
	__u32 peer_hint = 0;
	if (direction == DIR_EGRESS) {
		/* tc ingress: any TCP destination can be steered; the proxy's upstream to another
		 * node's pod leaves as this pod, and from_overlay / from_netdev hand the answers back
		 * to it (proxy_reply) */
		p.redirect_ok = p.tuple.protocol == IPPROTO_TCP;
	} else {
		p.proxy_identity = from_proxy_identity(skb);
		peer_hint = p.proxy_identity;
	}
	ret = enforce(&p, ep, ifindex, direction, obs, own, other, peer_hint);
	if (ret != TC_ACT_OK)
		return ret;
	if (lb && lb->backend_id) /* lb.h: the service translation's state, once allowed */
		lb_remember(lb);
	if (p.proxy_port)
		return to_proxy(skb, &p, direction, OBS_TO_PROXY, ifindex, ep->identity, 0);
	return forward(skb, direction, &p);
}

int from_container(struct __sk_buff *skb)
{
	struct lb_choice lb = {};
	int ret = lb_from_container(skb, &lb);
	if (ret != TC_ACT_OK)
		return ret;
	return handle(skb, DIR_EGRESS, OBS_FROM_ENDPOINT, CT_EGRESS, CT_INGRESS, &lb);
}

int to_container(struct __sk_buff *skb)
{
	if (delivered_from_overlay(skb)) /* overlay.h: from_overlay enforced (and un-NATed) it */
		return TC_ACT_OK;
	int ret = handle(skb, DIR_INGRESS, OBS_TO_ENDPOINT, CT_INGRESS, CT_EGRESS, NULL);
	if (ret == TC_ACT_OK)
		lb_to_container(skb);
	return ret;
}
