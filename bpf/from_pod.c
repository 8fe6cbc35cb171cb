// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* from_pod runs at tcx ingress of every host-side pod veth: it sees every
 * packet a pod sends. It answers the pod's ARP for its gateway, drops what the
 * pod may not send, hands packets for pods on this node straight into their
 * namespace, and sends packets for other nodes' pods out of the uplink: wrapped
 * in VXLAN, or routed as they are where the network knows their pod CIDR.
 * Everything else (the node itself, services, the outside world) goes to the host stack. */

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/types.h"
#include "lib/maps.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/verdict.h"
#include "lib/vxlan.h"

#define PROG PROG_FROM_POD

/* BTF holds only types something refers to, and bpf2go -type reads BTF:
 * these unused globals are what give Go its struct event and the event
 * limit defaults. */
const struct event *unused_event __attribute__((unused));
const enum event_limit_defaults *unused_limits __attribute__((unused));
const enum vxlan_layout *unused_layout __attribute__((unused));
const enum node_flags *unused_node_flags __attribute__((unused));

static __always_inline int to_host(struct __sk_buff *skb)
{
	count(STAT_TO_HOST, skb->len);
	return TC_ACT_OK;
}

static __always_inline int handle_arp(struct __sk_buff *skb, const struct endpoint *src)
{
	void *data = ctx_data(skb), *data_end = ctx_data_end(skb);
	struct ethhdr *eth = data;
	struct arp_eth_ipv4 *arp = (void *)(eth + 1);
	__be32 sender;

	if ((void *)(arp + 1) > data_end)
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	/* Linux's arp_rcv drops ARP with other address sizes itself. */
	if (arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != ETH_ALEN || arp->plen != 4)
		return to_host(skb);
	/* A pod may only announce itself; 0.0.0.0 is a duplicate-address probe.
	 * Checked for any hardware type: Linux's arp_process takes type 6
	 * (IEEE 802) on Ethernet devices as it takes type 1. */
	sender = arp->spa;
	if (!mac_eq(arp->sha, src->mac) || !mac_eq(eth->h_source, src->mac) ||
	    (sender != src->ip && sender != 0))
		return drop(skb, STAT_DROP_SPOOFED, PROG);
	if (arp->htype != ARPHRD_ETHER_BE || arp->op != ARPOP_REQUEST_BE ||
	    arp->tpa != bpf_htonl(POD_GATEWAY_IP))
		return to_host(skb);

	/* Turn the request around in place: the gateway is this veth. */
	mac_copy(eth->h_dest, eth->h_source);
	mac_copy(eth->h_source, src->host_mac);
	arp->op = ARPOP_REPLY_BE;
	mac_copy(arp->tha, arp->sha);
	arp->tpa = sender;
	mac_copy(arp->sha, src->host_mac);
	arp->spa = bpf_htonl(POD_GATEWAY_IP);
	count(STAT_ARP_REPLY, skb->len);
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int to_local_pod(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
					const struct endpoint *dst)
{
	/* A service backend answering a client on this node: only the stack
	 * can turn the backend's address back into the service's. */
	enum stat_id via_host = ct_host_path(skb, ip, sizeof(*eth));

	if (via_host != STAT_MAX) {
		count(via_host, skb->len);
		return TC_ACT_OK;
	}
	ipv4_decrease_ttl(ip);
	return redirect_to_pod(skb, eth, dst, node_config(), STAT_LOCAL_REDIRECT, PROG);
}

/* The length of the longest IPv4 packet skb puts on the wire: the packet,
 * or one segment of a GSO packet, which carries the IP and L4 headers and
 * gso_size bytes. 0 when a TCP header that must be read cannot be. */
static __always_inline __u32 wire_len(struct __sk_buff *skb, const struct iphdr *ip)
{
	__u32 l4_off = sizeof(struct ethhdr) + ip->ihl * 4;
	__u32 seg_hdr = ip->ihl * 4;
	__u8 doff;

	if (!skb->gso_size)
		return bpf_ntohs(ip->tot_len);
	if (ip->protocol == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4_off + 12, &doff, 1))
			return 0;
		seg_hdr += (doff >> 4) * 4;
	} else if (ip->protocol == IPPROTO_UDP) {
		seg_hdr += 8; /* struct udphdr */
	}
	return seg_hdr + skb->gso_size;
}

