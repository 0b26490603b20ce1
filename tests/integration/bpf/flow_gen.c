/* Test-only flow event generator: each run writes one struct flow_event (events.h) into the
 * ring buffer. Driven by BPF_PROG_TEST_RUN, whose `repeat` runs it N times on one packet;
 * every field is derived from a run counter that rule_id carries, so a reader can check each
 * event exactly (tests/integration/test_flows.py mirrors the derivation in expected_event).
 *
 * RINGBUF_PAGES: ring buffer size in pages. DISCARD_EVERY: every Nth run reserves a record and
 * discards it; MALFORMED_EVERY: every Nth run submits a 16-byte record instead (0: never).
 * SPIN: helper calls between reserve and submit, so that a concurrent reader meets records
 * still being written. A run that cannot reserve counts it in lost_events. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

#include "events.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 16
#endif
#ifndef DISCARD_EVERY
#define DISCARD_EVERY 0
#endif
#ifndef MALFORMED_EVERY
#define MALFORMED_EVERY 0
#endif
#ifndef SPIN
#define SPIN 0
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(runs, u64, 1);
BPF_PERCPU_ARRAY(lost_events, u64, 1);

static __always_inline u8 drop_reason(u64 n)
{
	switch (n % 6) {
	case 0:
		return 133; /* Policy denied */
	case 1:
		return 181; /* Policy denied by denylist */
	case 2:
		return 158; /* Service backend not found */
	case 3:
		return 183; /* Incorrect VNI from VTEP */
	case 4:
		return 134; /* Invalid packet */
	default:
		return 250; /* no Cilium name */
	}
}

static __always_inline u8 protocol(u64 n, u8 from_packet)
{
	switch (n % 4) {
	case 0:
		return from_packet;
	case 1:
		return IPPROTO_UDP;
	case 2:
		return IPPROTO_ICMP;
	default:
		return IPPROTO_SCTP;
	}
}

int generate(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	u32 zero = 0;
	u64 *counter = runs.lookup(&zero);

	if (!counter || (void *)(tcp + 1) > data_end)
		return TC_ACT_SHOT;
	/* BPF_PROG_TEST_RUN runs one program instance at a time: no atomics needed */
	u64 n = *counter;
	*counter = n + 1;

	if (DISCARD_EVERY && n % DISCARD_EVERY == DISCARD_EVERY - 1) {
		struct flow_event *skipped = events.ringbuf_reserve(sizeof(struct flow_event));
		if (skipped)
			events.ringbuf_discard(skipped, 0);
		return TC_ACT_OK;
	}
	if (MALFORMED_EVERY && n % MALFORMED_EVERY == MALFORMED_EVERY - 1) {
		u64 *odd = events.ringbuf_reserve(16);
		if (odd) {
			odd[0] = n;
			odd[1] = 0;
			events.ringbuf_submit(odd, 0);
		}
		return TC_ACT_OK;
	}

	struct flow_event *ev = events.ringbuf_reserve(sizeof(struct flow_event));
	if (!ev) {
		u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return TC_ACT_SHOT;
	}
	u8 type = n % 3 + 1;
	u8 flags = (n / 3) % 4;
	u8 proto = protocol(n, ip->protocol);
	u8 reason = 0;
	if (type == EVENT_DROP)
		reason = drop_reason(n / 3);
	else if (type == EVENT_POLICY_VERDICT && !(flags & EVENT_F_ALLOWED))
		reason = 133;

	ev->ts_ns = bpf_ktime_get_ns();
	ev->type = type;
	ev->reason = reason;
	ev->direction = n % 2 + 1;
	ev->obs_point = (n / 2) % 2 + 1;
	ev->protocol = proto;
	ev->tcp_flags = proto == IPPROTO_TCP ? (u8)(n >> 2) : 0;
	ev->flags = flags;
	ev->pad = 0;
	ev->ifindex = skb->ifindex;
	ev->src_identity = 256 + n % 1000;
	ev->dst_identity = (u32)(n >> 8) + 1;
	ev->saddr = ip->saddr;
	/* 4096 peers, 10.0.0.0-10.0.15.255: addresses repeat, as pods' do */
	ev->daddr = __builtin_bswap32(0x0a000000 | (u32)(n & 0xfff));
	ev->sport = (u16)n;
	ev->dport = __builtin_bswap16(tcp->dest);
	ev->rule_id = (u32)n;
	ev->len = skb->len;
	for (int i = 0; i < SPIN; i++)
		bpf_ktime_get_ns();
	events.ringbuf_submit(ev, 0);
	return TC_ACT_OK;
}
