/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Decides whether a packet may take the fast path past the host stack, by
 * asking the kernel's conntrack whether it belongs to a NATed connection.
 * Such a packet must cross the host stack, where conntrack reverses the
 * translation: redirected past it, a reply from a service backend would reach
 * the client from the backend's address instead of the service's. What the
 * fast path cannot look up (fragments, SCTP, unreadable headers) crosses the
 * stack too, so that no NATed packet slips past unasked. A TCP connection
 * is asked about once, by its SYN, FIN and RST segments (ct_tcp_verdict). */
#pragma once

#include "common.h"
#include "ipv4.h"
#include "types.h"
#include "maps.h"

/* Only the field we read; CO-RE fixes its offset to the running kernel's. */
struct nf_conn {
	unsigned long status;
} __attribute__((preserve_access_index));

/* The 12-byte layout every kernel since 6.0 accepts (later ones add zone
 * fields behind it). */
struct bpf_ct_opts___pc {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

/* Weak: where nf_conntrack is a module that is not loaded (Debian), the
 * kfuncs are missing from kernel BTF and the loader poisons their calls
 * instead of refusing the program; ct_available, cleared by the loader
 * then, makes those calls dead code the verifier drops. Without conntrack
 * there is no NAT, so the fast path is then always sound. (libbpf's
 * bpf_ksym_exists() would need kernel 6.4, which first accepts a kfunc's
 * address in ld_imm64; Debian 12's 6.1 refuses it.) */
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple_len, struct bpf_ct_opts___pc *opts,
					 __u32 opts_len) __ksym __weak;
extern void bpf_ct_release(struct nf_conn *ct) __ksym __weak;

/* 1 unless the loader found the kfuncs missing (pkg/datapath/conntrack.go);
 * a loader that forgot it gets a verifier error, not a silent NAT hole. */
volatile const __u8 ct_available = 1;

#define IPS_SRC_NAT (1 << 4)
#define IPS_DST_NAT (1 << 5)

#define IPPROTO_SCTP_ 132

/* ICMP error types (RFC 792): conntrack's icmp_is_err() list. */
#define ICMP_DEST_UNREACH_ 3
#define ICMP_SOURCE_QUENCH_ 4
#define ICMP_REDIRECT_ 5
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12
#define ICMP_HDR_LEN 8

static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH_ || type == ICMP_SOURCE_QUENCH_ || type == ICMP_REDIRECT_ ||
	       type == ICMP_TIME_EXCEEDED_ || type == ICMP_PARAMETERPROB_;
}

/* Returns STAT_TO_HOST_NAT when conntrack has translated the TCP or UDP
 * connection of tuple, STAT_MAX otherwise. */
static __always_inline enum stat_id ct_lookup_nat(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
						  __u8 proto)
{
	struct bpf_ct_opts___pc opts = { .netns_id = BPF_F_CURRENT_NETNS, .l4proto = proto };
	struct nf_conn *ct;
	int natted;

	ct = bpf_skb_ct_lookup(skb, tuple, sizeof(tuple->ipv4), &opts, sizeof(opts));
	if (!ct)
		return STAT_MAX;
	natted = (ct->status & (IPS_SRC_NAT | IPS_DST_NAT)) != 0;
	bpf_ct_release(ct);
	return natted ? STAT_TO_HOST_NAT : STAT_MAX;
}

/* Reads len bytes at off into to; they must lie within the IP packet,
 * which ends at end. Bytes in the linear part are read directly; elsewhere
 * bpf_skb_load_bytes reads paged data and, unlike a pull, leaves the
 * caller's packet pointers valid. len must be a constant. */
