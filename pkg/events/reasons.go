package events

// messages say in words what each counter (and so each event reason) means.
// The counter names come from the datapath's BTF (datapath.StatNames); this
// table follows them by hand, and a test fails when a name has no words.
var messages = map[string]string{
	"local_redirect":       "redirected into a pod on this node",
	"encap":                "encapsulated toward another node",
	"decap":                "decapsulated for a local pod",
	"to_host":              "handed to the host stack",
	"arp_reply":            "ARP reply for the gateway",
	"drop_malformed":       "malformed packet",
	"drop_spoofed":         "source IP or MAC is not the pod's own",
	"drop_unregistered":    "the veth has no endpoint",
	"drop_unknown_tunnel":  "VXLAN from a source that is not a known node",
	"drop_bad_vni":         "VXLAN with a wrong VNI",
	"drop_no_endpoint":     "VXLAN for an inner destination that is no local pod",
	"drop_encap_failed":    "encapsulation failed (or a GSO packet the pod had already tunnelled: turn off tx-udp_tnl-segmentation on its eth0)",
	"events_lost":          "events lost to a full ring buffer",
	"to_host_nat":          "a NATed connection's packet, left to the host stack",
	"drop_vlan":            "a VLAN tag or VLAN ethertype from a pod",
	"drop_ipv6":            "IPv6 from a pod (not carried yet)",
	"drop_ethertype":       "an ethertype other than IPv4 and ARP from a pod",
	"drop_inner_spoofed":   "VXLAN whose inner source is not a pod or the address of the sending node",
	"to_host_untracked":    "conntrack cannot decide on the fast path (fragment, SCTP, unreadable header): left to the host stack",
	"to_host_encapsulated": "already encapsulated by the pod, left to the host stack",
	"events_suppressed":    "drop events held back by the rate limit",
	"to_host_too_big":      "longer than the tunnel (or the route to a native node) carries, left to the host stack (ICMP fragmentation needed for DF, else fragments)",
	"native_out":           "routed to a native node by the FIB, unencapsulated",
	"native_in":            "routed from a native node's pod, handed to the local pod",
	"drop_wire_spoofed":    "a routed packet from the wire with one of this node's pods as its source",
}

// Describe returns a reason in words, or "" for a reason it does not know
// (a datapath newer than this binary).
func Describe(reason string) string { return messages[reason] }
