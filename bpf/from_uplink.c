// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* from_uplink runs at tcx ingress of the node's uplink. VXLAN from a known
 * node, to this node's IP, port and VNI, is decapsulated and handed straight
 * to the pod; so is a routed packet from a native node's pod, where there are
 * native nodes. Every other packet of the node passes untouched and
 * uncounted: the node's own traffic must never notice patchcord. */

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/types.h"
#include "lib/maps.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/verdict.h"
#include "lib/vxlan.h"
#include "lib/decap.h"

#define PROG PROG_FROM_UPLINK

/* Whether bpf_skb_adjust_room gets BPF_F_ADJ_ROOM_DECAP_L3_IPV4, which
 * kernels before 6.3 refuse (-EINVAL, the whole call). For IPv4 in IPv4 the
 * flag only says what the stack already knows: it changes skb->protocol
 * only where the outer and inner families differ, and clears neither
 * skb->encapsulation nor the tunnel GSO type (only bpf-next's DECAP_L4_UDP
 * does). The loader
 * clears it where the kernel lacks the flag (pkg/datapath/features.go). */
volatile const __u8 decap_l3_flag = 1;

/* Outer headers plus an option-less inner IPv4 header. */
#define VXLAN_MIN_LEN (sizeof(struct vxlan_outer) + sizeof(struct iphdr))

/* Returns 1 when the packet is VXLAN addressed to this node's tunnel
 * endpoint, without writing to it. */
static __always_inline int is_our_vxlan(struct __sk_buff *skb, const struct node_config *cfg)
{
	void *data = ctx_data(skb), *data_end = ctx_data_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);

	if ((void *)(udp + 1) > data_end)
		return 0;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP ||
	    ip->daddr != cfg->node_ip)
		return 0;
	/* Options or fragments: not something we sent; the stack decides. */
	if (ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return 0;
	return udp->dest == bpf_htons(cfg->vxlan_port);
}

/* A packet routed to one of our pods by a native node (or the fabric between
 * us) needs no more routing than the host stack would give it: the pod's
 * host route, through its veth. It gets that here, with the stack's judgement
 * where it matters: only a packet sent to this node's MAC (a switch floods
 * others, which are not ours to forward), and the same host paths as a
 * decapsulated packet. The fabric routes by destination only, so no source
 * is vouched for as a tunnel's outer header vouches for its inner one; a
 * source outside the native nodes' pod CIDRs is left to the stack as it was
 * before patchcord, and one that claims a pod of this node, which no router
 * would send here, is dropped. */
static __always_inline int from_native(struct __sk_buff *skb, const struct node_config *cfg)
{
	struct lpm_v4_key key = { .prefixlen = 32 };
	struct ethhdr *eth = ctx_data(skb);
	struct iphdr *ip = (void *)(eth + 1);
	const struct node_info *node;
	const struct endpoint *ep;
	enum stat_id via_host;

	if ((void *)(ip + 1) > ctx_data_end(skb) || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    skb->pkt_type != PACKET_HOST)
		return TC_ACT_OK;
	ep = bpf_map_lookup_elem(&endpoints, &ip->daddr);
	if (!ep)
		return TC_ACT_OK;
	if (!ipv4_hdr_len(ip, skb->len - sizeof(*eth)))
		return TC_ACT_OK;
	if (bpf_map_lookup_elem(&endpoints, &ip->saddr))
		return drop(skb, STAT_DROP_WIRE_SPOOFED, PROG);
	key.addr = ip->saddr;
	node = bpf_map_lookup_elem(&nodes, &key);
	if (!node || !(node->flags & NODE_NATIVE))
		return TC_ACT_OK;
	via_host = decap_host_path(skb, ip, sizeof(*eth), ep, INNER_REMOTE_POD);
	if (via_host != STAT_MAX) {
		count(via_host, skb->len);
		return TC_ACT_OK;
	}
	ipv4_decrease_ttl(ip);
	return redirect_to_pod(skb, eth, ep, cfg, STAT_NATIVE_IN, PROG);
}

