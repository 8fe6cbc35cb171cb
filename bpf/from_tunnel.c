// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* from_tunnel runs at tcx ingress of pc-gro0, the idle external vxlan device
 * the agent keeps on the VXLAN port (pkg/agent/grosock.go). Only what
 * from_uplink left to the stack reaches that device's socket: above all
 * VXLAN that came in IP fragments, which the stack has reassembled. A
 * Flannel node's vxlan device sends its outer packets without DF, and an
 * underlay hop with a smaller MTU fragments them; without this program they
 * would die at the device. It judges the decapsulated frame by decap's rules
 * (lib/decap.h) and the tunnel metadata the vxlan socket recorded, and hands
 * it to the pod as from_uplink does. The device itself still delivers and
 * forwards nothing: every frame leaves here redirected or dropped. */

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/types.h"
#include "lib/maps.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/verdict.h"
#include "lib/decap.h"

#define PROG PROG_FROM_TUNNEL

/* The part of struct bpf_tunnel_key every kernel since 4.x takes: remote
 * IPv4 (host byte order) and the VNI. */
#define TUNNEL_KEY_LEN offsetof(struct bpf_tunnel_key, tunnel_label)

SEC("tcx/ingress")
int from_tunnel(struct __sk_buff *skb)
{
	const struct node_config *cfg = node_config();
	struct bpf_tunnel_key key = {};
	const struct endpoint *ep;
	enum inner_source src;
	enum stat_id via_host;
	struct ethhdr *eth;
	struct iphdr *inner;
	__be32 outer_src;

	if (!cfg || !cfg->node_ip || !cfg->uplink_ifindex)
		return drop(skb, STAT_DROP_UNKNOWN_TUNNEL, PROG);
	/* Without metadata the frame did not come from the socket. */
	if (bpf_skb_get_tunnel_key(skb, &key, TUNNEL_KEY_LEN, 0))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	outer_src = bpf_htonl(key.remote_ipv4);
	if (!bpf_map_lookup_elem(&tunnel_srcs, &outer_src))
		return drop(skb, STAT_DROP_UNKNOWN_TUNNEL, PROG);
	if (key.tunnel_id != cfg->vni)
		return drop(skb, STAT_DROP_BAD_VNI, PROG);

	if (ctx_pull(skb, sizeof(*eth) + sizeof(*inner)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	eth = ctx_data(skb);
	inner = (void *)(eth + 1);
	if ((void *)(inner + 1) > ctx_data_end(skb))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	if (eth->h_proto != bpf_htons(ETH_P_IP) || !ipv4_hdr_len(inner, skb->len - sizeof(*eth)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);

	src = inner_source(inner, outer_src);
	if (src == INNER_FORGED)
		return drop(skb, STAT_DROP_INNER_SPOOFED, PROG);
	ep = bpf_map_lookup_elem(&endpoints, &inner->daddr);
	if (!ep)
		return drop(skb, STAT_DROP_NO_ENDPOINT, PROG);

	via_host = decap_host_path(skb, inner, sizeof(*eth), ep, src);
	if (via_host != STAT_MAX) {
		/* The stack takes it as from_uplink's host path gives it: on
		 * the uplink, addressed to it. pc-gro0 forwards nothing. */
		mac_copy(eth->h_dest, cfg->uplink_mac);
		count(STAT_DECAP, skb->len);
		count(via_host, skb->len);
		return bpf_redirect(cfg->uplink_ifindex, BPF_F_INGRESS);
	}
	ipv4_decrease_ttl(inner);
	return redirect_to_pod(skb, eth, ep, cfg, STAT_DECAP, PROG);
}

char __license[] SEC("license") = "Dual BSD/GPL";
