// This file tests from_pod through BPF_PROG_RUN, one case per branch: ARP
// for the gateway, anti-spoofing, the redirect to a local pod, VXLAN to a
// remote node, what goes to the host stack, what is malformed, and the
// events drops and traces leave in the ring buffer.
//
// A frame shorter than an Ethernet header, from_pod's first check, cannot be
// tested: BPF_PROG_RUN refuses input shorter than ETH_HLEN with EINVAL, and
// this kernel also refuses IPv4 frames with less than 20 bytes of IP header
// (the fix for syzbot+619b9ef527f510a57cfc). The malformed cases are therefore frames whose IPv4
// header is whole but wrong, or whose ARP header is cut short.
package datapath_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// newPodNode is node 1 with podA (where packets are run) and podB on it and
// node 2 as its peer. Its uplink is configured only when a test says so.
func newPodNode(tb testing.TB) *testNode {
	tb.Helper()
	n := newTestNode(tb)
	n.addPod(podA)
	n.addPod(podB)
	n.addNode(peerNode())
	return n
}

func TestFromPodLocalRedirect(t *testing.T) {
	tests := []struct {
		name   string
		packet packet
	}{
		{"udp", udpPacket(podA.IP, podB.IP)},
		{"tcp", tcpPacket(podA.IP, podB.IP)},
		// The last hop a packet may take.
		{"ttl 2", udpPacket(podA.IP, podB.IP).withTTL(2)},
		{"ttl 255", udpPacket(podA.IP, podB.IP).withTTL(255)},
		{"tos", func() packet {
			p := tcpPacket(podA.IP, podB.IP)
			p.ip.TOS = 0xb9 // DSCP EF, ECT(1)
			return p
		}()},
		// Router Alert: options make the header 24 bytes.
		{"ihl 6", func() packet {
			p := udpPacket(podA.IP, podB.IP)
			p.ip.Options = []byte{0x94, 0x04, 0x00, 0x00}
			return p
		}()},
		// An empty record route and end of options: 28 bytes.
		{"ihl 7", func() packet {
			p := tcpPacket(podA.IP, podB.IP)
			p.ip.Options = []byte{0x07, 0x07, 0x04, 0, 0, 0, 0, 0x00}
			return p
		}()},
		// Fragments cross the host stack: conntrack_test.go.
		// The TTL decrement adds 0x0100 to the checksum; from 0xffxx
		// that needs the end-around carry of ones'-complement addition.
		{"checksum carry", withChecksum(udpPacket(podA.IP, podB.IP), func(c uint16) bool { return c >= 0xff00 })},
		// A checksum that becomes zero after the decrement.
		{"checksum to zero", withChecksum(udpPacket(podA.IP, podB.IP), func(c uint16) bool { return c == 0xfeff })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := fromPod(tt.packet)
			wantForwarded(t, newPodNode(t), datapath.FromPod, in, podB, tt.packet, "local_redirect", len(in))
		})
	}
}

// Ethernet may pad a frame past the IP packet's end; that is not malformed,
// and the padding travels on.
func TestFromPodLocalRedirectPadded(t *testing.T) {
	n := newPodNode(t)
	p := packet{ip: ipv4{TTL: 64, Protocol: ipProtoUDP, Src: podA.IP, Dst: podB.IP, L4Checksum: true},
		l4: udp{SrcPort: 1, DstPort: 2}.marshal(nil)}
	pad := make([]byte, 60-ethHdrLen-ipv4HdrLen-udpHdrLen)
	in := append(fromPod(p), pad...)

	ret, out := mustRun(t, n.prog(datapath.FromPod), in)

	wantVerdict(t, ret, tcActRedirect)
	want := append(ethernet{Dst: podB.MAC, Src: podB.HostMAC, Type: ethTypeIPv4}.marshal(p.withTTL(63).marshal()), pad...)
	wantFrame(t, out, want)
	n.wantCounters(map[string]bpfmaps.Counter{"local_redirect": counted(len(in))})
}

// withChecksum returns p with the first IP ID that makes its header checksum
// satisfy ok, so that a test can reach checksum edge cases with an
// otherwise ordinary packet.
func withChecksum(p packet, ok func(uint16) bool) packet {
	for id := range 1 << 16 {
		p.ip.ID = uint16(id)
		if b := p.marshal(); ok(binary.BigEndian.Uint16(b[10:])) {
			return p
		}
	}
	panic("no IP ID gives the checksum asked for")
}

