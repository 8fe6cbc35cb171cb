/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the datapath, declared once. All are pinned under
 * <bpffs root>/maps, so the three programs (and Go) share one set. Go picks
 * each pin by the map's layout version (pkg/datapath/migrate.go): a change to
 * a map's type, key, value or size here is a new layout there, with a
 * converter from the last one. */
#pragma once

#include "common.h"
#include "types.h"

#define MAX_ENDPOINTS 16384
#define MAX_NODES 16384

/* A map every object shares, pinned by name under the bpffs root. */
#define PINNED_MAP(name, map_type, entries, key_type, value_type) \
	struct {                                                  \
		__uint(type, map_type);                           \
		__uint(max_entries, entries);                     \
		__type(key, key_type);                            \
		__type(value, value_type);                        \
		__uint(pinning, LIBBPF_PIN_BY_NAME);              \
	} name SEC(".maps")

/* The endpoint maps hold one entry per local pod each, under a 32-bit key
 * (an IPv4 address or an ifindex): one size for all, so that whichever one
 * an ADD writes first never fills up while the others have room. */
#define ENDPOINT_HASH(name, value_type) PINNED_MAP(name, BPF_MAP_TYPE_HASH, MAX_ENDPOINTS, __u32, value_type)

/* pod IPv4 -> endpoint; forwarding to local pods. */
ENDPOINT_HASH(endpoints, struct endpoint);

/* host veth ifindex -> endpoint; who may send from this veth. */
ENDPOINT_HASH(ep_by_ifindex, struct endpoint);

/* pod IPv4 -> owner; written and read by Go only. */
ENDPOINT_HASH(ep_meta, struct endpoint_meta);

/* remote pod CIDR -> node. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_NODES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, struct node_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nodes SEC(".maps");

/* remote node IPv4 -> present; VXLAN is decapsulated only from these. */
PINNED_MAP(tunnel_srcs, BPF_MAP_TYPE_HASH, MAX_NODES, __u32, __u32);

/* TCP 4-tuple, as the NAT check's struct bpf_sock_tuple holds it, in the
 * packet's direction -> the check's verdict, an enum stat_id
 * (lib/conntrack.h ct_tcp_verdict).
 * LRU: a pod opening connections by the thousand evicts other flows'
 * verdicts, which then cost one conntrack lookup again, never a wrong one. */
#define MAX_CT_VERDICTS 65536
PINNED_MAP(ct_verdicts, BPF_MAP_TYPE_LRU_HASH, MAX_CT_VERDICTS, typeof(((struct bpf_sock_tuple *)0)->ipv4), __u32);

PINNED_MAP(config, BPF_MAP_TYPE_ARRAY, 1, __u32, struct node_config);

/* Declares name as stat_id -> value_type, per CPU: what the datapath keeps
 * per counter or drop reason is written on the packet path, so each CPU has
 * its own copy (no lock, no cache line shared between CPUs). The map has
 * slots entries, sized apart from STAT_MAX with room to spare, so that a new
 * stat_id needs no new map: readers use the stat_ids they know and ignore the
 * rest. Changing slots is a layout change (pkg/datapath/migrate.go); the
 * assert stops the build once STAT_MAX outgrows it. */
#define STAT_ID_ARRAY(name, value_type, slots)                                      \
	_Static_assert(STAT_MAX <= (slots), #name " needs an entry per stat_id"); \
	PINNED_MAP(name, BPF_MAP_TYPE_PERCPU_ARRAY, slots, __u32, value_type)

#define STAT_SLOTS 128
STAT_ID_ARRAY(stats, struct stat_counter, STAT_SLOTS);

/* Drop-event budget of one CPU for one reason, as a token bucket whose
 * tokens are nanoseconds of refill time: an event costs 1 s / rate of them,
 * the bucket holds burst events' worth. */
struct event_bucket {
	__u64 credit_ns;
	__u64 last_ns; /* bpf_ktime_get_ns of the last drop of the reason */
};

STAT_ID_ARRAY(event_buckets, struct event_bucket, 64);

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

static __always_inline const struct node_config *node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}
