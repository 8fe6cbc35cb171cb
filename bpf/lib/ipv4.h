/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv4 header checks and the arithmetic of forwarding. */
#pragma once

#include "common.h"

/* frag_off bits, host order (the kernel keeps these out of UAPI). */
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Checksum of an option-less header whose check field is zero. */
static __always_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return csum_fold(sum);
}

/* A router's TTL decrement with the incremental checksum update of RFC 1624,
 * as the kernel's ip_decrease_ttl does it. */
static __always_inline void ipv4_decrease_ttl(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check + (__u32)bpf_htons(0x0100);

	ip->check = (__sum16)(check + (check >= 0xffff));
	ip->ttl--;
}

/* Validates the header at ip against the packet it sits in. Returns the
 * header length, or 0 when the packet cannot be a sound IPv4 packet. len is
 * the number of bytes from ip to the end of the packet. */
static __always_inline __u32 ipv4_hdr_len(const struct iphdr *ip, __u32 len)
{
	__u32 hlen = ip->ihl * 4;
	__u32 tot = bpf_ntohs(ip->tot_len);

	if (ip->version != 4 || hlen < sizeof(*ip))
		return 0;
	if (tot < hlen || tot > len)
		return 0;
	return hlen;
}
