// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* to_uplink runs at tcx egress of the uplink. The host stack sends packets
 * for remote pod CIDRs here through the routes the agent installs (the node
 * talking to a remote pod, or forwarding a kube-proxy DNAT result); they are
 * encapsulated exactly as from_pod does it, unless the node is native. Our
 * own VXLAN packets pass through here too: their destination is a node, not a
 * pod CIDR. */

#include "lib/common.h"
#include "lib/types.h"
#include "lib/maps.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/verdict.h"
#include "lib/vxlan.h"

#define PROG PROG_TO_UPLINK

/* A packet the pod encapsulated itself (its own vxlan device) came through
 * from_pod and the host stack with skb->encapsulation set, which the ENCAP
 * flags refuse. Without a GSO type it is wrapped without them: the kernel's
 * inner_* offsets and csum_start keep pointing at the pod's inner headers,
 * so a pending inner checksum is still completed right (by the NIC, or by
 * skb_checksum_help). A GSO packet cannot be carried: segmentation would
 * follow the pod's tunnel (SKB_GSO_UDP_TUNNEL from the transport header the
 * pod set) and leave our outer UDP length and the pod's middle IPv4 header
 * as they are in every segment, so the wire would carry corrupt frames.
 * It is dropped instead, loudly; turning off tx-udp_tnl-segmentation on the
 * pod's eth0 makes the pod's kernel segment before the veth. */
static __always_inline int encap_nested(struct __sk_buff *skb, const struct node_info *node,
					const struct node_config *cfg)
{
	if (skb->gso_size) /* __sk_buff.gso_size: kernel 5.7 */
		return -1;
	return vxlan_encap(skb, node, cfg, VXLAN_NESTED_FLAGS, 0);
}

SEC("tcx/egress")
int to_uplink(struct __sk_buff *skb)
{
	struct lpm_v4_key key = { .prefixlen = 32 };
	const struct node_config *cfg;
	const struct node_info *node;
	struct ethhdr *eth = ctx_data(skb);
	struct iphdr *ip = (void *)(eth + 1);
	__u32 len = skb->len;
	int err;

	if ((void *)(ip + 1) > ctx_data_end(skb) || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	key.addr = ip->daddr;
	node = bpf_map_lookup_elem(&nodes, &key);
	/* A native node's pods are reached by the route the stack took. */
	if (!node || (node->flags & NODE_NATIVE))
		return TC_ACT_OK;
	cfg = node_config();
	if (!cfg || !cfg->node_ip)
		return TC_ACT_OK;
	/* The host stack already routed it: no TTL to take. */
	err = vxlan_encap(skb, node, cfg, VXLAN_ENCAP_FLAGS, 0);
	if (err == VXLAN_ERR_ENCAPSULATED)
		err = encap_nested(skb, node, cfg);
	if (err)
		return drop(skb, STAT_DROP_ENCAP_FAILED, PROG);
	/* As in from_pod, counted and traced as the packet the stack sent. */
	forwarded_at(skb, cfg, STAT_ENCAP, PROG, skb->ifindex, len, VXLAN_OVERHEAD);
	return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
