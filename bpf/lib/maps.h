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

/* The endpoint maps hold one entry per local pod each, under a 32-bit key
 * (an IPv4 address or an ifindex): one size for all, so that whichever one
 * an ADD writes first never fills up while the others have room. */
#define ENDPOINT_HASH(name, value_type)                   \
	struct {                                          \
		__uint(type, BPF_MAP_TYPE_HASH);          \
		__uint(max_entries, MAX_ENDPOINTS);       \
		__type(key, __u32);                       \
		__type(value, value_type);                \
		__uint(pinning, LIBBPF_PIN_BY_NAME);      \
	} name SEC(".maps")

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
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_NODES);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tunnel_srcs SEC(".maps");

/* TCP 4-tuple, as the NAT check's struct bpf_sock_tuple holds it, in the
 * packet's direction -> the check's verdict (lib/conntrack.h ct_tcp_verdict).
 * LRU: a pod opening connections by the thousand evicts other flows'
 * verdicts, which then cost one conntrack lookup again, never a wrong one. */
#define MAX_CT_VERDICTS 65536
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CT_VERDICTS);
	__type(key, typeof(((struct bpf_sock_tuple *)0)->ipv4));
	__type(value, __u32); /* enum stat_id */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct_verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

/* Declares name as stat_id -> value_type, per CPU: what the datapath keeps
 * per counter or drop reason is written on the packet path, so each CPU has
 * its own copy (no lock, no cache line shared between CPUs). The map has
 * slots entries, sized apart from STAT_MAX with room to spare, so that a new
 * stat_id needs no new map: readers use the stat_ids they know and ignore the
 * rest. Changing slots is a layout change (pkg/datapath/migrate.go); the
 * assert stops the build once STAT_MAX outgrows it. */
#define STAT_ID_ARRAY(name, value_type, slots)                                      \
	_Static_assert(STAT_MAX <= (slots), #name " needs an entry per stat_id"); \
	struct {                                                                    \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                            \
		__uint(max_entries, slots);                                         \
		__type(key, __u32);                                                 \
		__type(value, value_type);                                          \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                \
	} name SEC(".maps")

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
