// This file tests to_uplink through BPF_PROG_RUN: what the host stack routes
// out of the uplink to a remote pod CIDR is encapsulated exactly as from_pod
// does it, but with its TTL as the stack left it; everything else, our own
// VXLAN included, leaves untouched.
package datapath_test

import (
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// newEgressNode is node 1 configured with cfg, with peer as its peer.
func newEgressNode(tb testing.TB, cfg bpfmaps.Config, peer bpfmaps.Node) *testNode {
	tb.Helper()
	n := newTestNode(tb)
	n.configure(cfg)
	n.addNode(peer)
	return n
}

// fromHost is p as the host stack sends it out of the uplink: to the
// next hop the agent's route names, from the uplink's MAC.
func fromHost(p packet) []byte {
	return ethernet{Dst: peerMAC, Src: uplinkMAC, Type: ethTypeIPv4}.marshal(p.marshal())
}

func TestToUplinkEncap(t *testing.T) {
	// The agent configures the uplink; to_uplink needs only the node IP.
	noUplink := defaultConfig()
	noUplink.UplinkIfindex = 0

	tests := append([]encapCase{
		{name: "host to remote pod", config: defaultConfig(), node: peerNode(),
			packet: tcpPacket(nodeIP, peerPodIP), df: true},
		// A pod's packet the host stack DNATed to a remote pod
		// (kube-proxy): it was routed once, its TTL already taken.
		{name: "forwarded for a pod", config: defaultConfig(), node: peerNode(),
			packet: udpPacket(podA.IP, peerPodIP).withTTL(63)},
		// By egress the stack has done the routing: what leaves with
		// TTL 1 (the host's traceroute) is not to_uplink's to judge.
		{name: "ttl 1", config: defaultConfig(), node: peerNode(),
			packet: udpPacket(nodeIP, peerPodIP).withTTL(1)},
		{name: "tos copied", config: defaultConfig(), node: peerNode(),
			packet: tcpPacket(nodeIP, peerPodIP).withTOS(0xb8), tos: 0xb8, df: true},
		{name: "inner fragment", config: defaultConfig(), node: peerNode(),
			packet: fragment(nodeIP, peerPodIP, ipMF|185)},
		{name: "uplink ifindex not configured", config: noUplink, node: peerNode(),
			packet: tcpPacket(nodeIP, peerPodIP), df: true},
	}, encapPeerCases(nodeIP)...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newEgressNode(t, tt.config, tt.node)
			// The outer Ethernet header stays for
			// bpf_redirect_neigh to readdress; the inner packet is
			// the one the stack sent, TTL and all.
			eth := ethernet{Dst: peerMAC, Src: uplinkMAC, Type: ethTypeIPv4}
			tt.wantEncapsulated(t, n, datapath.ToUplink, fromHost(tt.packet), eth, tt.packet.marshal())
		})
	}
}

// bpf_redirect_neigh sends the encapsulated packet out of the uplink again,
// through to_uplink: addressed to a node, not to a pod CIDR, it must pass
// as it is, or it would be wrapped twice.
func TestToUplinkOwnVXLANPassesThrough(t *testing.T) {
	n := newEgressNode(t, defaultConfig(), peerNode())
	ret, vx := mustRun(t, n.prog(datapath.ToUplink), fromHost(tcpPacket(nodeIP, peerPodIP)))
	wantVerdict(t, ret, tcActRedirect)
	// Only the second run is under test.
	if err := bpfmaps.NewStats(&n.d.Maps).Reset(); err != nil {
		t.Fatal(err)
	}

	ret, out := mustRun(t, n.prog(datapath.ToUplink), vx)

	wantVerdict(t, ret, tcActOK)
	wantFrame(t, out, vx)
	n.wantCounters(nil)
	n.wantNoEvents()
}

// Whatever is not for a remote pod CIDR is the node's own traffic.
func TestToUplinkPassThrough(t *testing.T) {
	tests := []passCase{
		{name: "to peer node", config: ptr(defaultConfig()), in: fromHost(tcpPacket(nodeIP, peerIP))},
		{name: "to outside", config: ptr(defaultConfig()), in: fromHost(udpPacket(nodeIP, outsideIP))},
		{name: "to local pod CIDR", config: ptr(defaultConfig()), in: fromHost(udpPacket(nodeIP, podA.IP))},
		// VXLAN from_pod made of a pod's packet, on its way out.
		{name: "vxlan to peer", config: ptr(defaultConfig()), in: encapsulated(
			ethernet{Dst: peerMAC, Src: uplinkMAC, Type: ethTypeIPv4},
			udpPacket(podA.IP, peerPodIP).withTTL(63).marshal(),
			defaultConfig(), peerNode(), 0, false, 50000, 0x1234)},
		{name: "arp", config: ptr(defaultConfig()), in: ethernet{Dst: broadcastMAC, Src: uplinkMAC, Type: ethTypeARP}.
			marshal(arpRequest(uplinkMAC, nodeIP, peerIP).marshal())},
		{name: "ipv6", config: ptr(defaultConfig()), in: ethernet{Dst: peerMAC, Src: uplinkMAC, Type: ethTypeIPv6}.
			marshal(ipv6(netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")))},
		// Without a node IP there is no tunnel source to send from.
		{name: "node not configured", in: fromHost(tcpPacket(nodeIP, peerPodIP))},
	}
	runPassCases(t, datapath.ToUplink, tests)
}

// The trace of an encapsulated packet is taken after the wrap but describes
// the packet the host stack sent: its length and its 5-tuple, not the
// tunnel's.
func TestToUplinkTrace(t *testing.T) {
	cfg := defaultConfig()
	cfg.Trace = true
	n := newEgressNode(t, cfg, peerNode())
	in := fromHost(udpPacket(nodeIP, peerPodIP))

	ret, _ := mustRun(t, n.prog(datapath.ToUplink), in)

	wantVerdict(t, ret, tcActRedirect)
	ev := n.wantTraceEvent(datapath.ToUplink, "encap", runIfindex, len(in))
	if ev.Proto != ipProtoUDP || beAddr(ev.Saddr) != nodeIP || beAddr(ev.Daddr) != peerPodIP ||
		be16(ev.Sport) != 40000 || be16(ev.Dport) != 53 {
		t.Errorf("5-tuple: got %s, want udp %s:40000 -> %s:53", eventString(ev), nodeIP, peerPodIP)
	}
}
