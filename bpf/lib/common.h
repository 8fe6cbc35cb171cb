/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Kernel UAPI and libbpf includes every program needs, plus the few
 * definitions Debian's UAPI headers lack. */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf_endian.h>
#include <bpf_helpers.h>

/* Kernel 6.3 names; linux-libc-dev 6.1 does not have them. */
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

/* linux/socket.h is not UAPI; the FIB and neighbour helpers want it. */
#ifndef AF_INET
#define AF_INET 2
#endif

#ifndef PACKET_HOST
#define PACKET_HOST 0
#endif

#define ctx_data(skb) ((void *)(long)(skb)->data)
#define ctx_data_end(skb) ((void *)(long)(skb)->data_end)

/* Makes the first len bytes of the packet directly readable. Headers are
 * almost always in the linear part already; pulling is the rare slow path
 * (and it unclones, so it is never done for traffic we only look at). */
static __always_inline int ctx_pull(struct __sk_buff *skb, __u32 len)
{
	if (ctx_data(skb) + len <= ctx_data_end(skb))
		return 0;
	if (skb->len < len)
		return -1;
	if (bpf_skb_pull_data(skb, len))
		return -1;
	return ctx_data(skb) + len <= ctx_data_end(skb) ? 0 : -1;
}
