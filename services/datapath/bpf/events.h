/* Events the datapath sends to its agent through the ring buffer, and the metrics it counts.
 * shared/bpf_layouts.py holds this layout for Python; a test compares the two. */
#ifndef MEMBRANE_EVENTS_H
#define MEMBRANE_EVENTS_H

#define EVENT_DROP 1
#define EVENT_TRACE 2
#define EVENT_POLICY_VERDICT 3

#define DIR_INGRESS 1
#define DIR_EGRESS 2

#define OBS_FROM_ENDPOINT 1
#define OBS_TO_ENDPOINT 2
#define OBS_TO_OVERLAY 3
#define OBS_FROM_OVERLAY 4
#define OBS_FROM_NETWORK 5 /* the node's underlay device (node ports) */
#define OBS_TO_PROXY 6 /* steered to the node's L7 proxy */
#define OBS_FROM_PROXY 7 /* the proxy's upstream connection, after its L7 check */

#define EVENT_F_REPLY 0x1
#define EVENT_F_ALLOWED 0x2 /* policy verdict: allowed (else denied) */
#define EVENT_F_AUDIT 0x4 /* policy verdict: would be denied, allowed by audit mode */

/* 48 bytes, no implicit padding. */
struct flow_event {
	__u64 ts_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u8 type;
	__u8 reason; /* Cilium drop reason; 0 when forwarded */
	__u8 direction;
	__u8 obs_point;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 flags;
	__u8 pad;
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 saddr; /* network byte order */
	__u32 daddr;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u32 rule_id;
	__u32 len;
};

/* per-CPU packet and byte counts, an array indexed by METRICS_INDEX(reason, direction);
 * reason 0 = forwarded. An array lookup is far cheaper per packet than a hash. */
#define METRICS_INDEX(reason, direction) (((__u32)(reason) << 2) | (direction))
#define METRICS_ENTRIES 1024

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#endif
