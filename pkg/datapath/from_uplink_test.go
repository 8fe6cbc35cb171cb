// This file tests from_uplink through BPF_PROG_RUN: VXLAN from a known node
// for a local pod is decapsulated and redirected; VXLAN that is ours but
// wrong is dropped with its reason; everything else the node receives passes
// untouched and uncounted, because the node's own traffic must never notice
// patchcord.
package datapath_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// dstPod is the local pod node 2's packets are for. No from_pod runs in
// these tests, so its veth may have any ifindex; 42 tells the redirect target
// apart from lo, where BPF_PROG_RUN runs the packet.
var dstPod = pod{
	IP:      netip.MustParseAddr("10.244.1.5"),
	MAC:     mustMAC("02:00:0a:f4:01:05"),
	HostMAC: mustMAC("ee:ee:00:00:00:01"),
	Ifindex: 42,
}

// newUplinkNode is node 1 configured for standard VXLAN, with node 2 as its
// peer and dstPod on it.
func newUplinkNode(tb testing.TB, cfg bpfmaps.Config) *testNode {
	tb.Helper()
	n := newTestNode(tb)
	n.configure(cfg)
	n.addNode(peerNode())
	n.addNode(thirdNode)
	n.addPod(dstPod)
	return n
}

// thirdNode is another known node: node 2 may not speak for its pods.
var thirdNode = bpfmaps.Node{PodCIDR: netip.MustParsePrefix("10.244.3.0/24"), NodeIP: netip.MustParseAddr("198.18.0.3")}

// toDstPod is a packet from a pod on node 2 to dstPod, as node 2 sends it:
// its TTL already taken down by one.
func toDstPod(p packet) packet { return p.withTTL(p.ip.TTL - 1) }

func TestFromUplinkDecap(t *testing.T) {
	flannel := defaultConfig()
	flannel.VXLANPort = 8472
	vni42 := defaultConfig()
	vni42.VNI = 42

	tests := []struct {
		name   string
		config bpfmaps.Config
		packet packet
		tunnel func(*tunnel) // nil: as fromPeer sends it
	}{
		{name: "udp", config: defaultConfig(), packet: toDstPod(udpPacket(peerPodIP, dstPod.IP))},
		{name: "tcp", config: defaultConfig(), packet: toDstPod(tcpPacket(peerPodIP, dstPod.IP))},
		// With TTL 2 the packet has one hop left: this node's. It is
		// forwarded with TTL 1, as the host stack would forward it.
		{name: "ttl 2", config: defaultConfig(), packet: udpPacket(peerPodIP, dstPod.IP).withTTL(2)},
		{name: "inner options", config: defaultConfig(), packet: func() packet {
			p := toDstPod(tcpPacket(peerPodIP, dstPod.IP))
			p.ip.Options = []byte{0x07, 0x07, 0x04, 0, 0, 0, 0, 0x00}
			return p
		}()},
		// A kernel vxlan peer (Flannel) addresses the inner frame to
		// our VTEP MAC; patchcord does not care which.
		{name: "flannel peer", config: flannel, packet: toDstPod(udpPacket(peerPodIP, dstPod.IP)),
			tunnel: func(t *tunnel) {
				t.udp.DstPort = 8472
				t.innerEth.Dst = mustMAC("0e:00:c6:12:00:01")
				t.innerEth.Src = peerVtepMAC
			}},
		{name: "vni 42", config: vni42, packet: toDstPod(tcpPacket(peerPodIP, dstPod.IP)),
			tunnel: func(t *tunnel) { t.vxlan.VNI = 42 }},
		// What GRO hands to tc once the uplink's UDP tunnel socket (the
		// agent's GRO device) merged frames: one packet of several MSS, its
		// outer and inner lengths rewritten. BPF_PROG_RUN cannot set the
		// tunnel GSO type; TestGRO in test/crossnode covers that.
		{name: "merged frames", config: defaultConfig(), packet: func() packet {
			p := toDstPod(tcpPacket(peerPodIP, dstPod.IP))
			p.l4 = tcp{SrcPort: 41000, DstPort: 8080, Seq: 1000, Ack: 2000, Flags: tcpACK, Window: 502}.
				marshal(bytes.Repeat([]byte("merged by gro "), 2*1398/14))
			return p
		}()},
		{name: "outer without DF", config: defaultConfig(), packet: toDstPod(udpPacket(peerPodIP, dstPod.IP)),
			tunnel: func(t *tunnel) {
				t.ip.FragOff = 0
				t.ip.ID = 0x5151
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newUplinkNode(t, tt.config)
			tun := fromPeer(tt.packet.marshal())
			if tt.tunnel != nil {
				tt.tunnel(&tun)
			}
			in := tun.marshal()
			wantForwarded(t, n, datapath.FromUplink, in, dstPod, tt.packet, "decap", len(in)-vxlanOverhead)
		})
	}
}