// With TTL 1 (or 0) a packet must not be forwarded: the host stack owes the
// sender an ICMP time exceeded, so it gets the packet untouched.
func TestFromPodTTLExpired(t *testing.T) {
	tests := []struct {
		name   string
		packet packet
	}{
		{"ttl 1 to local pod", udpPacket(podA.IP, podB.IP).withTTL(1)},
		{"ttl 0 to local pod", tcpPacket(podA.IP, podB.IP).withTTL(0)},
		{"ttl 1 to remote pod", udpPacket(podA.IP, peerPodIP).withTTL(1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			n.configure(defaultConfig())
			in := fromPod(tt.packet)

			ret, out := mustRun(t, n.prog(datapath.FromPod), in)

			wantVerdict(t, ret, tcActOK)
			wantFrame(t, out, in)
			n.wantCounters(map[string]bpfmaps.Counter{"to_host": counted(len(in))})
			n.wantNoEvents()
		})
	}
}

// A packet longer than the tunnel carries would not fit the uplink
// encapsulated: the host stack gets it as the pod sent it, to send the ICMP
// "fragmentation needed" a router owes a DF packet, or to fragment the rest.
// Pods with the uplink's whole MTU (every node meant native) send such
// packets to a node that is still tunnelled.
// podUplinkMTU is the config of an agent meaning every node native.
func podUplinkMTU() bpfmaps.Config {
	cfg := defaultConfig()
	cfg.PodUplinkMTU = true
	return cfg
}

func TestFromPodTooBig(t *testing.T) {
	uplinkMTU := podUplinkMTU()
	for _, tc := range []struct {
		name   string
		config bpfmaps.Config
		length int
	}{
		{"pod MTU 1450", defaultConfig(), 1451},
		{"pod MTU of the uplink", uplinkMTU, 1451},
		{"pod MTU of the uplink, full size", uplinkMTU, 1500},
	} {
		for _, df := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/df %v", tc.name, df), func(t *testing.T) {
				n := newPodNode(t)
				n.configure(tc.config)
				in := fromPod(udpPacketOfLen(podA.IP, peerPodIP, tc.length, df))

				ret, out := mustRun(t, n.prog(datapath.FromPod), in)

				wantVerdict(t, ret, tcActOK)
				wantFrame(t, out, in)
				n.wantCounters(map[string]bpfmaps.Counter{"to_host_too_big": counted(len(in))})
				n.wantNoEvents()
			})
		}
	}
}

func TestFromPodSpoofed(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
	}{
		{"source IP of another pod", fromPod(udpPacket(podB.IP, peerPodIP))},
		{"source IP outside", fromPod(tcpPacket(outsideIP, podB.IP))},
		{"unspecified source IP", fromPod(udpPacket(netip.IPv4Unspecified(), outsideIP))},
		{"source MAC of another pod", ethernet{Dst: podA.HostMAC, Src: podB.MAC, Type: ethTypeIPv4}.
			marshal(udpPacket(podA.IP, podB.IP).marshal())},
		{"both spoofed", ethernet{Dst: podA.HostMAC, Src: podB.MAC, Type: ethTypeIPv4}.
			marshal(udpPacket(podB.IP, outsideIP).marshal())},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			n.configure(defaultConfig())

			n.wantFromPodDrop(tt.in, "drop_spoofed")
		})
	}
}

