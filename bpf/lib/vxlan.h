/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* VXLAN (RFC 7348) encapsulation, built in place with bpf_skb_adjust_room so
 * that no vxlan device sits in the forwarding path. */
#pragma once

#include "common.h"
#include "eth.h"
#include "ipv4.h"
#include "types.h"

struct vxlanhdr {
	__be32 flags; /* only the I bit: the VNI is valid */
	__be32 vni;   /* VNI in the upper 24 bits */
};

#define VXLAN_FLAG_VNI bpf_htonl(0x08000000)

/* Everything in front of the inner IP header after encapsulation. */
struct vxlan_outer {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr vxlan;
	struct ethhdr inner_eth;
} __attribute__((packed));

/* Outer IPv4 + UDP + VXLAN + inner Ethernet: what adjust_room inserts after
 * the MAC header. Pod MTU = uplink MTU - VXLAN_OVERHEAD. */
#define VXLAN_OVERHEAD (sizeof(struct vxlan_outer) - sizeof(struct ethhdr))

/* The same as a constant Go reads (bpf2go -type vxlan_layout) to size the
 * pod MTU, so that the overhead is computed in one place. */
enum vxlan_layout {
	VXLAN_LAYOUT_OVERHEAD = VXLAN_OVERHEAD,
};

/* The ENCAP_L3/L4 flags are what make GSO packets segment correctly on the
 * way out: without them the kernel accepts the call and every large TCP
 * segment vanishes later. FIXED_GSO keeps gso_size, which the pod's MTU
 * already accounts for. */
#define VXLAN_ENCAP_FLAGS                                                                      \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr)))

/* For an skb the pod already encapsulated (its own vxlan device), which the
 * ENCAP flags refuse: the room is made without touching skb->inner_* or
 * gso_type. The pod's checksum state stays valid because csum_start is
 * kept relative to skb->head, which inserting room after the MAC header
 * does not move. Only for packets that are not GSO: see to_uplink. */
#define VXLAN_NESTED_FLAGS BPF_F_ADJ_ROOM_FIXED_GSO

/* What bpf_skb_adjust_room returns for an skb with skb->encapsulation set
 * (bpf_skb_net_grow checks it before it moves a byte of the packet). */
#define VXLAN_ERR_ENCAPSULATED (-114) /* -EALREADY */

/* Decap keeps gso_size too: without FIXED_GSO the kernel grows it by the 50
 * bytes removed, and segments then exceed the pod's MTU. from_uplink adds
 * DECAP_L3_IPV4 where the kernel knows it (decap_l3_flag). */
#define VXLAN_DECAP_FLAGS BPF_F_ADJ_ROOM_FIXED_GSO

/* Source ports from the flow hash give ECMP in the underlay its entropy while
 * keeping each flow on one path; the range is the IANA dynamic one. */
static __always_inline __be16 vxlan_src_port(__u32 hash)
{
	return bpf_htons(0xc000 | ((hash ^ (hash >> 16)) & 0x3fff));
}

/* Wraps the IPv4 frame in skb for node, growing it with adjust_flags; with
 * forward, the inner packet's TTL is taken once it is wrapped, so that a
 * refused packet leaves exactly as it came. Returns 0, the helper's error
 * (VXLAN_ERR_ENCAPSULATED: the packet is untouched), or -1. */
static __always_inline int vxlan_encap(struct __sk_buff *skb, const struct node_info *node,
				       const struct node_config *cfg, __u64 adjust_flags,
				       int forward)
{
	__u32 hash = bpf_get_hash_recalc(skb);
	__u32 outer_len = skb->len - sizeof(struct ethhdr) + VXLAN_OVERHEAD;
	struct vxlan_outer *h;
	struct iphdr *inner;
	void *data_end;
	long err;

	err = bpf_skb_adjust_room(skb, VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, adjust_flags);
	if (err)
		return err;

	h = ctx_data(skb);
	data_end = ctx_data_end(skb);
	inner = (void *)(h + 1);
	if ((void *)(inner + 1) > data_end)
		return -1;
	if (forward)
		ipv4_decrease_ttl(inner);

	/* Outer Ethernet addresses are filled in by bpf_redirect_neigh. */
	h->eth.h_proto = bpf_htons(ETH_P_IP);

	h->ip.version = 4;
	h->ip.ihl = 5;
	h->ip.tos = inner->tos;
	/* Past 64 KiB only a GSO packet can be; the kernel takes 0 there and
	 * segmentation writes each segment's real length. */
	h->ip.tot_len = outer_len > 0xffff ? 0 : bpf_htons(outer_len);
	h->ip.frag_off = inner->frag_off & bpf_htons(IP_DF);
	h->ip.id = h->ip.frag_off ? 0 : (__be16)bpf_get_prandom_u32();
	h->ip.ttl = 64;
	h->ip.protocol = IPPROTO_UDP;
	h->ip.check = 0;
	h->ip.saddr = cfg->node_ip;
	h->ip.daddr = node->node_ip;
	/* &h->ip of a packed struct is 2-byte aligned, all ipv4_csum needs. */
	h->ip.check = ipv4_csum((void *)h + sizeof(h->eth));

	h->udp.source = vxlan_src_port(hash);
	h->udp.dest = bpf_htons(cfg->vxlan_port);
	h->udp.len = outer_len > 0xffff ? 0 : bpf_htons(outer_len - sizeof(struct iphdr));
	h->udp.check = 0; /* RFC 7348: zero over IPv4 */

	h->vxlan.flags = VXLAN_FLAG_VNI;
	h->vxlan.vni = bpf_htonl(cfg->vni << 8);

	mac_copy(h->inner_eth.h_dest, node->vtep_mac);
	mac_copy(h->inner_eth.h_source, cfg->uplink_mac);
	h->inner_eth.h_proto = bpf_htons(ETH_P_IP);
	return 0;
}