// With TTL 1 (or 0) the inner packet may not be forwarded: the host stack
// gets it decapsulated, still addressed to the uplink, to send the ICMP time
// exceeded.
// Traffic from a remote node's host (not one of its pods) goes to the host
// stack decapsulated: the pod's replies to a node always cross the stack, so
// conntrack must see this direction too, or it marks the connection INVALID.
func TestFromUplinkFromPeerHost(t *testing.T) {
	wantDecapToHost(t, tcpPacket(peerIP, dstPod.IP).marshal())
}

// wantDecapToHost checks that a peer's VXLAN packet carrying inner reaches
// the host stack decapsulated, counted and without a drop event.
func wantDecapToHost(t *testing.T, inner []byte) {
	t.Helper()
	n := newUplinkNode(t, defaultConfig())
	tun := fromPeer(inner)
	ret, out := mustRun(t, n.prog(datapath.FromUplink), tun.marshal())

	wantVerdict(t, ret, tcActOK)
	want := tun.eth.marshal(inner)
	wantFrame(t, out, want)
	n.wantCounters(map[string]bpfmaps.Counter{
		"decap":   counted(len(want)),
		"to_host": counted(len(want)),
	})
	n.wantNoEvents()
}

func TestFromUplinkTTLExpired(t *testing.T) {
	for _, ttl := range []uint8{1, 0} {
		t.Run(fmt.Sprintf("ttl %d", ttl), func(t *testing.T) {
			wantDecapToHost(t, udpPacket(peerPodIP, dstPod.IP).withTTL(ttl).marshal())
		})
	}
}

type uplinkDropCase struct {
	name   string
	tunnel func(*tunnel)
	frame  func(tunnel) []byte // nil: the tunnel marshalled
	reason string
}