// A drop tells `patchcord monitor` what was dropped, where and why.
func TestFromPodDropEvent(t *testing.T) {
	n := newPodNode(t)
	p := tcpPacket(outsideIP, podB.IP)
	in := fromPod(p)

	ret, _ := mustRun(t, n.prog(datapath.FromPod), in)

	wantVerdict(t, ret, tcActShot)
	evs := n.events()
	if len(evs) != 1 {
		t.Fatalf("events: got %d, want one drop:\n%s", len(evs), eventsString(evs))
	}
	ev := evs[0]
	if ev.Kind != datapath.EventDrop {
		t.Errorf("kind: got %d, want EventDrop (%d)", ev.Kind, datapath.EventDrop)
	}
	if got := ev.Reason.String(); got != "drop_spoofed" {
		t.Errorf("reason: got %s, want drop_spoofed", got)
	}
	if got := ev.Prog.String(); got != "from_pod" {
		t.Errorf("prog: got %s, want from_pod", got)
	}
	if ev.Ifindex != runIfindex || ev.Target != 0 || ev.Len != uint32(len(in)) {
		t.Errorf("ifindex %d, target %d, len %d: want %d, 0, %d", ev.Ifindex, ev.Target, ev.Len, runIfindex, len(in))
	}
	if ev.TsNs == 0 {
		t.Errorf("timestamp: got 0, want bpf_ktime_get_ns")
	}
	if got := be16(ev.EthProto); got != ethTypeIPv4 {
		t.Errorf("eth_proto: got %#04x, want %#04x", got, ethTypeIPv4)
	}
	if ev.Proto != ipProtoTCP || beAddr(ev.Saddr) != outsideIP || beAddr(ev.Daddr) != podB.IP ||
		be16(ev.Sport) != 41000 || be16(ev.Dport) != 8080 {
		t.Errorf("5-tuple: got proto %d %s:%d -> %s:%d, want proto %d %s:41000 -> %s:8080",
			ev.Proto, beAddr(ev.Saddr), be16(ev.Sport), beAddr(ev.Daddr), be16(ev.Dport),
			ipProtoTCP, outsideIP, podB.IP)
	}
}

// A veth with no endpoint behind it may send nothing: from_pod is attached
// only to registered veths, so this is someone attaching it by hand.
func TestFromPodUnregistered(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
	}{
		{"ipv4", fromPod(udpPacket(podA.IP, podB.IP))},
		{"arp", ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}.
			marshal(arpRequest(podA.MAC, podA.IP, gatewayIP).marshal())},
		// Malformed or not, nothing from an unknown veth is looked at.
		{"truncated ipv4", truncate(fromPod(udpPacket(podA.IP, podB.IP)), ethHdrLen+ipv4HdrLen+4)},
	}
	for _, c := range ethertypeCases() {
		tests = append(tests, struct {
			name string
			in   []byte
		}{c.name, c.in})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// podB and the peer are known; nothing is on ifindex 1.
			n := newTestNode(t)
			n.addPod(podB)
			n.addNode(peerNode())
			n.configure(defaultConfig())

			n.wantFromPodDrop(tt.in, "drop_unregistered")
		})
	}
}

func TestFromPodMalformed(t *testing.T) {
	valid := udpPacket(podA.IP, podB.IP)
	with := func(f func(*ipv4)) []byte {
		p := valid
		f(&p.ip)
		return fromPod(p)
	}
	tests := []struct {
		name string
		in   []byte
	}{
		// 20 bytes of header, no room for what it says follows.
		{"ipv4 header only", truncate(fromPod(valid), ethHdrLen+ipv4HdrLen)},
		{"ihl 4", with(func(h *ipv4) { h.VersionIHL = 0x44 })},
		{"ihl 0", with(func(h *ipv4) { h.VersionIHL = 0x40 })},
		{"version 6", with(func(h *ipv4) { h.VersionIHL = 0x65 })},
		{"version 0", with(func(h *ipv4) { h.VersionIHL = 0x05 })},
		{"total length beyond frame", with(func(h *ipv4) {
			h.TotalLen = uint16(valid.ip.headerLen()+len(valid.l4)) + 1
		})},
		{"total length shorter than header", with(func(h *ipv4) { h.TotalLen = 19 })},
		// ihl 15 claims 60 bytes of header in a 57-byte packet.
		{"header beyond total length", with(func(h *ipv4) { h.VersionIHL = 0x4f })},
		{"header cut after options", truncate(fromPod(func() packet {
			p := valid
			p.ip.Options = []byte{0x94, 0x04, 0x00, 0x00}
			return p
		}()), ethHdrLen+22)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)

			n.wantFromPodDrop(tt.in, "drop_malformed")
		})
	}
}