/* Whether the packet, or one segment of a GSO packet, is longer than the
 * tunnel carries (cfg->mtu: the uplink's MTU less VXLAN's headers), so that
 * encapsulated it would not fit the uplink and die there unseen. A pod whose
 * MTU is that never sends one; one with a larger MTU does: set by itself, by
 * a chained plugin's conflist, or by the agent where it routes every node
 * natively and a source still tunnels one. The host stack forwards such a
 * packet by the route's MTU, which is the tunnel's: an ICMP "fragmentation
 * needed" to the pod for a DF packet, which lowers its path MTU, and
 * fragments for the rest, each encapsulated by to_uplink. */
static __always_inline int too_big(struct __sk_buff *skb, const struct iphdr *ip,
				    const struct node_config *cfg)
{
	__u32 len;

	if (!cfg->mtu)
		return 0;
	len = wire_len(skb, ip);
	return !len || len > cfg->mtu;
}

/* A node reached by routing: the kernel's FIB (the agent's route to the
 * node's pod CIDR, or one BGP taught it) picks the next hop, and the packet
 * leaves the uplink as the stack would have forwarded it, without the stack.
 * What the FIB would not send out of the uplink as it is (no route, a route
 * elsewhere, longer than the route's MTU, forwarding off) is the stack's to
 * forward or refuse, with the ICMP a router owes. tot_len asks the FIB to
 * check the MTU; for a GSO packet it is one segment's length, since the
 * uplink sends segments. */
static __always_inline int to_native_node(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip)
{
	const struct node_config *cfg = node_config();
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.tos = ip->tos,
		.l4_protocol = ip->protocol,
		.ipv4_src = ip->saddr,
		.ipv4_dst = ip->daddr,
		.ifindex = skb->ifindex,
	};
	__u32 len = skb->len;
	long ret;

	if (!cfg || !cfg->uplink_ifindex)
		return to_host(skb);
	fib.tot_len = wire_len(skb, ip);
	if (!fib.tot_len)
		return to_host(skb);
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		count(STAT_TO_HOST_TOO_BIG, len);
		return TC_ACT_OK;
	}
	if ((ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    fib.ifindex != cfg->uplink_ifindex)
		return to_host(skb);
	ipv4_decrease_ttl(ip);
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The FIB put the next hop where the destination was; the
		 * neighbour subsystem resolves it and sends the packet on. */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };

		forwarded_at(skb, cfg, STAT_NATIVE_OUT, PROG, fib.ifindex, len, 0);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	mac_copy(eth->h_dest, fib.dmac);
	mac_copy(eth->h_source, fib.smac);
	forwarded_at(skb, cfg, STAT_NATIVE_OUT, PROG, fib.ifindex, len, 0);
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline int to_remote_node(struct __sk_buff *skb, const struct iphdr *ip,
					  const struct node_info *node)
{
	const struct node_config *cfg = node_config();
	__u32 len = skb->len;
	int err;

	/* Until the agent has configured the uplink, the host stack decides. */
	if (!cfg || !cfg->uplink_ifindex || !cfg->node_ip)
		return to_host(skb);
	if (too_big(skb, ip, cfg)) {
		count(STAT_TO_HOST_TOO_BIG, len);
		return TC_ACT_OK;
	}
	/* Nothing touches the packet before vxlan_encap: a packet the pod
	 * tunnels itself (skb->encapsulation, which no BPF context field
	 * shows) is refused before the helper moves a byte, and goes to the
	 * host stack as the pod sent it; the stack routes it to the uplink,
	 * where to_uplink wraps it the way such a packet can be wrapped. */
	err = vxlan_encap(skb, node, cfg, VXLAN_ENCAP_FLAGS, 1);
	if (err == VXLAN_ERR_ENCAPSULATED) {
		count(STAT_TO_HOST_ENCAPSULATED, len);
		return TC_ACT_OK;
	}
	if (err)
		return drop(skb, STAT_DROP_ENCAP_FAILED, PROG);
	/* Counted and traced as the pod's packet, not the tunnel's. */
	forwarded_at(skb, cfg, STAT_ENCAP, PROG, cfg->uplink_ifindex, len, VXLAN_OVERHEAD);
	return bpf_redirect_neigh(cfg->uplink_ifindex, NULL, 0, 0);
}