// uplinkDropCases are the cases of TestFromUplinkDrop.
func uplinkDropCases() []uplinkDropCase {
	valid := toDstPod(udpPacket(peerPodIP, dstPod.IP))
	return []uplinkDropCase{{
		name:   "unknown tunnel source",
		tunnel: func(t *tunnel) { t.ip.Src = strangerIP },
		reason: "drop_unknown_tunnel",
	}, {
		// This node is no tunnel source of its own: a packet claiming
		// so is forged.
		name:   "source is this node",
		tunnel: func(t *tunnel) { t.ip.Src = nodeIP },
		reason: "drop_unknown_tunnel",
	}, {
		// A known node may speak for its own pods and itself only.
		name:   "inner source a pod of another node",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.Src = netip.MustParseAddr("10.244.3.9") }) },
		reason: "drop_inner_spoofed",
	}, {
		name:   "inner source a pod of this node",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.Src = podB.IP }) },
		reason: "drop_inner_spoofed",
	}, {
		name:   "inner source outside the cluster",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.Src = outsideIP }) },
		reason: "drop_inner_spoofed",
	}, {
		name:   "inner source another node's address",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.Src = thirdNode.NodeIP }) },
		reason: "drop_inner_spoofed",
	}, {
		// Node 3 is a known tunnel source, but node 2's pods are not its.
		name:   "pod of node 2 sent by node 3",
		tunnel: func(t *tunnel) { t.ip.Src = thirdNode.NodeIP },
		reason: "drop_inner_spoofed",
	}, {
		name:   "wrong vni",
		tunnel: func(t *tunnel) { t.vxlan.VNI = 2 },
		reason: "drop_bad_vni",
	}, {
		name:   "I flag missing",
		tunnel: func(t *tunnel) { t.vxlan.Flags = 0 },
		reason: "drop_malformed",
	}, {
		name: "no local endpoint",
		tunnel: func(t *tunnel) {
			t.inner = toDstPod(udpPacket(peerPodIP, netip.MustParseAddr("10.244.1.200"))).marshal()
		},
		reason: "drop_no_endpoint",
	}, {
		name: "inner arp",
		tunnel: func(t *tunnel) {
			t.innerEth = ethernet{Dst: broadcastMAC, Src: peerVtepMAC, Type: ethTypeARP}
			t.inner = arpRequest(peerVtepMAC, peerPodIP, dstPod.IP).marshal()
		},
		reason: "drop_malformed",
	}, {
		name: "inner ipv6",
		tunnel: func(t *tunnel) {
			t.innerEth.Type = ethTypeIPv6
			t.inner = ipv6(netip.MustParseAddr("fd00::2:7"), netip.MustParseAddr("fd00::1:5"))
		},
		reason: "drop_malformed",
	}, {
		name:   "inner ihl 4",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.VersionIHL = 0x44 }) },
		reason: "drop_malformed",
	}, {
		name:   "inner version 6",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.VersionIHL = 0x65 }) },
		reason: "drop_malformed",
	}, {
		name: "inner total length beyond frame",
		tunnel: func(t *tunnel) {
			t.inner = withIP(valid, func(h *ipv4) { h.TotalLen = uint16(len(valid.marshal()) + 1) })
		},
		reason: "drop_malformed",
	}, {
		name:   "inner total length shorter than header",
		tunnel: func(t *tunnel) { t.inner = withIP(valid, func(h *ipv4) { h.TotalLen = 19 }) },
		reason: "drop_malformed",
	}, {
		// Lengths all consistent, the inner header just too short.
		name:   "inner ipv4 header of 19 bytes",
		tunnel: func(t *tunnel) { t.inner = valid.marshal()[:ipv4HdrLen-1] },
		reason: "drop_malformed",
	}, {
		name:   "no inner ipv4 header",
		tunnel: func(t *tunnel) { t.inner = nil },
		reason: "drop_malformed",
	}, {
		name: "no inner frame",
		frame: func(t tunnel) []byte {
			return t.eth.marshal(t.ip.marshal(t.udp.marshal(t.vxlan.marshal(nil))))
		},
		reason: "drop_malformed",
	}, {
		name: "no vxlan header",
		frame: func(t tunnel) []byte {
			return t.eth.marshal(t.ip.marshal(t.udp.marshal(nil)))
		},
		reason: "drop_malformed",
	}, {
		// The frame cut short on the way, its outer lengths now lies.
		name:   "cut in the inner header",
		frame:  func(t tunnel) []byte { return truncate(t.marshal(), ethHdrLen+vxlanOverhead+10) },
		reason: "drop_malformed",
	}}
}

func TestFromUplinkDrop(t *testing.T) {
	valid := toDstPod(udpPacket(peerPodIP, dstPod.IP))
	tests := uplinkDropCases()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newUplinkNode(t, defaultConfig())
			tun := fromPeer(valid.marshal())
			if tt.tunnel != nil {
				tt.tunnel(&tun)
			}
			in := tun.marshal()
			if tt.frame != nil {
				in = tt.frame(tun)
			}

			ret, out := mustRun(t, n.prog(datapath.FromUplink), in)

			wantVerdict(t, ret, tcActShot)
			wantFrame(t, out, in)
			n.wantCounters(map[string]bpfmaps.Counter{tt.reason: counted(len(in))})
			n.wantDropEvent(datapath.FromUplink, tt.reason, len(in))
		})
	}
}

// withIP marshals p with its IPv4 header changed by f.
func withIP(p packet, f func(*ipv4)) []byte {
	f(&p.ip)
	return p.marshal()
}

