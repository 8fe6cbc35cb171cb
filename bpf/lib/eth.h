/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Ethernet and ARP helpers. MACs are compared and copied as three 16-bit
 * words: every MAC we touch is 2-byte aligned, in packets and in maps. */
#pragma once

#include "common.h"

#define ARPHRD_ETHER_BE bpf_htons(1)
#define ARPOP_REQUEST_BE bpf_htons(1)
#define ARPOP_REPLY_BE bpf_htons(2)

/* ARP for IPv4 over Ethernet (RFC 826), the only kind pods send. */
struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__be32 spa;
	__u8 tha[6];
	__be32 tpa;
} __attribute__((packed));

static __always_inline int mac_eq(const void *a, const void *b)
{
	const __u16 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

static __always_inline void mac_copy(void *dst, const void *src)
{
	__u16 *d = dst;
	const __u16 *s = src;

	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
}

static __always_inline int mac_is_zero(const void *a)
{
	const __u16 *x = a;

	return !(x[0] | x[1] | x[2]);
}
