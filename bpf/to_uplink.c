// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* to_uplink runs at tcx egress of the uplink. The host stack sends packets
 * for remote pod CIDRs here through the routes the agent installs (the node
 * talking to a remote pod, or forwarding a kube-proxy DNAT result); they are
 * encapsulated exactly as from_pod does it. Our own VXLAN packets pass
 * through here too: their destination is a node, not a pod CIDR. */

#include "lib/common.h"
#include "types.h"
#include "maps.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/verdict.h"
#include "lib/vxlan.h"

#define PROG PROG_TO_UPLINK

SEC("tc")
int to_uplink(struct __sk_buff *skb)
{
	struct lpm_v4_key key = { .prefixlen = 32 };
	const struct node_config *cfg;
	const struct node_info *node;
	struct ethhdr *eth = ctx_data(skb);
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > ctx_data_end(skb) || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	key.addr = ip->daddr;
	node = bpf_map_lookup_elem(&nodes, &key);
	if (!node)
		return TC_ACT_OK;
	cfg = node_config();
	if (!cfg || !cfg->node_ip)
		return TC_ACT_OK;
	/* The host stack already routed it: no TTL to take. As in from_pod,
	 * the trace shows the inner packet. */
	forwarded(skb, cfg, STAT_ENCAP, PROG, skb->ifindex);
	if (vxlan_encap(skb, node, cfg))
		return drop(skb, STAT_DROP_ENCAP_FAILED, PROG);
	return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
