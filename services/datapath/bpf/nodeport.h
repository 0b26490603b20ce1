/* NodePort from outside the pod network (kube-proxy's and Cilium's externalTrafficPolicy:
 * Cluster): a client that is not a pod -- another node's host, any host on the underlay --
 * connects to <this node's underlay address>:<nodePort>.
 *
 * from_netdev:    tc ingress of the node's underlay device. A packet for one of this node's
 *                 node-port frontends (lb_services, written by lb_sync.py for every node
 *                 address) gets a backend -- the same selection as from_container (lb_select:
 *                 random or Maglev, session affinity) -- and is translated twice: DNAT to the
 *                 backend, SNAT to this node's address and a port of its own (NP_SNAT_MIN..MAX),
 *                 so that the reply comes back through this node. A local backend is delivered
 *                 straight into its pod (its ingress policy enforced here with the client's
 *                 identity, as from_overlay does); a backend on another node is reached through
 *                 the VXLAN device in both routing modes (VNI = the client's identity, judged by
 *                 the backend's node), one outside the pod network through the routing table.
 *                 A reply from a backend
 *                 on another node arrives here too (to this node's address and SNAT port): it
 *                 is translated back and sent out of the underlay device to the client.
 * nodeport_reply: called by forward() (from_container) for a packet leaving a local pod for
 *                 something that is not a local pod: a local backend's reply, translated back
 *                 and sent out of the underlay device the same way.
 *
 * Forged packets are dropped first (overlay.h underlay_forged: a pod's address claimed from the
 * underlay). Everything else on the device passes untouched: only TCP/UDP to this node's address on a
 * port in the node-port range (one lb_services lookup) or in the SNAT range (one np_rnat
 * lookup) is looked at; the rest costs a config read and a header check. */
#ifndef MEMBRANE_NODEPORT_H
#define MEMBRANE_NODEPORT_H

#ifndef NP_NAT_MAX
#define NP_NAT_MAX 65536
#endif

#define ID_HOST 1
#define ID_LOCAL_BASE (1 << 24) /* node-local CIDR identities */
#define NP_SNAT_TRIES 8

/* written by the agent (services/datapath/nodeport.py); one entry. Ports in host order. */
struct np_config {
	__u32 underlay_ip; /* network byte order; 0 = not configured: everything passes */
	__u32 underlay_ifindex;
	__u16 nodeport_min;
	__u16 nodeport_max;
	__u16 snat_min;
	__u16 snat_max;
	__u8 masquerade; /* pods' connections to the world leave from underlay_ip (masquerade) */
	__u8 pad[3];
};

/* per connection, keyed by the original tuple (client -> this node : nodePort, scope 0). A
 * masqueraded connection (a local pod to the world, masquerade()) has one too, keyed pod ->
 * peer, with backend_id 0: its SNAT port comes from the same range, and its reply from the
 * same np_rnat (frontend = the peer, client = the pod) */
struct np_nat {
	__u64 expires_ns;
	__u32 backend_id;
	__u32 frontend_id;
	__u32 client_identity;
	__u16 snat_port; /* network byte order */
	__u8 flags; /* CT_F_CLOSING */
	__u8 pad;
};

/* per connection, keyed by the translated reply tuple (backend -> this node : SNAT port,
 * scope 0): where the reply goes and what it must look like */
struct np_rnat {
	__u64 expires_ns;
	__u32 client_ip; /* network byte order */
	__u32 frontend_ip;
	__u16 client_port; /* network byte order */
	__u16 frontend_port;
	__u8 flags;
	__u8 pad[3];
};

/* bcc's declaration of this helper lacks the kernel's `plen` argument (flags would land in
 * its place and the real flags register stay unset): declared here as the kernel has it */
static long (*np_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

BPF_TABLE_PINNED("array", __u32, struct np_config, np_config, 1, PIN_DIR "/np_config");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct np_nat, np_nat_map, NP_NAT_MAX,
		 PIN_DIR "/np_nat");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct np_rnat, np_rnat_map, NP_NAT_MAX,
		 PIN_DIR "/np_rnat");
