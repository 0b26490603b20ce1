/* Multi-node: the VXLAN overlay that carries the sender's identity as the VNI.
 *
 * to_overlay:   called by from_container (through forward()) for a destination that is not a
 *               local pod; in tunnel mode, when the ipcache names another node as its tunnel
 *               endpoint, sets the tunnel key (VNI = the source pod's identity, remote = that
 *               node's underlay address) and redirects to the node's VXLAN device.
 * from_overlay: tc ingress of the VXLAN device (external / collect_md mode). The source
 *               identity is the tunnel id -- never looked up by source address -- and the
 *               destination pod's ingress policy is enforced with it (the same conntrack and
 *               policy path as to_container), then the packet is delivered to the pod's veth.
 *
 * In native-routing mode to_overlay lets the packet go to the node's routing table (routes for
 * every other node's pod CIDR via its underlay address), and the receiving node's
 * to_container resolves the source identity from the ipcache. */
#ifndef MEMBRANE_OVERLAY_H
#define MEMBRANE_OVERLAY_H

#define ROUTING_NATIVE 0
#define ROUTING_TUNNEL 1

/* set by from_overlay on a packet it has enforced and redirects to a pod's veth, so that
 * to_container does not enforce it a second time with an identity taken from the ipcache.
 * A mark set inside a pod never reaches here: crossing a namespace scrubs it. */
#define MARK_FROM_OVERLAY 0x4d420e00

#define ID_RESERVED_MAX 8
#define ID_CLUSTER_MIN 256
#define ID_CLUSTER_MAX 65535

/* written by the agent (services/datapath/tunnel.py); one entry */
struct overlay_config {
	__u32 underlay_ip; /* this node's, network byte order */
	__u32 vxlan_ifindex; /* 0 until the device exists: nothing is tunnelled */
	__u32 mode; /* ROUTING_* */
	__u32 pad;
};

BPF_TABLE_PINNED("array", __u32, struct overlay_config, overlay_config, 1, PIN_DIR "/overlay");
/* the other nodes that are alive: underlay address (network byte order) -> 1. Traffic for a
 * node not in here is left to the routing table, whose unreachable route for a dead node's pod
 * CIDR fails it at once (services/datapath/routing.py). */
BPF_TABLE_PINNED("hash", __u32, __u32, tunnel_peers, 4096, PIN_DIR "/tunnel_peers");

static __always_inline int enforce(struct packet *p, struct endpoint_info *ep, __u32 ifindex,
				   __u8 direction, __u8 obs, __u8 own, __u8 other, __u32 peer_hint);

/* An identity that may ride in a VNI: a reserved one or a cluster-local one. World rides in
 * it for a node-port client another node forwards (nodeport.h); claiming it gains nothing.
 * Node-local (CIDR) identities do not fit 24 bits anyway. */
static __always_inline int valid_vni(__u32 id)
{
	return (id >= 1 && id <= ID_RESERVED_MAX) ||
	       (id >= ID_CLUSTER_MIN && id <= ID_CLUSTER_MAX);
}

static __always_inline int to_overlay(struct __sk_buff *skb, struct packet *p)
{
	__u32 daddr = p->tuple.daddr;
	__u32 zero = 0;
	struct overlay_config *cfg = overlay_config.lookup(&zero);
	if (!cfg || cfg->mode != ROUTING_TUNNEL || !cfg->vxlan_ifindex)
		return TC_ACT_OK;
	struct ipcache_key key = { .prefixlen = 32, .ip = daddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	/* only pods behind another node are tunnelled; a node's own address is reached over the
	 * underlay directly */
	if (!v || !v->tunnel_endpoint || v->tunnel_endpoint == cfg->underlay_ip ||
	    v->tunnel_endpoint == daddr)
		return TC_ACT_OK;
	__u32 remote = v->tunnel_endpoint;
	if (!tunnel_peers.lookup(&remote))
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
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
	__u32 src_id = tkey.tunnel_id;
	if (!valid_vni(src_id))
		return drop(DROP_INVALID_VNI, DIR_INGRESS, OBS_FROM_OVERLAY, &p, ifindex, src_id, 0,
			    0);
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
	/* L7 across nodes is not supported yet: the proxy's answers to a client behind another node
	 * would need a route into the overlay. Such connections are dropped (180), not allowed. */
	ret = enforce(&p, ep, dst_ifindex, DIR_INGRESS, OBS_FROM_OVERLAY, CT_INGRESS, CT_EGRESS,
		      src_id);
	if (ret != TC_ACT_OK)
		return ret;
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

static __always_inline int delivered_from_overlay(struct __sk_buff *skb)
{
	if (skb->mark != MARK_FROM_OVERLAY)
		return 0;
	skb->mark = 0;
	return 1;
}

#endif
