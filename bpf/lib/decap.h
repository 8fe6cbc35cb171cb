/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The rules a decapsulated packet is judged by, shared by from_uplink
 * (VXLAN decapsulated in eBPF) and from_tunnel (VXLAN the kernel's vxlan
 * socket decapsulated after reassembling it). */
#pragma once

#include "common.h"
#include "types.h"
#include "maps.h"
#include "conntrack.h"

/* Whom the sending node vouches for: its own pods, and itself. */
enum inner_source {
	INNER_REMOTE_POD,  /* a pod of the node that sent the tunnel */
	INNER_REMOTE_NODE, /* that node itself: host network, NodePort SNAT */
	INNER_FORGED,      /* anybody else: another node's pod, ours, the world */
};

/* VXLAN carries no authentication: a known node (or whoever forges its
 * address) could otherwise claim any source, and our pods would answer
 * another node's pod or trust a packet "from" their neighbour. A pod CIDR
 * in the node map names its node; only that node may send from it. */
static __always_inline enum inner_source inner_source(const struct iphdr *inner, __be32 outer_src)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = inner->saddr };
	const struct node_info *node = bpf_map_lookup_elem(&nodes, &key);

	if (node)
		return node->node_ip == outer_src ? INNER_REMOTE_POD : INNER_FORGED;
	return inner->saddr == outer_src ? INNER_REMOTE_NODE : INNER_FORGED;
}

/* This node routes the inner packet once; some packets must be routed by
 * the host stack instead, which gets them decapsulated, as they came: with
 * TTL 1, so that it answers; anything for a pod whose veth shapes its
 * traffic (EP_HOST_PATH); anything not from a remote pod (a node's own
 * traffic, NodePort and node-to-service traffic), since the pod's replies to
 * such sources always cross the stack, and conntrack must see both
 * directions or it marks them INVALID (which kube-proxy drops); and a reply
 * in a connection this node NATed (a pod's request to a service whose
 * backend is elsewhere), or one conntrack cannot be asked about here, so
 * that conntrack reverses it. Returns the host path's counter, or STAT_MAX
 * for the fast path. The inner IPv4 header at inner, l3_off bytes into the
 * frame, must be validated. */
static __always_inline enum stat_id decap_host_path(struct __sk_buff *skb, const struct iphdr *inner,
						    __u32 l3_off, const struct endpoint *ep,
						    enum inner_source src)
{
	if (inner->ttl <= 1 || (ep->flags & EP_HOST_PATH) || src != INNER_REMOTE_POD)
		return STAT_TO_HOST;
	return ct_host_path(skb, inner, l3_off);
}