// Whatever is not VXLAN for this node's tunnel endpoint is the node's own
// traffic: it passes as it came, and no counter or event shows it.
func TestFromUplinkPassThrough(t *testing.T) {
	vxlanTo := func(f func(*tunnel)) []byte {
		tun := fromPeer(toDstPod(udpPacket(peerPodIP, dstPod.IP)).marshal())
		f(&tun)
		return tun.marshal()
	}
	toNode := ethernet{Dst: uplinkMAC, Src: peerMAC, Type: ethTypeIPv4}

	tests := []passCase{
		{name: "arp", config: ptr(defaultConfig()), in: ethernet{Dst: broadcastMAC, Src: peerMAC, Type: ethTypeARP}.
			marshal(arpRequest(peerMAC, peerIP, nodeIP).marshal())},
		{name: "ipv6", config: ptr(defaultConfig()), in: ethernet{Dst: uplinkMAC, Src: peerMAC, Type: ethTypeIPv6}.
			marshal(ipv6(netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::1")))},
		{name: "tcp to node", config: ptr(defaultConfig()), in: toNode.marshal(tcpPacket(peerIP, nodeIP).marshal())},
		{name: "udp to another port", config: ptr(defaultConfig()), in: toNode.marshal(packet{
			ip: ipv4{TTL: 64, Protocol: ipProtoUDP, Src: peerIP, Dst: nodeIP, L4Checksum: true},
			l4: udp{SrcPort: 4789, DstPort: 53}.marshal(make([]byte, 64)),
		}.marshal())},
		// Flannel's port while this node listens on 4789.
		{name: "vxlan to another port", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.udp.DstPort = 8472 })},
		{name: "vxlan to another address", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.ip.Dst = netip.MustParseAddr("198.18.0.3") })},
		// Options or fragments are not what a VXLAN sender makes: the
		// stack decides.
		{name: "outer ip options", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.ip.Options = []byte{0x94, 0x04, 0x00, 0x00} })},
		{name: "outer first fragment", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.ip.FragOff = ipMF })},
		{name: "outer later fragment", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.ip.FragOff = 185 })},
		{name: "outer version 6", config: ptr(defaultConfig()),
			in: vxlanTo(func(t *tunnel) { t.ip.VersionIHL = 0x65 })},
		// Too short to hold a UDP header: not ours to judge.
		{name: "runt udp", config: ptr(defaultConfig()), in: toNode.marshal(packet{
			ip: ipv4{TTL: 64, Protocol: ipProtoUDP, Src: peerIP, Dst: nodeIP},
			l4: []byte{0x12, 0xb5, 0x12, 0xb5},
		}.marshal())},
		// Before the agent has written the config, the node has no
		// tunnel endpoint.
		{name: "node not configured", in: vxlanTo(func(*tunnel) {})},
		{name: "node IP not configured", config: ptr(func() bpfmaps.Config {
			c := defaultConfig()
			c.NodeIP = netip.Addr{}
			return c
		}()), in: vxlanTo(func(t *tunnel) { t.ip.Dst = netip.IPv4Unspecified() })},
	}
	runPassCases(t, datapath.FromUplink, tests, dstPod)
}

// A traced decapsulation reports the inner packet and the pod's veth.
func TestFromUplinkTrace(t *testing.T) {
	cfg := defaultConfig()
	cfg.Trace = true
	n := newUplinkNode(t, cfg)
	in := fromPeer(toDstPod(tcpPacket(peerPodIP, dstPod.IP)).marshal()).marshal()

	_, out := mustRun(t, n.prog(datapath.FromUplink), in)

	ev := n.wantTraceEvent(datapath.FromUplink, "decap", dstPod.Ifindex, len(out))
	if ev.Proto != ipProtoTCP || beAddr(ev.Saddr) != peerPodIP || beAddr(ev.Daddr) != dstPod.IP ||
		be16(ev.Sport) != 41000 || be16(ev.Dport) != 8080 {
		t.Errorf("5-tuple: got %s, want the inner one: tcp %s:41000 -> %s:8080", eventString(ev), peerPodIP, dstPod.IP)
	}
}