static __always_inline int ct_load(struct __sk_buff *skb, __u32 off, __u32 end, void *to, __u32 len)
{
	void *from = ctx_data(skb) + off;

	if (off + len > end)
		return -1;
	if (from + len <= ctx_data_end(skb)) {
		__builtin_memcpy(to, from, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Reads the ports of a TCP or UDP header at off into tuple. */
static __always_inline int ct_load_ports(struct __sk_buff *skb, __u32 off, __u32 end,
					 struct bpf_sock_tuple *tuple)
{
	return ct_load(skb, off, end, &tuple->ipv4.sport, 4);
}

/* An ICMP error is NATed when the packet it quotes is: conntrack finds its
 * connection by the quoted header turned around (the quote is what the
 * error's sender received; its reply direction is the error's), and so do
 * we. off is where the ICMP header starts, end where the IP packet ends. */
static __always_inline enum stat_id ct_icmp_verdict(struct __sk_buff *skb, __u32 off, __u32 end)
{
	struct bpf_sock_tuple tuple = {};
	struct iphdr quoted;
	__u8 type;
	__be16 port;

	if (off + ICMP_HDR_LEN > end || bpf_skb_load_bytes(skb, off, &type, 1))
		return STAT_TO_HOST_UNTRACKED;
	if (!icmp_is_error(type))
		return STAT_MAX;
	off += ICMP_HDR_LEN;
	if (off + sizeof(quoted) > end || bpf_skb_load_bytes(skb, off, &quoted, sizeof(quoted)) ||
	    quoted.version != 4 || quoted.ihl < 5)
		return STAT_TO_HOST_UNTRACKED;
	/* The quoted packet is judged as the packet itself would be. */
	if (quoted.protocol == IPPROTO_SCTP_ || (quoted.frag_off & bpf_htons(IP_OFFSET)))
		return STAT_TO_HOST_UNTRACKED;
	if (quoted.protocol != IPPROTO_TCP && quoted.protocol != IPPROTO_UDP)
		return STAT_MAX;
	if (ct_load_ports(skb, off + quoted.ihl * 4, end, &tuple))
		return STAT_TO_HOST_UNTRACKED;
	tuple.ipv4.saddr = quoted.daddr;
	tuple.ipv4.daddr = quoted.saddr;
	port = tuple.ipv4.sport;
	tuple.ipv4.sport = tuple.ipv4.dport;
	tuple.ipv4.dport = port;
	return ct_lookup_nat(skb, &tuple, quoted.protocol);
}

/* TCP flags that open or close a connection (RFC 9293). */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAGS_OFF 13

/* The NAT check of a TCP segment, decided once per connection: a segment
 * with SYN, FIN or RST asks conntrack and records the answer in ct_verdicts;
 * every other segment of the connection takes the recorded answer (a hash
 * probe instead of a conntrack lookup: see README's cost table). It stays true
 * because a NATed connection is created only by the stack, from a packet
 * crossing it, and its first packet in either direction carries SYN: the
 * client's SYN, the backend's SYN-ACK. So a connection that a tuple's
 * recorded "no NAT" could wrongly redirect asks again before its first
 * packet on the fast path. Conntrack picking a connection up mid-stream
 * (nf_conntrack_tcp_loose) is the exception, and only the client can start
 * that: it sends a non-SYN segment to a service on a tuple it already uses
 * directly, and its own connection is what breaks. A stale "NAT" (conntrack
 * flushed under a live connection) is safe: the stack path is always
 * correct. UDP has no handshake that tells a new flow from an old one, so
 * every UDP datagram asks conntrack. */
static __always_inline enum stat_id ct_tcp_verdict(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
						   __u32 l4_off, __u32 end)
{
	enum stat_id verdict;
	__u32 *cached, v;
	__u8 flags;

	/* Without its flags the segment cannot be judged: ask every time. */
	if (ct_load(skb, l4_off + TCP_FLAGS_OFF, end, &flags, 1))
		return ct_lookup_nat(skb, tuple, IPPROTO_TCP);
	if (!(flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST))) {
		cached = bpf_map_lookup_elem(&ct_verdicts, &tuple->ipv4);
		if (cached)
			return *cached;
	}
	verdict = ct_lookup_nat(skb, tuple, IPPROTO_TCP);
	v = verdict;
	/* A failed update (the LRU cannot fail for room) only costs the
	 * next segment a lookup. */
	bpf_map_update_elem(&ct_verdicts, &tuple->ipv4, &v, BPF_ANY);
	return verdict;
}

/* Returns the counter of the host path the IPv4 packet at ip (l3_off bytes
 * into the frame, its header already validated) must take, or STAT_MAX when
 * the fast path is sound: STAT_TO_HOST_NAT for a NATed connection's packet,
 * STAT_TO_HOST_UNTRACKED for one conntrack cannot be asked about here. The
 * kfunc speaks TCP and UDP only, which is what services carry; ICMP other
 * than errors is not translated by kube-proxy. */
static __always_inline enum stat_id ct_host_path(struct __sk_buff *skb, const struct iphdr *ip,
						 __u32 l3_off)
{
	struct bpf_sock_tuple tuple = {};
	__u32 l4_off = l3_off + ip->ihl * 4;
	__u32 end = l3_off + bpf_ntohs(ip->tot_len);

	if (!ct_available)
		return STAT_MAX;
	/* Every fragment, the first too: the stack reassembles them before
	 * conntrack, and a datagram whose fragments took both paths could be
	 * reassembled by neither. */
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return STAT_TO_HOST_UNTRACKED;
	if (ip->protocol == IPPROTO_ICMP)
		return ct_icmp_verdict(skb, l4_off, end);
	if (ip->protocol == IPPROTO_SCTP_)
		return STAT_TO_HOST_UNTRACKED;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return STAT_MAX;
	if (ct_load_ports(skb, l4_off, end, &tuple))
		return STAT_TO_HOST_UNTRACKED;
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	if (ip->protocol == IPPROTO_TCP)
		return ct_tcp_verdict(skb, &tuple, l4_off, end);
	return ct_lookup_nat(skb, &tuple, ip->protocol);
}