static __always_inline int handle_ipv4(struct __sk_buff *skb, const struct endpoint *src)
{
	struct lpm_v4_key key = { .prefixlen = 32 };
	const struct endpoint *dst;
	const struct node_info *node;
	struct ethhdr *eth;
	struct iphdr *ip;

	if (ctx_pull(skb, sizeof(*eth) + sizeof(*ip)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	eth = ctx_data(skb);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > ctx_data_end(skb))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	if (!ipv4_hdr_len(ip, skb->len - sizeof(*eth)))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	if (ip->saddr != src->ip || !mac_eq(eth->h_source, src->mac))
		return drop(skb, STAT_DROP_SPOOFED, PROG);
	/* TC_ACT_UNSPEC lets the veth's own tc filters (the bandwidth
	 * plugin's redirect to its ifb) run before the host stack. */
	if (src->flags & EP_HOST_PATH) {
		count(STAT_TO_HOST, skb->len);
		return TC_ACT_UNSPEC;
	}

	/* With TTL 1 the packet must not be forwarded; the host stack sends
	 * the ICMP time exceeded a router owes the sender. */
	if (ip->ttl <= 1)
		return to_host(skb);

	dst = bpf_map_lookup_elem(&endpoints, &ip->daddr);
	if (dst && !(dst->flags & EP_HOST_PATH))
		return to_local_pod(skb, eth, ip, dst);
	if (dst)
		return to_host(skb);

	key.addr = ip->daddr;
	node = bpf_map_lookup_elem(&nodes, &key);
	if (node) {
		enum stat_id via_host = ct_host_path(skb, ip, sizeof(*eth));

		if (via_host != STAT_MAX) {
			count(via_host, skb->len);
			return TC_ACT_OK;
		}
		if (node->flags & NODE_NATIVE)
			return to_native_node(skb, eth, ip);
		return to_remote_node(skb, ip, node);
	}
	return to_host(skb);
}

/* VLAN ethertypes: 802.1Q, 802.1ad and the pre-standard QinQ 0x9100. A pod
 * has no say in the underlay's VLANs, and the host stack strips stacked tags
 * before anyone checks what is inside them. */
static __always_inline int eth_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD) ||
	       proto == bpf_htons(0x9100);
}

/* Default deny: a pod may send IPv4 and ARP, nothing else. */
SEC("tcx/ingress")
int from_pod(struct __sk_buff *skb)
{
	const struct endpoint *src;
	struct ethhdr *eth;
	__u32 ifindex = skb->ifindex;

	/* from_pod is attached only after its endpoint is registered and
	 * detached before it is removed, so a miss means someone attached it
	 * by hand: fail closed, before anything of the packet is believed. */
	src = bpf_map_lookup_elem(&ep_by_ifindex, &ifindex);
	if (!src)
		return drop(skb, STAT_DROP_UNREGISTERED, PROG);

	eth = ctx_data(skb);
	if ((void *)(eth + 1) > ctx_data_end(skb))
		return drop(skb, STAT_DROP_MALFORMED, PROG);
	/* One 802.1Q tag is taken into skb->vlan_tci before tc ingress, so the
	 * frame shows its inner ethertype; the tag would survive encapsulation
	 * and pick the underlay's VLAN. */
	if (skb->vlan_present || eth_is_vlan(eth->h_proto))
		return drop(skb, STAT_DROP_VLAN, PROG);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return handle_arp(skb, src);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return handle_ipv4(skb, src);
	/* Until patchcord carries IPv6, a pod's IPv6 would reach the node's
	 * link-local services with any source it likes. */
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return drop(skb, STAT_DROP_IPV6, PROG);
	return drop(skb, STAT_DROP_ETHERTYPE, PROG);
}

char __license[] SEC("license") = "Dual BSD/GPL";