// What is not for a pod, local or remote, is the host stack's: the node,
// services and the outside world.
func TestFromPodToHost(t *testing.T) {
	tests := []struct {
		name   string
		config *bpfmaps.Config // nil: none written
		in     []byte
	}{
		{"outside destination", ptr(defaultConfig()), fromPod(tcpPacket(podA.IP, outsideIP))},
		{"node IP", ptr(defaultConfig()), fromPod(udpPacket(podA.IP, nodeIP))},
		{"gateway IP", ptr(defaultConfig()), fromPod(udpPacket(podA.IP, gatewayIP))},
		{"unallocated local pod IP", ptr(defaultConfig()), fromPod(udpPacket(podA.IP, netip.MustParseAddr("10.244.1.200")))},
		// Until the agent has configured the uplink, the host stack
		// routes pod traffic between nodes.
		{"remote pod, uplink not configured", ptr(func() bpfmaps.Config {
			c := defaultConfig()
			c.UplinkIfindex = 0
			return c
		}()), fromPod(udpPacket(podA.IP, peerPodIP))},
		{"remote pod, no config", nil, fromPod(tcpPacket(podA.IP, peerPodIP))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			if tt.config != nil {
				n.configure(*tt.config)
			}

			ret, out := mustRun(t, n.prog(datapath.FromPod), tt.in)

			wantVerdict(t, ret, tcActOK)
			wantFrame(t, out, tt.in)
			n.wantCounters(map[string]bpfmaps.Counter{"to_host": counted(len(tt.in))})
			n.wantNoEvents()
		})
	}
}

func TestFromPodEncap(t *testing.T) {
	withOptions := udpPacket(podA.IP, peerPodIP)
	withOptions.ip.Options = []byte{0x94, 0x04, 0x00, 0x00}
	tests := append([]encapCase{
		{name: "udp", config: defaultConfig(), node: peerNode(), packet: udpPacket(podA.IP, peerPodIP)},
		{name: "tcp with DF", config: defaultConfig(), node: peerNode(), packet: tcpPacket(podA.IP, peerPodIP), df: true},
		{name: "tos copied", config: defaultConfig(), node: peerNode(),
			packet: tcpPacket(podA.IP, peerPodIP).withTOS(0x2e), tos: 0x2e, df: true},
		{name: "inner options", config: defaultConfig(), node: peerNode(), packet: withOptions},
		// Encapsulated, it is as long as the uplink's MTU allows.
		{name: "as long as the pod MTU", config: defaultConfig(), node: peerNode(),
			packet: udpPacketOfLen(podA.IP, peerPodIP, 1450, true), df: true},
		{name: "as long as the tunnel carries, pods of the uplink's MTU", config: podUplinkMTU(), node: peerNode(),
			packet: udpPacketOfLen(podA.IP, peerPodIP, 1450, true), df: true},
	}, encapPeerCases(podA.IP)...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t)
			n.addPod(podA)
			n.addNode(tt.node)
			n.configure(tt.config)
			// The pod's frame keeps its Ethernet header for
			// bpf_redirect_neigh to readdress; its packet is
			// forwarded one hop, then wrapped.
			eth := ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: ethTypeIPv4}
			inner := tt.packet.withTTL(tt.packet.ip.TTL - 1).marshal()
			out := tt.wantEncapsulated(t, n, datapath.FromPod, fromPod(tt.packet), eth, inner)
			wantIPv4ChecksumValid(t, out, ethHdrLen+vxlanOverhead, "inner header")
		})
	}
}

// The outer source port comes from the flow hash: one flow, one port, so the
// underlay's ECMP keeps a flow on one path and its packets in order.
func TestFromPodEncapSourcePortPerFlow(t *testing.T) {
	n := newPodNode(t)
	n.configure(defaultConfig())
	in := fromPod(tcpPacket(podA.IP, peerPodIP))

	_, first := mustRun(t, n.prog(datapath.FromPod), in)
	_, second := mustRun(t, n.prog(datapath.FromPod), in)

	p1, _ := chosenByEncap(t, first, true)
	p2, _ := chosenByEncap(t, second, true)
	if p1 != p2 {
		t.Errorf("outer source ports of one flow: %d, then %d; want one port", p1, p2)
	}
}

