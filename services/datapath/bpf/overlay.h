/* Multi-node: the VXLAN overlay that carries the sender's identity as the VNI.
 *
 * to_overlay:   called by from_container (through forward()) for a destination that is not a
 *               local pod; in tunnel mode, when the ipcache names another node as its tunnel
 *               endpoint, sets the tunnel key (VNI = the source pod's identity, remote = that
 *               node's underlay address) and redirects to the node's VXLAN device.
 * from_overlay: tc ingress of the VXLAN device (external / collect_md mode). The source
 *               identity is the tunnel id, believed only when the frame proves it (below);
 *               the destination pod's ingress policy is enforced with it (the same conntrack
 *               and policy path as to_container), then the packet is delivered to the pod's
 *               veth.
 *
 * Anyone who can reach UDP <tunnel port> on a node can hand its VXLAN device a frame: a pod
 * (to its router, to another node, to a broadcast address), a host on the underlay. So a frame
 * is accepted only when (overlay_accepts): it was sent to this node's underlay address, by a
 * node in tunnel_peers, with a VNI membrane ever sends, and the VNI is the ipcache identity of
 * the inner source whose tunnel endpoint is that very node -- world and remote-node (a node-
 * port client another node forwards, nodeport.h) only with that node's own address as the inner
 * source. A pod's own UDP to the tunnel port of any node is dropped in to_overlay, before it
 * gets that far.
 *
 * In native-routing mode to_overlay lets the packet go to the node's routing table (routes for
 * every other node's pod CIDR via its underlay address), and the receiving node's
 * to_container resolves the source identity from the ipcache. The VXLAN device exists there
 * too, for one thing only: a node-port client forwarded to a backend on another node travels
 * in it with its own identity (world, remote-node or a CIDR identity; nodeport.h), so that the
 * backend's node does not judge it as the forwarding node. Pod identities are refused there. */
#ifndef MEMBRANE_OVERLAY_H
#define MEMBRANE_OVERLAY_H

#define ROUTING_NATIVE 0
#define ROUTING_TUNNEL 1

/* set by from_overlay on a packet it has enforced and redirects to a pod's veth, so that
 * to_container does not enforce it a second time with an identity taken from the ipcache.
 * A mark set inside a pod never reaches here: crossing a namespace scrubs it. */
#define MARK_FROM_OVERLAY 0x4d420e00

#define ID_HEALTH 4
#define ID_REMOTE_NODE 6
#define ID_CLUSTER_MIN 256
#define ID_CLUSTER_MAX 65535

/* written by the agent (services/datapath/tunnel.py); one entry */
struct overlay_config {
	__u32 underlay_ip; /* this node's, network byte order */
	__u32 vxlan_ifindex; /* 0 until the device exists: nothing is tunnelled */
	__u32 mode; /* ROUTING_* */
	__u16 tunnel_port; /* host order: the VXLAN device's UDP port */
	__u16 pad;
};

BPF_TABLE_PINNED("array", __u32, struct overlay_config, overlay_config, 1, PIN_DIR "/overlay");
/* the other nodes that are alive: underlay address (network byte order) -> 1. Traffic for a
 * node not in here is left to the routing table, whose unreachable route for a dead node's pod
 * CIDR fails it at once (services/datapath/routing.py). */
BPF_TABLE_PINNED("hash", __u32, __u32, tunnel_peers, 4096, PIN_DIR "/tunnel_peers");

static __always_inline int enforce(struct packet *p, struct endpoint_info *ep, __u32 ifindex,
				   __u8 direction, __u8 obs, __u8 own, __u8 other, __u32 peer_hint);

/* A VNI membrane sends: a pod's identity (cluster-local, or health for the health endpoint), or
 * world / remote-node for a node-port client another node forwards (nodeport.h). Host and the
 * other reserved identities never travel; a CIDR identity does with GBP_CIDR (below). */
static __always_inline int valid_vni(__u32 id)
{
	return id == ID_WORLD || id == ID_REMOTE_NODE || id == ID_HEALTH ||
	       (id >= ID_CLUSTER_MIN && id <= ID_CLUSTER_MAX);
}

/* The VXLAN Group Based Policy extension (the device is created with `gbp`): its 16-bit group id
 * says how to read the VNI. 0 (no GBP header): the VNI is the identity. GBP_CIDR: the VNI is the
 * low 24 bits of a CIDR identity (ID_LOCAL_BASE | n, the same number on every node: the policy
 * service derives it from the network), the identity of a node-port client another node
 * forwards -- so the backend's node judges a client denied by fromCIDR as what it is, not as
 * world. The kernel's struct vxlan_metadata; the id is its low 16 bits. */
struct vxlan_gbp_md {
	__u32 gbp;
};
#define GBP_CIDR 0x1
#define GBP_ID_MASK 0xffff

/* The identity a frame's sender vouches for (before overlay_accepts checks it). */
static __always_inline __u32 overlay_identity(struct bpf_tunnel_key *tkey, __u32 gbp)
{
	return gbp == GBP_CIDR ? ID_LOCAL_BASE | tkey->tunnel_id : tkey->tunnel_id;
}

