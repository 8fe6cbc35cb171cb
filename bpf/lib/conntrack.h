/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Asks the kernel's conntrack whether a packet belongs to a NATed connection.
 * Such a packet must cross the host stack, where conntrack reverses the
 * translation: redirected past it, a reply from a service backend would reach
 * the client from the backend's address instead of the service's. */
#pragma once

#include "common.h"
#include "ipv4.h"

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

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple_len, struct bpf_ct_opts___pc *opts,
					 __u32 opts_len) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

#define IPS_SRC_NAT (1 << 4)
#define IPS_DST_NAT (1 << 5)

/* Returns 1 when conntrack has translated the connection of the IPv4 packet
 * at ip. The kfunc speaks TCP and UDP only, which is what services carry;
 * fragments carry no ports and stay on the fast path. */
static __always_inline int ct_is_natted(struct __sk_buff *skb, struct iphdr *ip)
{
	struct bpf_ct_opts___pc opts = { .netns_id = BPF_F_CURRENT_NETNS };
	struct bpf_sock_tuple tuple = {};
	struct nf_conn *ct;
	__be16 *ports;
	int natted;

	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return 0;
	ports = (void *)ip + ip->ihl * 4;
	if ((void *)(ports + 2) > ctx_data_end(skb))
		return 0;
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = ports[0];
	tuple.ipv4.dport = ports[1];
	opts.l4proto = ip->protocol;

	ct = bpf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));
	if (!ct)
		return 0;
	natted = (ct->status & (IPS_SRC_NAT | IPS_DST_NAT)) != 0;
	bpf_ct_release(ct);
	return natted;
}
