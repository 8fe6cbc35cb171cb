/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* How packets leave a program: every verdict is counted, every drop leaves
 * through drop() so that it is counted and reported with its reason (at a
 * limited rate), and forwarded packets are traced only while someone runs
 * `patchcord monitor`. */
#pragma once

#include "maps.h"
#include "ipv4.h"
#include "eth.h"

static __always_inline void count(enum stat_id id, __u32 len)
{
	__u32 key = id;
	struct stat_counter *c = bpf_map_lookup_elem(&stats, &key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* Best effort: an event describes whatever headers the packet has from off
 * on (0, or past the tunnel headers of a packet we encapsulated). */
static __always_inline void event_fill_tuple(struct __sk_buff *skb, struct event *ev, __u32 off)
{
	void *data = ctx_data(skb), *data_end = ctx_data_end(skb);
	struct ethhdr *eth = data + off;
	struct iphdr *ip;
	__be16 *ports;

	if ((void *)(eth + 1) > data_end)
		return;
	ev->eth_proto = eth->h_proto;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return;
	ev->saddr = ip->saddr;
	ev->daddr = ip->daddr;
	ev->proto = ip->protocol;
	if (ip->ihl < 5 || (ip->frag_off & bpf_htons(IP_OFFSET)))
		return;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return;
	ports = (void *)ip + ip->ihl * 4;
	if ((void *)(ports + 2) > data_end)
		return;
	ev->sport = ports[0];
	ev->dport = ports[1];
}

static __always_inline void emit_at(struct __sk_buff *skb, enum event_kind kind, enum stat_id reason,
				    enum prog_id prog, __u32 target, __u32 len, __u32 off)
{
	struct event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev) {
		/* A full ring loses the event, never the packet. */
		count(STAT_EVENTS_LOST, 0);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = skb->ifindex;
	ev->target = target;
	ev->len = len;
	ev->cpu = bpf_get_smp_processor_id();
	ev->kind = kind;
	ev->reason = reason;
	ev->prog = prog;
	event_fill_tuple(skb, ev, off);
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void emit(struct __sk_buff *skb, enum event_kind kind, enum stat_id reason,
				 enum prog_id prog, __u32 target)
{
	emit_at(skb, kind, reason, prog, target, skb->len, 0);
}

#define NSEC_PER_SEC 1000000000ULL

/* Takes a token from the bucket of reason on this CPU, or says there is
 * none. Without the limit a pod spraying forged packets would take the
 * ring's lock on every packet and crowd every other drop out of it. The
 * bucket is per CPU, so nothing is shared between CPUs, and per reason, so
 * one flood hides no other kind of drop. A drop on one CPU never
 * interrupts another on the same CPU (tc runs with bottom halves off), so
 * the read-modify-write needs no atomics. */
static __always_inline int event_admit(enum stat_id reason)
{
	const struct node_config *cfg = node_config();
	__u64 rate = EVENT_RATE_DEFAULT, burst = EVENT_BURST_DEFAULT;
	__u64 cost, cap, credit, now;
	__u32 key = reason;
	struct event_bucket *b = bpf_map_lookup_elem(&event_buckets, &key);

	if (!b)
		return 1;
	if (cfg && cfg->event_rate)
		rate = cfg->event_rate;
	if (cfg && cfg->event_burst)
		burst = cfg->event_burst;
	/* At most 1e9 ns per token and 2^32 tokens: cap fits in 63 bits. A
	 * rate above 1e9/s costs nothing: no limit. */
	cost = NSEC_PER_SEC / rate;
	cap = burst * cost;
	now = bpf_ktime_get_ns();
	/* A fresh bucket (last_ns 0) fills at once: uptime exceeds cap. */
	credit = b->credit_ns;
	if (now > b->last_ns)
		credit += now - b->last_ns;
	if (credit > cap)
		credit = cap;
	b->last_ns = now;
	if (credit < cost) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

/* Every drop is counted; its event is rate-limited (event_admit). Traces
 * are not: they flow only while a monitor asked for them, and a trace
 * monitor follows one flow among all, which a limit would hide. */
static __always_inline int drop(struct __sk_buff *skb, enum stat_id reason, enum prog_id prog)
{
	count(reason, skb->len);
	if (event_admit(reason))
		emit(skb, EVENT_DROP, reason, prog, 0);
	else
		count(STAT_EVENTS_SUPPRESSED, 0);
	return TC_ACT_SHOT;
}

/* Counts a forwarded packet of len bytes whose own headers start at off:
 * an encapsulated packet is counted and traced as it was before it was
 * wrapped, so a trace shows the pod's 5-tuple rather than the tunnel's. */
static __always_inline void forwarded_at(struct __sk_buff *skb, const struct node_config *cfg,
					 enum stat_id path, enum prog_id prog, __u32 target,
					 __u32 len, __u32 off)
{
	count(path, len);
	if (cfg && (cfg->flags & CFG_TRACE))
		emit_at(skb, EVENT_TRACE, path, prog, target, len, off);
}

/* Counts a forwarded packet; call it when the packet is in its final shape. */
static __always_inline void forwarded(struct __sk_buff *skb, const struct node_config *cfg,
				      enum stat_id path, enum prog_id prog, __u32 target)
{
	forwarded_at(skb, cfg, path, prog, target, skb->len, 0);
}

/* Hands the frame at eth to the pod of ep past the host stack, from its
 * gateway (the host veth) to the pod, counted and traced under path: the
 * last step of every path that ends in a pod. */
static __always_inline int redirect_to_pod(struct __sk_buff *skb, struct ethhdr *eth,
					   const struct endpoint *ep, const struct node_config *cfg,
					   enum stat_id path, enum prog_id prog)
{
	mac_copy(eth->h_source, ep->host_mac);
	mac_copy(eth->h_dest, ep->mac);
	forwarded(skb, cfg, path, prog, ep->ifindex);
	return bpf_redirect_peer(ep->ifindex, 0);
}