/* 0 when the frame's VNI may be believed, else the drop reason. `outer` is the sending node's
 * address (network byte order); a world / remote-node / CIDR identity vouches only for that
 * node's own address (a node-port client, SNATed), any other VNI for a pod whose ipcache entry
 * has exactly that identity and node. */
static __always_inline int overlay_accepts(struct overlay_config *cfg,
					   struct bpf_tunnel_key *tkey, __u32 gbp, __u32 saddr)
{
	__u32 outer = bpf_htonl(tkey->remote_ipv4);
	if (!cfg || bpf_htonl(tkey->local_ipv4) != cfg->underlay_ip)
		return DROP_UNKNOWN_TARGET;
	if (!tunnel_peers.lookup(&outer))
		return DROP_UNKNOWN_SENDER;
	__u32 vni = tkey->tunnel_id;
	if (gbp == GBP_CIDR)
		return !vni ? DROP_INVALID_VNI : saddr == outer ? 0 : DROP_INVALID_IDENTITY;
	if (gbp || !valid_vni(vni))
		return DROP_INVALID_VNI;
	if (vni == ID_WORLD || vni == ID_REMOTE_NODE)
		return saddr == outer ? 0 : DROP_INVALID_IDENTITY;
	/* native routing: pods' packets cross the underlay as they are; the device carries only
	 * node-port clients another node forwards (nodeport.h np_deliver) */
	if (cfg->mode != ROUTING_TUNNEL)
		return DROP_INVALID_VNI;
	struct ipcache_key key = { .prefixlen = 32, .ip = saddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	if (!v || v->identity != vni || v->tunnel_endpoint != outer)
		return DROP_INVALID_IDENTITY;
	return 0;
}

static __always_inline int to_overlay(struct __sk_buff *skb, struct packet *p)
{
	__u32 daddr = p->tuple.daddr;
	__u32 zero = 0;
	struct overlay_config *cfg = overlay_config.lookup(&zero);
	if (!cfg || !cfg->vxlan_ifindex)
		return TC_ACT_OK;
	struct ipcache_key key = { .prefixlen = 32, .ip = daddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	__u32 ifindex = skb->ifindex;
	/* only pods behind another node are tunnelled; a node's own address is reached over the
	 * underlay directly -- but never its tunnel port: a pod has no business handing any node's
	 * VXLAN device a frame (it would choose its own VNI). The device exists in native routing
	 * too (for node-port clients, nodeport.h), so the rule holds in both modes. */
	if (!v || !v->tunnel_endpoint || v->tunnel_endpoint == cfg->underlay_ip ||
	    v->tunnel_endpoint == daddr) {
		if (p->tuple.protocol == IPPROTO_UDP && p->tuple.dport == cfg->tunnel_port)
			return drop(DROP_ENCAP_PROHIBITED, DIR_EGRESS, OBS_FROM_ENDPOINT, p, ifindex,
				    0, v ? v->identity : ID_WORLD, 0);
		return TC_ACT_OK;
	}
	if (cfg->mode != ROUTING_TUNNEL)
		return TC_ACT_OK; /* native routing: another node's pods through the routing table */
	__u32 remote = v->tunnel_endpoint;
	if (!tunnel_peers.lookup(&remote))
		return TC_ACT_OK;
	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	if (!ep)
		return TC_ACT_SHOT; /* from_container checked it: the endpoint went meanwhile */
	struct bpf_tunnel_key tkey = {};
	tkey.tunnel_id = ep->identity;
	tkey.remote_ipv4 = bpf_ntohl(remote);
	tkey.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	/* the first packet of a connection is traced leaving for the other node, as Hubble's
	 * to-overlay; established traffic is not (one event per packet would cost too much) */
	if (p->opened)
		emit(EVENT_TRACE, 0, DIR_EGRESS, OBS_TO_OVERLAY, p, ifindex, ep->identity, v->identity,
		     0, EVENT_F_ALLOWED);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

int from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tkey = {};
	struct packet p = {};
	__u32 ifindex = skb->ifindex;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		p.len = skb->len;
		return drop(DROP_UNSUPPORTED_L3, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, 0, 0,
			    0);
	}
	int ret = parse(skb, &p);
	if (ret < 0)
		return drop(-ret, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, 0, 0, 0);
	if (bpf_skb_get_tunnel_key(skb, &tkey, sizeof(tkey), 0) < 0)
		return drop(DROP_NO_TUNNEL_KEY, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, 0, 0, 0);
	struct vxlan_gbp_md md = {};
	__u32 gbp = bpf_skb_get_tunnel_opt(skb, &md, sizeof(md)) > 0 ? md.gbp & GBP_ID_MASK : 0;
	__u32 src_id = overlay_identity(&tkey, gbp);
	__u32 zero = 0;
	ret = overlay_accepts(overlay_config.lookup(&zero), &tkey, gbp, p.tuple.saddr);
	if (ret)
		return drop(ret, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, src_id, 0, 0);
	__u32 daddr = p.tuple.daddr;
	struct lxc_info *dst = lxc.lookup(&daddr);
	if (!dst) /* the overlay only carries traffic for this node's pods */
		return drop(DROP_UNKNOWN_TARGET, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, src_id,
			    0, 0);
	__u32 dst_ifindex = dst->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&dst_ifindex);
	if (!ep)
		return drop(DROP_NO_CONFIG, DIR_INGRESS, OBS_FROM_OVERLAY, &p, dst_ifindex, src_id,
			    0, 0);
	/* a connection to an L7 port goes to this node's proxy, whose answers return to the client's
	 * node through overlay_egress (and so do its upstream connections, as the client pod) */
	p.redirect_ok = p.tuple.protocol == IPPROTO_TCP;
	ret = enforce(&p, ep, dst_ifindex, DIR_INGRESS, OBS_FROM_OVERLAY, CT_INGRESS, CT_EGRESS,
		      src_id);
	if (ret != TC_ACT_OK)
		return ret;
	/* an L7 port, or the answer to the proxy's upstream connection (made as the local pod,
	 * egress L7 towards this other node): neither goes into the pod */
	if (p.proxy_port || p.proxy_reply)
		return to_proxy(skb, &p, DIR_INGRESS, OBS_TO_PROXY, dst_ifindex, src_id, ep->identity);
	/* a reply from a service backend on another node: this node translated the request, so
	 * it puts the service address back (to_container, which would, is skipped below) */
	lb_to_container(skb);
	if (set_pod_eth(skb, dst) < 0)
		return TC_ACT_SHOT;
	/* straight into the pod's namespace (the veth's peer), as Cilium does from tc ingress:
	 * no second pass through the veth and its backlog queue. The mark is for the fallback of
	 * a plain redirect; it does not cross into the pod's namespace either way. */
	skb->mark = MARK_FROM_OVERLAY;
	return bpf_redirect_peer(dst_ifindex, 0);
}

