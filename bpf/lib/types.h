/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The structs and enums that Go reads or writes. bpf2go -type (the list in
 * pkg/datapath/gen.go) turns each of them into a Go type in the generated
 * frompod_bpfel.go, which pkg/datapath/types.go names for the other packages,
 * so none is written twice.
 * Addresses are kept in network byte order, as they sit in the packet, so the
 * per-packet path never converts them; ports and VNIs are host order. */
#pragma once

#include <linux/types.h>

/* The gateway every pod routes through; from_pod answers ARP for it. An
 * enum, not a #define, so that Go reads it from BTF (datapath.PodGateway)
 * and it is written only here. */
enum pod_gateway {
	POD_GATEWAY_IP = 0xa9fe0101, /* 169.254.1.1, host order */
};

#ifdef BTF_EXPORTS
/* BTF holds only types something refers to: this unused global keeps enum
 * pod_gateway in the one object Go reads types from (gen.go defines
 * BTF_EXPORTS for from_pod only, so the others' objects stay as they are). */
const enum pod_gateway *unused_gateway __attribute__((unused));
#endif

enum endpoint_flags {
	/* The pod's traffic must cross the host veth's qdiscs (the bandwidth
	 * plugin shapes there): nothing is redirected to or from it. */
	EP_HOST_PATH = 1 << 0,
};

/* Value of both endpoint maps: by pod IP (forwarding) and by host veth
 * ifindex (anti-spoofing, ARP replies). */
struct endpoint {
	__u32 ip;          /* pod IPv4 */
	__u32 ifindex;     /* host-side veth */
	__u8 mac[6];       /* the pod's own interface */
	__u8 host_mac[6];  /* host-side veth: the pod's gateway MAC */
	enum endpoint_flags flags;
};

/* What the datapath never reads but an operator wants to see: which
 * container owns an endpoint. Kept in a map beside the endpoints so the CNI
 * plugin needs no state directory and DEL can find what ADD made. */
struct endpoint_meta {
	char container_id[128];
	char ifname[16];      /* inside the pod */
	char host_ifname[16];
	char netns[256];
	char network[64];     /* the conflist's name: GC of one network leaves others alone */
};

struct lpm_v4_key {
	__u32 prefixlen;
	__u32 addr;
};

/* How a remote node's pods are reached (node_info.flags). */
enum node_flags {
	/* Routed, not tunnelled: the network knows the node's pod CIDR (one
	 * L2 segment with the agent's route, or a fabric that learned it by
	 * BGP), so packets leave the uplink as they are. */
	NODE_NATIVE = 1 << 0,
};

/* A remote node, found by longest-prefix match on its pod CIDR. */
struct node_info {
	__u32 node_ip;
	/* Inner destination MAC a kernel vxlan peer (flannel.1) expects; zero
	 * for patchcord peers, which ignore it. */
	__u8 vtep_mac[6];
	__u16 flags; /* enum node_flags */
};

enum config_flags {
	CFG_TRACE = 1 << 0, /* emit a trace event per forwarded packet */
	/* Some remote node is NODE_NATIVE: from_uplink looks for routed
	 * packets to local pods. Without it, the node's own traffic is not
	 * looked up at all. */
	CFG_NATIVE = 1 << 1,
	/* Pods get the uplink's whole MTU, not mtu: the agent routes every
	 * node natively. Read by the CNI plugin only. */
	CFG_POD_UPLINK_MTU = 1 << 2,
};

/* Node-wide settings. An array map rather than load-time constants because
 * the CNI plugin may load the datapath before the agent knows them. */
struct node_config {
	__u32 node_ip;
	__u32 uplink_ifindex;
	__u8 uplink_mac[6];
	__u16 vxlan_port;
	__u32 vni;
	/* The longest packet the tunnel carries: the uplink's MTU less
	 * VXLAN's headers. from_pod checks packets to tunnelled nodes
	 * against it; it is the pod MTU unless CFG_POD_UPLINK_MTU. */
	__u32 mtu;
	enum config_flags flags;
	/* Drop events per second and burst, per CPU and per drop reason
	 * (lib/verdict.h: event_admit); 0 stands for the defaults below. */
	__u32 event_rate;
	__u32 event_burst;
};