SEC("tcx/ingress")
int from_uplink(struct __sk_buff *skb)
{
	const struct node_config *cfg = node_config();
	const struct endpoint *ep;
	enum inner_source src;
	struct vxlan_outer *h;
	struct iphdr *inner;
	void *data_end;
	enum stat_id via_host;

	if (!cfg || !cfg->node_ip)
		return TC_ACT_OK;
	/* Uplink drivers keep at least Ethernet, IP and UDP linear; when they
	 * do not, the packet is not looked at twice. */
	if (!is_our_vxlan(skb, cfg))
		return (cfg->flags & CFG_NATIVE) ? from_native(skb, cfg) : TC_ACT_OK;

	if (ctx_pull(skb, VXLAN_MIN_LEN))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	h = ctx_data(skb);
	data_end = ctx_data_end(skb);
	inner = (void *)(h + 1);
	if ((void *)(inner + 1) > data_end)
		return drop(skb, STAT_DROP_MALFORMED, PROG);

	if (!bpf_map_lookup_elem(&tunnel_srcs, &h->ip.saddr))
		return drop(skb, STAT_DROP_UNKNOWN_TUNNEL, PROG);
	if (!(h->vxlan.flags & VXLAN_FLAG_VNI))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	if (h->vxlan.vni != bpf_htonl(cfg->vni << 8))
		return drop(skb, STAT_DROP_BAD_VNI, PROG);
	if (h->inner_eth.h_proto != bpf_htons(ETH_P_IP) ||
	    !ipv4_hdr_len(inner, skb->len - sizeof(struct vxlan_outer)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);

	src = inner_source(inner, h->ip.saddr);
	if (src == INNER_FORGED)
		return drop(skb, STAT_DROP_INNER_SPOOFED, PROG);

	ep = bpf_map_lookup_elem(&endpoints, &inner->daddr);
	if (!ep)
		return drop(skb, STAT_DROP_NO_ENDPOINT, PROG);

	/* See decap_host_path: some packets are routed by the host stack. */
	via_host = decap_host_path(skb, inner, sizeof(struct vxlan_outer), ep, src);
	if (via_host == STAT_MAX)
		ipv4_decrease_ttl(inner);

	/* A packet GRO merged (the agent's pc-gro0 holds the port) is one
	 * TCPV4 | UDP_TUNNEL GSO packet with skb->encapsulation set, as a GSO
	 * packet encapsulated by a peer's to_uplink is when a veth carries it
	 * whole: the kernel shrinks TCP GSO packets, with or without the DECAP
	 * flag, and the bits it leaves harm neither the pod's TCP nor the
	 * stack's own segmentation (test/crossnode TestGRO). */
	if (bpf_skb_adjust_room(skb, -(int)VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC,
				VXLAN_DECAP_FLAGS | (decap_l3_flag ? ADJ_ROOM_DECAP_L3_IPV4 : 0)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);

	/* Kernels before 6.15 drop what ip_rcv sees as PACKET_OTHERHOST. */
	if (skb->pkt_type != PACKET_HOST)
		bpf_skb_change_type(skb, PACKET_HOST);

	h = ctx_data(skb);
	if ((void *)(&h->eth + 1) > ctx_data_end(skb))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	inner = (void *)(&h->eth + 1);
	if ((void *)(inner + 1) > ctx_data_end(skb))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	if (via_host != STAT_MAX) {
		/* The outer Ethernet header, addressed to the uplink, stays. */
		count(STAT_DECAP, skb->len);
		count(via_host, skb->len);
		return TC_ACT_OK;
	}
	return redirect_to_pod(skb, &h->eth, ep, cfg, STAT_DECAP, PROG);
}

char __license[] SEC("license") = "Dual BSD/GPL";