/* from_netdev (nodeport.h): 0 when a packet arriving from the underlay may be what it claims,
 * else the drop reason. A local pod's packets never arrive there. In tunnel mode no pod's do
 * (they cross the underlay inside VXLAN only), and nothing from there may go to a local pod
 * except through the tunnel (node ports are translated before): so a plain packet from a pod
 * or health address, or to a local pod, is forged -- whoever routed it to this node. In native
 * mode pods' packets do cross the underlay and are believed by their source address, as
 * Cilium's native routing believes its underlay (docs/routing.md). */
static __always_inline int underlay_forged(__u32 saddr, __u32 daddr)
{
	if (lxc.lookup(&saddr))
		return DROP_INVALID_SIP;
	__u32 zero = 0;
	struct overlay_config *cfg = overlay_config.lookup(&zero);
	if (!cfg || cfg->mode != ROUTING_TUNNEL)
		return 0;
	__u32 id = lookup_identity(saddr);
	if (id == ID_HEALTH || (id >= ID_CLUSTER_MIN && id <= ID_CLUSTER_MAX))
		return DROP_INVALID_SIP;
	return lxc.lookup(&daddr) ? DROP_UNKNOWN_TARGET : 0;
}

/* tc egress of the VXLAN device. Pod traffic from_container tunnels carries its key already;
 * anything else is the node's own, routed here for another node's pod: only the L7 proxy's
 * answers, which leave as the local server pod (transparent socket), go -- with that pod's
 * identity as the VNI, which the far side checks against its ipcache. */
int overlay_egress(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tkey = {};
	if (bpf_skb_get_tunnel_key(skb, &tkey, sizeof(tkey), 0) == 0)
		return TC_ACT_OK;
	struct packet p = {};
	if (skb->protocol != bpf_htons(ETH_P_IP) || parse(skb, &p) < 0)
		return TC_ACT_SHOT;
	__u32 zero = 0;
	struct overlay_config *cfg = overlay_config.lookup(&zero);
	if (!cfg || cfg->mode != ROUTING_TUNNEL)
		return TC_ACT_SHOT;
	__u32 saddr = p.tuple.saddr;
	struct lxc_info *src = lxc.lookup(&saddr);
	if (!src)
		return TC_ACT_SHOT;
	__u32 src_ifindex = src->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&src_ifindex);
	if (!ep)
		return TC_ACT_SHOT;
	struct ipcache_key key = { .prefixlen = 32, .ip = p.tuple.daddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	if (!v || !v->tunnel_endpoint || v->tunnel_endpoint == cfg->underlay_ip)
		return TC_ACT_SHOT;
	__u32 remote = v->tunnel_endpoint;
	if (!tunnel_peers.lookup(&remote))
		return TC_ACT_SHOT;
	tkey.tunnel_id = ep->identity;
	tkey.remote_ipv4 = bpf_ntohl(remote);
	tkey.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

static __always_inline int delivered_from_overlay(struct __sk_buff *skb)
{
	if (skb->mark != MARK_FROM_OVERLAY)
		return 0;
	skb->mark = 0;
	return 1;
}

#endif