/* What a zero event_rate or event_burst stands for. A flood of one reason
 * on one CPU then costs the ring 100 records of 64 bytes a second after a
 * first 200, 5% of its 4096: the monitor keeps up, the ring keeps room for
 * every other reason and CPU, and a burst of a few hundred drops (a pod
 * misconfigured at start) is still seen whole. */
enum event_limit_defaults {
	EVENT_RATE_DEFAULT = 100,
	EVENT_BURST_DEFAULT = 200,
};

/* Per-CPU counters. Go names them from this enum's BTF:
 * STAT_DROP_SPOOFED becomes "drop_spoofed". Append only: the stats map
 * outlives upgrades, and an ID keeps its counter across them. The map has
 * STAT_SLOTS entries (lib/maps.h), so appending needs no migration. */
enum stat_id {
	STAT_LOCAL_REDIRECT,
	STAT_ENCAP,
	STAT_DECAP,
	STAT_TO_HOST,
	STAT_ARP_REPLY,
	STAT_DROP_MALFORMED,
	STAT_DROP_SPOOFED,
	STAT_DROP_UNREGISTERED,
	STAT_DROP_UNKNOWN_TUNNEL,
	STAT_DROP_BAD_VNI,
	STAT_DROP_NO_ENDPOINT,
	STAT_DROP_ENCAP_FAILED,
	STAT_EVENTS_LOST,
	STAT_TO_HOST_NAT, /* a NATed connection's packet, left to the stack */
	STAT_DROP_VLAN,   /* a pod sent a VLAN tag or a VLAN ethertype */
	STAT_DROP_IPV6,   /* a pod sent IPv6, which patchcord does not carry yet */
	STAT_DROP_ETHERTYPE, /* a pod sent neither IPv4 nor ARP */
	STAT_DROP_INNER_SPOOFED, /* decapsulated source not of the sending node */
	STAT_TO_HOST_UNTRACKED, /* conntrack cannot decide on the fast path */
	STAT_TO_HOST_ENCAPSULATED, /* the pod tunnels itself: no encap in eBPF */
	STAT_EVENTS_SUPPRESSED, /* drop events held back by the rate limit */
	STAT_TO_HOST_TOO_BIG, /* larger than the pod MTU: left to the stack's PMTU */
	STAT_NATIVE_OUT, /* a pod's packet routed to a native node, past the stack */
	STAT_NATIVE_IN,  /* a routed packet from the uplink handed to a local pod */
	STAT_DROP_WIRE_SPOOFED, /* a routed packet from the wire with a local pod's source */
	STAT_MAX,
};

struct stat_counter {
	__u64 packets;
	__u64 bytes;
};

enum prog_id {
	PROG_FROM_POD = 1,
	PROG_FROM_UPLINK,
	PROG_TO_UPLINK,
	PROG_FROM_TUNNEL,
};

enum event_kind {
	EVENT_DROP = 1,
	EVENT_TRACE,
};

/* One ring-buffer record for `patchcord monitor`. */
struct event {
	__u64 ts_ns;       /* bpf_ktime_get_ns */
	__u32 ifindex;     /* where the packet was seen */
	__u32 target;      /* ifindex it was sent to (traces), 0 otherwise */
	__u32 len;
	__u32 cpu;
	enum event_kind kind;
	enum stat_id reason;
	enum prog_id prog;
	__u32 saddr;
	__u32 daddr;
	__be16 sport;
	__be16 dport;
	__be16 eth_proto;
	__u8 proto;        /* IP protocol, 0 if not IPv4 */
	__u8 pad;
};