/* A new connection's records go here first, as conntrack's go to ct_new (lb.h does the same
 * for cluster IPs): for a backend behind another node they are written before that node's
 * policy has judged the client, so a spray of connections its policy denies -- or that nobody
 * answers -- must evict only other unanswered records. The backend's first answer moves them
 * to np_nat / np_rnat (np_reply). */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct np_nat, np_nat_new, NP_NAT_MAX,
		 PIN_DIR "/np_nat_new");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct np_rnat, np_rnat_new, NP_NAT_MAX,
		 PIN_DIR "/np_rnat_new");

/* The original tuple (np_nat's key) of the connection a reply record belongs to */
static __always_inline struct ct_key np_orig(struct np_rnat *r, __u8 protocol)
{
	struct ct_key key = {
		.saddr = r->client_ip,
		.daddr = r->frontend_ip,
		.sport = bpf_ntohs(r->client_port),
		.dport = bpf_ntohs(r->frontend_port),
		.protocol = protocol,
	};
	return key;
}

/* as lb_nat_find / lb_rnat_find */
static __always_inline struct np_nat *np_nat_find(struct ct_key *orig, __u64 now)
{
	struct np_nat *a = np_nat_map.lookup(orig);
	if (a && a->expires_ns >= now)
		return a;
	struct np_nat *u = np_nat_new.lookup(orig);
	return u ? u : a;
}

static __always_inline struct np_rnat *np_rnat_find(struct ct_key *reply, __u64 now,
						    int *unanswered)
{
	struct np_rnat *a = np_rnat_map.lookup(reply);
	if (a && a->expires_ns >= now)
		return a;
	struct np_rnat *u = np_rnat_new.lookup(reply);
	if (!u)
		return a;
	*unanswered = 1;
	return u;
}

/* The backend answered: the connection's records move to the answered maps */
static __always_inline void np_promote(struct ct_key *reply, struct np_rnat *rnat)
{
	struct ct_key orig = np_orig(rnat, reply->protocol);
	struct np_nat *n = np_nat_new.lookup(&orig);
	if (!n)
		return;
	/* a pod's masqueraded connection: within the pod's share, as its service connections */
	if (!n->backend_id && !lb_share_take(rnat->client_ip))
		return;
	struct np_nat nat = *n;
	np_rnat_map.update(reply, rnat);
	np_nat_map.update(&orig, &nat);
	np_nat_new.delete(&orig);
	np_rnat_new.delete(reply);
}

static __always_inline struct np_config *np_cfg(void)
{
	__u32 zero = 0;
	struct np_config *cfg = np_config.lookup(&zero);
	return cfg && cfg->underlay_ip ? cfg : NULL;
}

/* Rewrite a packet's source and destination (address and port each), checksums fixed. */
static __always_inline int np_rewrite(struct __sk_buff *skb, struct lb_l4 *l, __u32 saddr,
				      __u16 sport, __u32 daddr, __u16 dport)
{
	if (lb_rewrite(skb, l, ETH_HLEN + offsetof(struct iphdr, daddr), l->daddr, daddr,
		       l->l4off + 2, l->dport, dport) < 0)
		return -1;
	return lb_rewrite(skb, l, ETH_HLEN + offsetof(struct iphdr, saddr), l->saddr, saddr,
			  l->l4off, l->sport, sport);
}

/* A translated reply leaves through the underlay device; the neighbour subsystem fills in the
 * Ethernet header (the kernel's own forwarding would refuse a packet with a local source). */