// With tracing on, every forwarded packet is reported with where it went;
// with tracing off, nothing is, so that the ring costs nothing.
func TestFromPodTrace(t *testing.T) {
	tests := []struct {
		name   string
		trace  bool
		packet packet
		reason string // "": no event
		target int
		dst    netip.Addr // of the traced 5-tuple
	}{{
		name:   "local redirect",
		trace:  true,
		packet: udpPacket(podA.IP, podB.IP),
		reason: "local_redirect",
		target: podB.Ifindex,
		dst:    podB.IP,
	}, {
		name:   "encap",
		trace:  true,
		packet: udpPacket(podA.IP, peerPodIP),
		reason: "encap",
		target: uplinkIfindex,
		dst:    peerPodIP,
	}, {
		name:   "local redirect, trace off",
		packet: udpPacket(podA.IP, podB.IP),
	}, {
		name:   "encap, trace off",
		packet: udpPacket(podA.IP, peerPodIP),
	}, {
		// Only forwarding is traced: the host stack has its own tools.
		name:   "to host",
		trace:  true,
		packet: udpPacket(podA.IP, outsideIP),
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			cfg := defaultConfig()
			cfg.Trace = tt.trace
			n.configure(cfg)

			in := fromPod(tt.packet)
			mustRun(t, n.prog(datapath.FromPod), in)

			if tt.reason == "" {
				n.wantNoEvents()
				return
			}
			// Traces are taken before encapsulation: they describe the
			// pod's packet, never the tunnel's.
			ev := n.wantTraceEvent(datapath.FromPod, tt.reason, tt.target, len(in))
			if ev.Proto != ipProtoUDP || beAddr(ev.Saddr) != podA.IP ||
				beAddr(ev.Daddr) != tt.dst || be16(ev.Sport) != 40000 || be16(ev.Dport) != 53 {
				t.Errorf("5-tuple: got %s, want udp %s:40000 -> %s:53", eventString(ev), podA.IP, tt.dst)
			}
		})
	}
}

// ethertypeCase is a frame podA may not send, and the drop it earns.
type ethertypeCase struct {
	name    string
	in      []byte
	counter string
}

// ethertypeCases covers every class of ethertype from_pod refuses: IPv6,
// the three VLAN ethertypes (a tagged frame with the pod's own IPv4 inside,
// and two stacked VID-0 tags around a forged source) and one that means
// nothing to patchcord, LLDP.
func ethertypeCases() []ethertypeCase {
	frame := func(typ uint16, payload []byte) []byte {
		return ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: typ}.marshal(payload)
	}
	// tag is a VLAN tag with VID vid, followed by ethertype next.
	tag := func(vid, next uint16, payload []byte) []byte {
		return append([]byte{byte(vid >> 8), byte(vid), byte(next >> 8), byte(next)}, payload...)
	}
	own := udpPacket(podA.IP, podB.IP).marshal()
	forged := udpPacket(outsideIP, podB.IP).marshal()
	return []ethertypeCase{
		{"ipv6", frame(ethTypeIPv6, ipv6(netip.MustParseAddr("fe80::1"), netip.MustParseAddr("ff02::1"))), "drop_ipv6"},
		{"802.1q", frame(ethTypeVLAN, tag(10, ethTypeIPv4, own)), "drop_vlan"},
		{"802.1ad", frame(0x88a8, tag(10, ethTypeIPv4, own)), "drop_vlan"},
		{"qinq 0x9100", frame(0x9100, tag(10, ethTypeIPv4, own)), "drop_vlan"},
		{"two vid 0 tags, forged source", frame(0x88a8, tag(0, ethTypeVLAN, tag(0, ethTypeIPv4, forged))), "drop_vlan"},
		{"lldp", frame(0x88cc, make([]byte, 46)), "drop_ethertype"},
		{"ethertype 0", frame(0, make([]byte, 46)), "drop_ethertype"},
	}
}

// Default deny: a pod may send IPv4 and ARP; every other ethertype is
// dropped with a reason naming its class.
func TestFromPodEthertypes(t *testing.T) {
	for _, tt := range ethertypeCases() {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			n.configure(defaultConfig())

			n.wantFromPodDrop(tt.in, tt.counter)
		})
	}
}

// wantFromPodDrop runs from_pod on in and checks that it is dropped as it
// came, counted and reported once for reason.
func (n *testNode) wantFromPodDrop(in []byte, reason string) {
	n.tb.Helper()
	ret, out := mustRun(n.tb, n.prog(datapath.FromPod), in)
	wantVerdict(n.tb, ret, tcActShot)
	wantFrame(n.tb, out, in)
	n.wantCounters(map[string]bpfmaps.Counter{reason: counted(len(in))})
	n.wantDropEvent(datapath.FromPod, reason, len(in))
}
