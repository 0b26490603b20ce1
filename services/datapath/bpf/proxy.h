/* L7 proxy redirection (the numbers are shared/proxy.py's; keep both in step).
 *
 * A policy allow whose port carries L7 rules holds the node's proxy port. Its connections are
 * steered, at tc ingress in the node's namespace (from_container, from_overlay), to the proxy's
 * socket with bpf_sk_assign -- the connection's own socket when the proxy already accepted it,
 * else the listener -- and a mark that the node's policy route (fwmark MARK_TO_PROXY -> local
 * table) delivers locally: the original destination stays in the packet, so clients and
 * servers change nothing. Where that cannot be done (tc egress, the underlay device) or when
 * no proxy listens, the connection is dropped: an L7 port is never an L4 allow.
 *
 * The proxy's upstream connections carry MARK_FROM_PROXY and the client's identity in the
 * upper 16 bits of the mark (SO_MARK). to_container applies the L3/L4 policy to them with that
 * identity, the L7 entry counting as an allow, so they are not redirected a second time. A pod
 * cannot forge the mark: crossing from its namespace into the node's scrubs skb->mark. */
#ifndef MEMBRANE_PROXY_H
#define MEMBRANE_PROXY_H

#define MARK_MAGIC_MASK 0x0F00
#define MARK_TO_PROXY 0x0200
#define MARK_FROM_PROXY 0x0B00
/* the DNS proxy's port (a UDP socket and a TCP listener): egress DNS rules hold it */
#define DNS_PROXY_PORT 15053
#define PROXY_LISTEN_ADDR 0x7f000001 /* 127.0.0.1 */

/* the identity a packet from the proxy carries (0: not from the proxy) */
static __always_inline __u32 from_proxy_identity(struct __sk_buff *skb)
{
	if ((skb->mark & MARK_MAGIC_MASK) != MARK_FROM_PROXY)
		return 0;
	return skb->mark >> 16;
}

static __always_inline int assigned(struct __sk_buff *skb, struct bpf_sock *sk, struct packet *p,
				    __u8 direction, __u8 obs, __u32 ifindex, __u32 src_id,
				    __u32 dst_id)
{
	long ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret)
		return drop(DROP_PROXY_SET_FAILED, direction, obs, p, ifindex, src_id, dst_id, 0);
	skb->mark = MARK_TO_PROXY;
	/* a frame from the overlay is addressed to the sending side's MAC: ip_rcv drops such
	 * "other host" frames before the socket could take them (PACKET_HOST is 0) */
	bpf_skb_change_type(skb, 0);
	return TC_ACT_OK;
}

/* A UDP datagram (DNS) goes to the proxy's one unconnected socket on its port, never to a
 * socket matching the original tuple: the proxy answers from sockets bound to the servers'
 * addresses, which must not take the queries. */
static __always_inline int to_proxy_udp(struct __sk_buff *skb, struct packet *p, __u8 direction,
					__u8 obs, __u32 ifindex, __u32 src_id, __u32 dst_id)
{
	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.daddr = bpf_htonl(PROXY_LISTEN_ADDR); /* where it is bound, as the listener */
	tuple.ipv4.dport = bpf_htons(p->proxy_port);
	struct bpf_sock *sk =
		bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return drop(DROP_PROXY_LOOKUP_FAILED, direction, obs, p, ifindex, src_id, dst_id, 0);
	return assigned(skb, sk, p, direction, obs, ifindex, src_id, dst_id);
}

/* Assign the packet to the proxy's socket for its connection, or to its listener (for an answer
 * to the proxy's upstream connection: to that socket only); a drop (178 "Socket lookup failed",
 * 179 "Socket assign failed") when there is none. */
static __always_inline int to_proxy(struct __sk_buff *skb, struct packet *p, __u8 direction,
				    __u8 obs, __u32 ifindex, __u32 src_id, __u32 dst_id)
{
	struct bpf_sock_tuple tuple = {};
	if (p->tuple.protocol == IPPROTO_UDP)
		return to_proxy_udp(skb, p, direction, obs, ifindex, src_id, dst_id);
	tuple.ipv4.saddr = p->tuple.saddr;
	tuple.ipv4.daddr = p->tuple.daddr;
	tuple.ipv4.sport = bpf_htons(p->tuple.sport);
	tuple.ipv4.dport = bpf_htons(p->tuple.dport);
	struct bpf_sock *sk =
		bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	/* a listener of the node's own on the original port, or a closed connection: not ours */
	if (sk && (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT)) {
		bpf_sk_release(sk);
		sk = NULL;
	}
	/* an answer to the proxy's upstream connection has only that connection's socket */
	if (!sk && p->proxy_reply)
		return drop(DROP_PROXY_LOOKUP_FAILED, direction, obs, p, ifindex, src_id, dst_id, 0);
	if (!sk) {
		/* the listener is bound to the loopback address: only what the datapath assigns to
		 * it reaches it, never a connection to one of the node's addresses (a pod that would
		 * talk to the proxy directly, past the rules) */
		__builtin_memset(&tuple, 0, sizeof(tuple));
		tuple.ipv4.daddr = bpf_htonl(PROXY_LISTEN_ADDR);
		tuple.ipv4.dport = bpf_htons(p->proxy_port);
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return drop(DROP_PROXY_LOOKUP_FAILED, direction, obs, p, ifindex, src_id,
				    dst_id, 0);
		if (sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return drop(DROP_PROXY_LOOKUP_FAILED, direction, obs, p, ifindex, src_id,
				    dst_id, 0);
		}
	}
	return assigned(skb, sk, p, direction, obs, ifindex, src_id, dst_id);
}

#endif