static __always_inline int np_reply(struct __sk_buff *skb, struct lb_l4 *l,
				    struct np_config *cfg)
{
	struct ct_key key = lb_key(l, 0);
	__u64 now = bpf_ktime_get_coarse_ns();
	int unanswered = 0;
	struct np_rnat *r = np_rnat_find(&key, now, &unanswered);
	if (!r || r->expires_ns < now)
		return -1;
	nat_refresh(&r->expires_ns, &r->flags, l, nat_tcp_flags(skb, l), now);
	struct np_rnat rnat = *r; /* r goes with np_promote */
	if (unanswered)
		np_promote(&key, &rnat);
	if (np_rewrite(skb, l, rnat.frontend_ip, rnat.frontend_port, rnat.client_ip,
		       rnat.client_port) < 0)
		return TC_ACT_SHOT;
	/* a masqueraded connection's answer: the node routes it to its pod, whose to_container
	 * judges it (conntrack: the answer of the pod's own connection) */
	__u32 client = rnat.client_ip;
	if (lxc.lookup(&client))
		return TC_ACT_OK;
	count(0, DIR_EGRESS, skb->len);
	return np_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* from_container (forward()): a local backend's reply to a node-port client. -1: not one. */
static __always_inline int nodeport_reply(struct __sk_buff *skb, struct packet *p)
{
	struct np_config *cfg = np_cfg();
	if (!cfg || p->tuple.daddr != cfg->underlay_ip || p->tuple.dport < cfg->snat_min ||
	    p->tuple.dport > cfg->snat_max ||
	    (p->tuple.protocol != IPPROTO_TCP && p->tuple.protocol != IPPROTO_UDP))
		return -1;
	struct lb_l4 l;
	if (lb_parse(skb, &l) < 0 || l.frag)
		return -1;
	return np_reply(skb, &l, cfg);
}

/* A port of this node for the translated connection: free when no reply tuple holds it, or
 * the one holding it expired and so did its connection. Tried from a hash of the client's
 * tuple, NP_SNAT_TRIES times. When none is free, a port held by a connection that has waited
 * longer than NP_SNAT_PATIENCE for its first answer is taken over (its client's record goes):
 * otherwise a host spraying SYNs at a node port would hold every port towards a backend for a
 * SYN's lifetime, and nobody could connect to it meanwhile. 0: none. */
#define NP_SNAT_PATIENCE (3 * NSEC)

static __always_inline __u16 np_snat_port(struct np_config *cfg, struct lb_l4 *l,
					  struct lb_backend *b, __u64 now)
{
	__u32 range = (__u32)cfg->snat_max - cfg->snat_min + 1;
	__u32 h = lb_hash(l);
	struct ct_key rkey = {
		.saddr = b->ip,
		.daddr = cfg->underlay_ip,
		.sport = bpf_ntohs(b->port),
		.protocol = l->protocol,
	};
	__u16 waited = 0; /* a port whose connection has waited too long for an answer */
	struct ct_key waiting = {};
#pragma unroll
	for (int i = 0; i < NP_SNAT_TRIES; i++) {
		__u16 port = cfg->snat_min + (h + i * 7919) % range;
		rkey.dport = port;
		int unanswered = 0;
		struct np_rnat *r = np_rnat_find(&rkey, now, &unanswered);
		if (!r)
			return port;
		struct ct_key okey = np_orig(r, l->protocol);
		if (r->expires_ns >= now) {
			/* an unanswered record is never refreshed: it was written at expiry - 60 s */
			if (!waited && unanswered &&
			    r->expires_ns + NP_SNAT_PATIENCE <= now + CT_LIFETIME_NONTCP) {
				waited = port;
				waiting = okey;
			}
			continue;
		}
		struct np_nat *n = np_nat_find(&okey, now);
		if (!n || n->expires_ns < now || n->snat_port != bpf_htons(port))
			return port;
	}
	if (waited) {
		struct np_nat *n = np_nat_new.lookup(&waiting);
		if (n && n->snat_port == bpf_htons(waited))
			np_nat_new.delete(&waiting); /* its next packet is a new connection */
	}
	return waited;
}

/* forward() (from_container, after the pod's egress policy): a pod's TCP or UDP to an address
 * outside the cluster (world, or a CIDR identity) leaves from this node's underlay address and a
 * port of the SNAT range, as Cilium's BPF masquerading does: nothing outside knows the pod
 * ranges, and in tunnel mode a plain packet to a local pod from the underlay is forged
 * (underlay_forged). The answer comes back to that address and port, and np_reply translates
 * it back. -1: not masqueraded (not configured, not the world, a fragment, ICMP). */
static __always_inline int masquerade(struct __sk_buff *skb, struct packet *p)
{
	struct np_config *cfg = np_cfg();
	if (!cfg || !cfg->masquerade ||
	    (p->tuple.protocol != IPPROTO_TCP && p->tuple.protocol != IPPROTO_UDP))
		return -1;
	__u32 id = lookup_identity(p->tuple.daddr);
	if (id != ID_WORLD && id < ID_LOCAL_BASE)
		return -1;
	struct lb_l4 l;
	if (lb_parse(skb, &l) < 0 || l.frag)
		return -1;
	struct ct_key orig = lb_key(&l, 0);
	__u64 now = bpf_ktime_get_coarse_ns();
	__u8 tcp_flags = p->tcp_flags;
	__u16 snat_port = 0;
	struct np_nat *nat = np_nat_find(&orig, now);
	if (nat && !nat->backend_id && nat->expires_ns >= now &&
	    !(l.syn && (nat->flags & CT_F_CLOSING))) {
		snat_port = nat->snat_port;
		nat_refresh(&nat->expires_ns, &nat->flags, &l, tcp_flags, now);
	} else {
		struct lb_backend peer = { .ip = l.daddr, .port = l.dport };
		__u16 port = np_snat_port(cfg, &l, &peer, now);
		if (!port)
			return drop(DROP_NAT_NO_MAPPING, DIR_EGRESS, OBS_FROM_ENDPOINT, p,
				    skb->ifindex, lookup_identity(l.saddr), id, 0);
		snat_port = bpf_htons(port);
		struct np_nat fresh = { .snat_port = snat_port };
		nat_refresh(&fresh.expires_ns, &fresh.flags, &l, tcp_flags, now);
		struct np_rnat rfresh = {
			.expires_ns = fresh.expires_ns,
			.client_ip = l.saddr,
			.client_port = l.sport,
			.frontend_ip = l.daddr,
			.frontend_port = l.dport,
		};
		struct ct_key reply = {
			.saddr = l.daddr,
			.daddr = cfg->underlay_ip,
			.sport = bpf_ntohs(l.dport),
			.dport = port,
			.protocol = l.protocol,
		};
		/* as a node port's: among the unanswered records until the peer answers */
		np_rnat_new.update(&reply, &rfresh);
		np_nat_new.update(&orig, &fresh);
		np_rnat_new.lookup(&reply);
		np_nat_new.lookup(&orig);
	}
	if (lb_rewrite(skb, &l, ETH_HLEN + offsetof(struct iphdr, saddr), l.saddr, cfg->underlay_ip,
		       l.l4off, l.sport, snat_port) < 0)
		return TC_ACT_SHOT;
	/* the kernel's forwarding would refuse a packet with its own source address */
	return np_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* Who the client is: the ipcache says, but only identities that can stand outside the pod
 * network are believed from the underlay. A packet claiming this node's own address or a
 * pod's is forged: pods reach node ports through their own node's from_container. */
static __always_inline int np_client_identity(__u32 saddr, __u32 *id)
{
	*id = lookup_identity(saddr);
	return *id == ID_WORLD || *id == ID_REMOTE_NODE || *id >= ID_LOCAL_BASE;
}

/* Hand the translated packet to its backend. Returns a tc verdict. */
static __always_inline int np_deliver(struct __sk_buff *skb, struct np_config *cfg,
				      struct packet *p, __u32 client_id, int opened)
{
	__u32 daddr = p->tuple.daddr;
	__u32 ifindex = skb->ifindex;
	struct lxc_info *dst = lxc.lookup(&daddr);
	if (dst) {
		/* a local pod: its ingress policy with the client's identity, then straight in */
		__u32 dst_ifindex = dst->ifindex;
		struct endpoint_info *ep = endpoints.lookup(&dst_ifindex);
		if (!ep)
			return drop(DROP_NO_CONFIG, DIR_INGRESS, OBS_FROM_NETWORK, p, dst_ifindex,
				    client_id, 0, 0);
		int ret = enforce(p, ep, dst_ifindex, DIR_INGRESS, OBS_FROM_NETWORK, CT_INGRESS,
				  CT_EGRESS, client_id);
		if (ret != TC_ACT_OK)
			return ret;
		if (set_pod_eth(skb, dst) < 0)
			return TC_ACT_SHOT;
		skb->mark = MARK_FROM_OVERLAY; /* to_container must not enforce it again */
		return bpf_redirect_peer(dst_ifindex, 0);
	}
	__u32 zero = 0;
	struct overlay_config *ov = overlay_config.lookup(&zero);
	struct ipcache_key key = { .prefixlen = 32, .ip = daddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	if (opened)
		emit(EVENT_TRACE, 0, DIR_INGRESS, OBS_FROM_NETWORK, p, ifindex, client_id,
		     v ? v->identity : ID_WORLD, 0, EVENT_F_ALLOWED);
	count(0, DIR_INGRESS, p->len);
	/* a backend behind another node: through the VXLAN device in either routing mode. In
	 * native routing the routing table would reach it too, but the packet (SNATed to this
	 * node) would be judged there as this node, remote-node: a client the backend's policy
	 * denies -- by fromCIDR, or as world -- would get in as a node (Cilium's SNAT mode has the
	 * same hole; its DSR dispatch by encapsulation closes it the same way) */
	if (ov && ov->vxlan_ifindex && v && v->tunnel_endpoint &&
	    v->tunnel_endpoint != cfg->underlay_ip && v->tunnel_endpoint != daddr) {
		__u32 remote = v->tunnel_endpoint;
		if (!tunnel_peers.lookup(&remote)) /* a dead node: fail now, not in the underlay */
			return drop(DROP_UNKNOWN_TARGET, DIR_INGRESS, OBS_FROM_NETWORK, p, ifindex,
				    client_id, v->identity, 0);
		struct bpf_tunnel_key tkey = {};
		/* the receiving node judges the client, not this node: its identity rides in the
		 * VNI -- a CIDR identity's low 24 bits, marked GBP_CIDR (overlay.h), so that a client
		 * a fromCIDR rule denies is denied there too, never downgraded to world */
		struct vxlan_gbp_md md = {};
		if (client_id >= ID_LOCAL_BASE)
			md.gbp = GBP_CIDR;
		tkey.tunnel_id = client_id & 0xffffff;
		tkey.remote_ipv4 = bpf_ntohl(remote);
		tkey.tunnel_ttl = 64;
		if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_ZERO_CSUM_TX) < 0)
			return TC_ACT_SHOT;
		if (md.gbp && bpf_skb_set_tunnel_opt(skb, &md, sizeof(md)) < 0)
			return drop(DROP_NO_TUNNEL_KEY, DIR_INGRESS, OBS_FROM_NETWORK, p, ifindex,
				    client_id, v->identity, 0);
		return bpf_redirect(ov->vxlan_ifindex, 0);
	}
	/* a backend outside the pod network: the node's routes */
	return np_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* Native routing: TCP from another node for a local pod that is the L7 proxy's -- a connection
 * to a port whose ingress entry holds L7 rules, or the far end's answer to the proxy's upstream
 * connection (made as a local pod, egress L7 towards that node) -- is assigned to the proxy's
 * socket here, at tc ingress, as from_overlay does in tunnel mode: to_container, on tc egress,
 * could not. -1: not the proxy's, the node delivers it (to_container enforces). What is not
 * the proxy's costs the parse, two lookups and one or two conntrack lookups; a new connection
 * also the destination's ingress policy lookups. */
static __always_inline int native_to_proxy(struct __sk_buff *skb)
{
	struct packet p = {};
	if (parse(skb, &p) < 0 || p.tuple.protocol != IPPROTO_TCP)
		return -1;
	__u32 daddr = p.tuple.daddr;
	struct lxc_info *dst = lxc.lookup(&daddr);
	if (!dst)
		return -1;
	__u32 dst_ifindex = dst->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&dst_ifindex);
	if (!ep)
		return -1;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_key key = p.tuple;
	key.scope = CT_INGRESS;
	struct ct_entry *e = ct_tracked(&key, now);
	if (e && !reopens(e, &p)) {
		if (!e->proxy_port)
			return -1;
	} else if (pure_syn(&p)) {
		if (!local_ingress_proxy(&p, lookup_identity(p.tuple.saddr)))
			return -1;
	} else {
		struct ct_key rkey = {};
		reverse(&rkey, &p.tuple, CT_EGRESS);
		e = ct_tracked(&rkey, now);
		if (!e || !e->proxy_port)
			return -1;
	}
	p.redirect_ok = 1;
	int ret = enforce(&p, ep, dst_ifindex, DIR_INGRESS, OBS_FROM_NETWORK, CT_INGRESS, CT_EGRESS,
			  0);
	if (ret != TC_ACT_OK)
		return ret;
	if (!p.proxy_port && !p.proxy_reply)
		return -1;
	return to_proxy(skb, &p, DIR_INGRESS, OBS_TO_PROXY, dst_ifindex,
			lookup_identity(p.tuple.saddr), ep->identity);
}

/* from_netdev's verdict for a packet it does not translate: a forged one (underlay_forged's
 * reason) is dropped, the rest passes to the node */
static __always_inline int np_pass(struct __sk_buff *skb, int forged)
{
	if (!forged)
		return TC_ACT_OK;
	struct packet p = {};
	parse(skb, &p); /* for the event only: one it cannot parse is dropped all the same */
	return drop(forged, DIR_INGRESS, OBS_FROM_NETWORK, &p, skb->ifindex,
		    lookup_identity(p.tuple.saddr), 0, 0);
}

int from_netdev(struct __sk_buff *skb)
{
	struct np_config *cfg = np_cfg();
	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	/* the IP header in place (pulled in if the driver left it outside the linear part) */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end) {
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(*ip)) < 0)
			return TC_ACT_SHOT; /* shorter than an IP header */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
	}
	/* a pod's address claimed from the underlay (overlay.h): dropped wherever the packet
	 * would otherwise pass. Only a node-port reply may come from a pod's address (a backend
	 * behind another node answers over the underlay), and only for a connection np_rnat holds */
	int forged = underlay_forged(ip->saddr, ip->daddr);
	/* the cheap test first: TCP or UDP to this node's address on a port of ours */
	if (ip->daddr != cfg->underlay_ip ||
	    (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)) {
		/* native routing: another node's pod or proxy talking to a local pod */
		if (!forged && ip->protocol == IPPROTO_TCP && ip->daddr != cfg->underlay_ip) {
			int ret = native_to_proxy(skb);
			if (ret >= 0)
				return ret;
		}
		return np_pass(skb, forged);
	}
	/* the usual header (no options, not a fragment): the port decides in place, and the node's
	 * own traffic leaves here without a single helper call */
	__be16 *ports = (void *)(ip + 1);
	if (ip->ihl == 5 && !(ip->frag_off & bpf_htons(0x3fff)) && (void *)(ports + 2) <= data_end) {
		__u16 port = bpf_ntohs(ports[1]);
		if ((port < cfg->snat_min || port > cfg->snat_max) &&
		    (port < cfg->nodeport_min || port > cfg->nodeport_max))
			return np_pass(skb, forged);
	}
	struct lb_l4 l;
	if (lb_parse(skb, &l) < 0 || l.frag)
		return np_pass(skb, forged); /* fragments, options beyond reach: the node's */
	__u16 dport = bpf_ntohs(l.dport);
	if (dport >= cfg->snat_min && dport <= cfg->snat_max) {
		int ret = np_reply(skb, &l, cfg);
		return ret < 0 ? np_pass(skb, forged) : ret;
	}
	if (forged || dport < cfg->nodeport_min || dport > cfg->nodeport_max)
		return np_pass(skb, forged);
	struct lb_service_key skey = { .ip = l.daddr, .port = l.dport, .protocol = l.protocol };
	struct lb_service_value *svc = lb_services.lookup(&skey);
	if (!svc)
		return TC_ACT_OK; /* a port no service holds: the node answers (or not) */

	/* a node-port frontend: from here on, translated or dropped (fail closed) */
	__u32 ifindex = skb->ifindex;
	struct packet p = {};
	int ret = parse(skb, &p);
	if (ret < 0)
		return drop(-ret, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex, 0, 0, 0);
	__u32 client_id = 0;
	if (!np_client_identity(l.saddr, &client_id))
		return drop(DROP_INVALID_SIP, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex, client_id,
			    0, 0);
	struct ct_key orig = lb_key(&l, 0);
	__u64 now = bpf_ktime_get_coarse_ns();
	__u8 tcp_flags = p.tcp_flags;
	struct lb_backend *backend = NULL;
	__u32 backend_id = 0;
	__u16 snat_port = 0;
	int opened = 0;
	struct np_nat fresh = {};
	struct np_rnat rfresh = {};
	struct ct_key reply = {};
	struct np_nat *nat = np_nat_find(&orig, now);
	/* the connection's record holds while it lives (SYN retransmissions included); a SYN
	 * after FIN or RST, or a record outlived, is a new connection */
	if (nat && nat->frontend_id == svc->id && nat->expires_ns >= now &&
	    !(l.syn && (nat->flags & CT_F_CLOSING))) {
		backend_id = nat->backend_id;
		backend = lb_backends.lookup(&backend_id);
		if (backend) {
			snat_port = nat->snat_port;
			client_id = nat->client_identity;
			nat_refresh(&nat->expires_ns, &nat->flags, &l, tcp_flags, now);
		}
	}
	if (!backend) {
		backend_id = svc->count ? lb_select(svc, &l, now) : 0;
		backend = backend_id ? lb_backends.lookup(&backend_id) : NULL;
		if (!backend)
			return drop(DROP_NO_SERVICE, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex,
				    client_id, 0, 0);
		__u16 port = np_snat_port(cfg, &l, backend, now);
		if (!port)
			return drop(DROP_NAT_NO_MAPPING, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex,
				    client_id, 0, 0);
		snat_port = bpf_htons(port);
		fresh.backend_id = backend_id;
		fresh.frontend_id = svc->id;
		fresh.client_identity = client_id;
		fresh.snat_port = snat_port;
		nat_refresh(&fresh.expires_ns, &fresh.flags, &l, tcp_flags, now);
		rfresh.client_ip = l.saddr;
		rfresh.client_port = l.sport;
		rfresh.frontend_ip = l.daddr;
		rfresh.frontend_port = l.dport;
		rfresh.expires_ns = fresh.expires_ns;
		reply.saddr = backend->ip;
		reply.daddr = cfg->underlay_ip;
		reply.sport = bpf_ntohs(backend->port);
		reply.dport = port;
		reply.protocol = l.protocol;
		/* the port's previous connection is over: a local backend's conntrack entries of
		 * the tuple go with it, so the new client cannot ride the old one's verdict */
		struct ct_key old = {
			.saddr = cfg->underlay_ip,
			.daddr = backend->ip,
			.sport = port,
			.dport = bpf_ntohs(backend->port),
			.protocol = l.protocol,
			.scope = CT_INGRESS,
		};
		ct.delete(&old);
		ct_new.delete(&old);
		opened = 1;
	}
	if (np_rewrite(skb, &l, cfg->underlay_ip, snat_port, backend->ip, backend->port) < 0)
		return drop(DROP_INVALID, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex, client_id, 0,
			    0);
	/* the packet as the backend sees it, for conntrack, policy and events */
	ret = parse(skb, &p);
	if (ret < 0)
		return drop(-ret, DIR_INGRESS, OBS_FROM_NETWORK, &p, ifindex, client_id, 0, 0);
	ret = np_deliver(skb, cfg, &p, client_id, opened);
	/* the connection's records only once a local backend's policy let it in (a denied client
	 * leaves no state behind), among the unanswered ones (a remote backend's node judges the
	 * client after this); the reply's first, so that a reply never finds a connection it
	 * cannot map back. The packet goes on only after this program returns. */
	if (opened && ret != TC_ACT_SHOT) {
		np_rnat_new.update(&reply, &rfresh);
		np_nat_new.update(&orig, &fresh);
		np_rnat_new.lookup(&reply); /* on equal terms with older records (lb_remember) */
		np_nat_new.lookup(&orig);
	}
	return ret;
}

#endif
