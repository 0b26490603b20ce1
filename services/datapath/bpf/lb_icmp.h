/* ICMP errors about a service connection, on their way to the client.
 *
 * An error quotes the packet it is about as the backend saw it, after DNAT: client ->
 * backend:port. The client's socket sent client -> frontend:port and ignores an error about
 * anything else, so a UDP client of a service without a listener would wait out its timeout
 * instead of getting ECONNREFUSED (and a TCP client would miss "unreachable" and "fragmentation
 * needed"). The quoted destination becomes the frontend again; so does the error's own source
 * when the backend sent it. Checksums: the quoted IP header's and the ICMP message's are
 * fixed; the quoted transport checksum is left as it is, as no receiver checks it.
 *
 * Pasted into lb.h (loader.INLINED_HEADERS) before lb_to_container, which calls it. */
#ifndef MEMBRANE_LB_ICMP_H
#define MEMBRANE_LB_ICMP_H

static __always_inline void lb_icmp_error_to_container(struct __sk_buff *skb)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    ip.ihl < 5 || ip.protocol != IPPROTO_ICMP || (ip.frag_off & bpf_htons(0x3fff)))
		return;
	__u32 icmp_off = ETH_HLEN + ip.ihl * 4;
	struct icmphdr icmp;
	if (bpf_skb_load_bytes(skb, icmp_off, &icmp, sizeof(icmp)) < 0)
		return;
	if (icmp.type != ICMP_DEST_UNREACH && icmp.type != ICMP_TIME_EXCEEDED &&
	    icmp.type != ICMP_PARAMETERPROB)
		return;
	__u32 inner_off = icmp_off + sizeof(struct icmphdr);
	struct iphdr inner;
	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0 || inner.ihl != 5)
		return;
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return;
	__u32 ports_off = inner_off + sizeof(struct iphdr);
	__u16 ports[2]; /* network byte order: the client's port, the backend's */
	if (bpf_skb_load_bytes(skb, ports_off, ports, sizeof(ports)) < 0)
		return;
	/* the quoted packet went client -> backend: the reply direction names the connection */
	struct ct_key reply = {
		.saddr = inner.daddr,
		.daddr = inner.saddr,
		.sport = bpf_ntohs(ports[1]),
		.dport = bpf_ntohs(ports[0]),
		.protocol = inner.protocol,
		.scope = CT_INGRESS,
	};
	int unanswered = 0; /* an error is no answer: the records stay where they are */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct lb_rnat *r = lb_rnat_find(&reply, now, &unanswered);
	if (!r || r->expires_ns < now)
		return;
	__u32 frontend = r->ip;
	__u16 frontend_port = r->port;
	__u32 backend = inner.daddr;
	__u16 backend_port = ports[1];
	__u32 icmp_csum = icmp_off + offsetof(struct icmphdr, checksum);
	__u32 inner_check = inner_off + offsetof(struct iphdr, check);

	/* the quoted destination address, and the quoted header's checksum with it; the ICMP
	 * checksum covers both changes (ICMP has no pseudo-header) */
	if (bpf_l3_csum_replace(skb, inner_check, backend, frontend, sizeof(frontend)) < 0)
		return;
	__u16 new_check;
	if (bpf_skb_load_bytes(skb, inner_check, &new_check, sizeof(new_check)) < 0)
		return;
	if (bpf_skb_store_bytes(skb, inner_off + offsetof(struct iphdr, daddr), &frontend,
				sizeof(frontend), 0) < 0)
		return;
	if (bpf_l4_csum_replace(skb, icmp_csum, backend, frontend, sizeof(frontend)) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, inner.check, new_check, sizeof(new_check)) < 0)
		return;
	/* the quoted destination port */
	if (backend_port != frontend_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum, backend_port, frontend_port,
					sizeof(frontend_port)) < 0)
			return;
		if (bpf_skb_store_bytes(skb, ports_off + 2, &frontend_port, sizeof(frontend_port),
					0) < 0)
			return;
	}
	/* the error's source, when it was the backend (not a router on the way) */
	if (ip.saddr == backend) {
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), backend,
					frontend, sizeof(frontend)) < 0)
			return;
		bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), &frontend,
				    sizeof(frontend), 0);
	}
}

#endif
