// This file holds what the BPF_PROG_RUN tests of from_pod, from_uplink and
// to_uplink share: running a program once on a packet, a test node with its
// pods and peers, the packets they exchange, and assertions on verdicts,
// frames, counters and ring-buffer events.
//
// BPF_PROG_RUN runs a tc program on an skb built from the test's bytes on the
// loopback device of the test process's network namespace, so skb->ifindex is 1 and
// the pod that sends in from_pod tests is registered on ifindex 1. The
// redirect helpers only record their target there and return
// TC_ACT_REDIRECT, so the packet comes back as the program left it: that is
// what the tests compare, byte by byte.
package datapath_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// tc verdicts, from linux/pkt_cls.h.
const (
	tcActOK       = 0
	tcActShot     = 2
	tcActRedirect = 7
)

// runIfindex is where BPF_PROG_RUN runs a packet without a context: the
// loopback device.
const runIfindex = 1

// mustRun runs prog once on the frame in and returns the verdict and the
// frame as the program left it. DataOut has room for a VXLAN header more than
// in, the most any program adds.
func mustRun(tb testing.TB, prog *ebpf.Program, in []byte) (uint32, []byte) {
	tb.Helper()
	ret, out, err := run(prog, in)
	if err != nil {
		tb.Fatalf("run %s on a %d-byte frame: %v", prog, len(in), err)
	}
	return ret, out
}

func run(prog *ebpf.Program, in []byte) (uint32, []byte, error) {
	opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+vxlanOverhead)}
	ret, err := prog.Run(&opts)
	return ret, opts.DataOut, err
}

// The test node is emulated node 1 of the lab address plan, its peer node 2.
var (
	nodeIP        = netip.MustParseAddr("198.18.0.1")
	uplinkMAC     = mustMAC("02:00:c6:12:00:01")
	uplinkIfindex = 7

	peerIP      = netip.MustParseAddr("198.18.0.2")
	peerMAC     = mustMAC("02:00:c6:12:00:02") // its uplink
	peerCIDR    = netip.MustParsePrefix("10.244.2.0/24")
	peerPodIP   = netip.MustParseAddr("10.244.2.7")
	peerVtepMAC = mustMAC("0e:00:c6:12:00:02") // a Flannel peer's flannel.1
	strangerIP  = netip.MustParseAddr("198.18.0.99")

	gatewayIP    = netip.MustParseAddr("169.254.1.1")
	broadcastMAC = mustMAC("ff:ff:ff:ff:ff:ff")
	outsideIP    = netip.MustParseAddr("192.0.2.10")
)

// pod is a local endpoint as the tests register it.
type pod struct {
	IP      netip.Addr
	MAC     net.HardwareAddr // eth0 in the pod
	HostMAC net.HardwareAddr // its host-side veth: the pod's gateway
	Ifindex int              // its host-side veth
}

var (
	// podA sends in the from_pod tests, so its veth is where
	// BPF_PROG_RUN runs packets.
	podA = pod{
		IP:      netip.MustParseAddr("10.244.1.5"),
		MAC:     mustMAC("02:00:0a:f4:01:05"),
		HostMAC: mustMAC("ee:ee:00:00:00:01"),
		Ifindex: runIfindex,
	}
	// podB is podA's neighbour on the node; any ifindex will do for a
	// destination, and 42 tells the redirect target apart from lo.
	podB = pod{
		IP:      netip.MustParseAddr("10.244.1.6"),
		MAC:     mustMAC("02:00:0a:f4:01:06"),
		HostMAC: mustMAC("ee:ee:00:00:00:2a"),
		Ifindex: 42,
	}
)

// defaultConfig is node 1 with its uplink configured, speaking standard
// VXLAN: port 4789, VNI 1.
func defaultConfig() bpfmaps.Config {
	return bpfmaps.Config{
		NodeIP:        nodeIP,
		UplinkIfindex: uplinkIfindex,
		UplinkMAC:     uplinkMAC,
		VXLANPort:     4789,
		VNI:           1,
		TunnelMTU:     1450,
	}
}

func peerNode() bpfmaps.Node { return bpfmaps.Node{PodCIDR: peerCIDR, NodeIP: peerIP} }

// testNode is one freshly loaded datapath: no counter has moved, no event
// is queued.
type testNode struct {
	tb testing.TB
	d  *datapath.Datapath
}

func newTestNode(tb testing.TB) *testNode {
	tb.Helper()
	return &testNode{tb: tb, d: datapathtest.MustOpen(tb)}
}

func (n *testNode) prog(name string) *ebpf.Program {
	n.tb.Helper()
	p, err := n.d.Program(name)
	if err != nil {
		n.tb.Fatal(err)
	}
	return p
}

func (n *testNode) addPod(p pod) {
	n.tb.Helper()
	n.put(p.endpoint())
}

// endpoint is what the CNI plugin registers for p.
func (p pod) endpoint() bpfmaps.EndpointInfo {
	return bpfmaps.EndpointInfo{IP: p.IP, Ifindex: p.Ifindex, MAC: p.MAC, HostMAC: p.HostMAC}
}

func (n *testNode) addNode(node bpfmaps.Node) {
	n.tb.Helper()
	if err := bpfmaps.NewNodes(&n.d.Maps).Put(node); err != nil {
		n.tb.Fatal(err)
	}
}

func (n *testNode) configure(cfg bpfmaps.Config) {
	n.tb.Helper()
	if err := bpfmaps.NewConfig(&n.d.Maps).Put(cfg); err != nil {
		n.tb.Fatal(err)
	}
}

// wantVerdict checks a program's return code.
func wantVerdict(tb testing.TB, got, want uint32) {
	tb.Helper()
	if got != want {
		tb.Errorf("verdict: got %s, want %s", verdictName(got), verdictName(want))
	}
}

func verdictName(v uint32) string {
	switch v {
	case tcActOK:
		return "TC_ACT_OK (0)"
	case tcActShot:
		return "TC_ACT_SHOT (2)"
	case tcActRedirect:
		return "TC_ACT_REDIRECT (7)"
	}
	return fmt.Sprintf("%d", v)
}

// wantFrame compares two frames byte by byte and, when they differ, names
// the header fields that do.
func wantFrame(tb testing.TB, got, want []byte) {
	tb.Helper()
	if !bytes.Equal(got, want) {
		tb.Errorf("frame differs:\n%s", frameDiff(want, got))
	}
}

// counted is one packet of n bytes on a counter.
func counted(n int) bpfmaps.Counter { return bpfmaps.Counter{Packets: 1, Bytes: uint64(n)} }

// wantCounters checks that exactly the counters in want moved, by exactly
// as much.
func (n *testNode) wantCounters(want map[string]bpfmaps.Counter) {
	n.tb.Helper()
	got, err := bpfmaps.NewStats(&n.d.Maps).Read()
	if err != nil {
		n.tb.Fatal(err)
	}
	for name := range want {
		if _, ok := got[name]; !ok {
			n.tb.Fatalf("test bug: no counter %q; there are %v", name, datapath.StatNames())
		}
	}
	for _, name := range datapath.StatNames() {
		if got[name] != want[name] {
			n.tb.Errorf("counter %s: got %+v, want %+v", name, got[name], want[name])
		}
	}
}

// events returns what the programs have put in the ring buffer so far.
// BPF_PROG_RUN is synchronous, so every event of a finished run is there: a
// deadline of now reads them all without waiting for more.
func (n *testNode) events() []datapath.Event {
	n.tb.Helper()
	r, err := ringbuf.NewReader(n.d.Maps.Events)
	if err != nil {
		n.tb.Fatalf("open ring buffer: %v", err)
	}
	defer r.Close()
	r.SetDeadline(time.Now())
	var evs []datapath.Event
	for {
		rec, err := r.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return evs
		}
		if err != nil {
			n.tb.Fatalf("read ring buffer: %v", err)
		}
		var ev datapath.Event
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
			n.tb.Fatalf("decode event of %d bytes: %v", len(rec.RawSample), err)
		}
		evs = append(evs, ev)
	}
}

// wantDropEvent checks that the one event queued reports a drop of a frame
// of n bytes by prog for reason.
func (n *testNode) wantDropEvent(prog, reason string, size int) {
	n.tb.Helper()
	n.wantOneEvent(datapath.EventDrop, prog, reason, 0, size)
}

// wantTraceEvent checks that the one event queued reports prog forwarding a
// frame of size bytes on path reason to ifindex target, and returns it.
func (n *testNode) wantTraceEvent(prog, reason string, target, size int) datapath.Event {
	n.tb.Helper()
	return n.wantOneEvent(datapath.EventTrace, prog, reason, target, size)
}

// wantOneEvent checks that exactly one event was queued, of kind by prog for
// reason, from the run's ifindex to target (0 for drops), of size bytes.
func (n *testNode) wantOneEvent(kind datapath.EventKind, prog, reason string, target, size int) datapath.Event {
	n.tb.Helper()
	evs := n.events()
	if len(evs) != 1 {
		n.tb.Fatalf("events: got %d, want one (kind %v):\n%s", len(evs), kind, eventsString(evs))
	}
	ev := evs[0]
	if ev.Kind != kind || ev.Prog.String() != prog || ev.Reason.String() != reason ||
		ev.Ifindex != runIfindex || ev.Target != uint32(target) || ev.Len != uint32(size) {
		n.tb.Errorf("event: got %s, want kind %v by %s for %s to ifindex %d, from ifindex %d, len %d",
			eventString(ev), kind, prog, reason, target, runIfindex, size)
	}
	return ev
}

// wantNoEvents checks that nothing was put in the ring buffer.
func (n *testNode) wantNoEvents() {
	n.tb.Helper()
	if evs := n.events(); len(evs) != 0 {
		n.tb.Errorf("events: got %d, want none:\n%s", len(evs), eventsString(evs))
	}
}

func eventString(ev datapath.Event) string {
	kind := map[datapath.EventKind]string{datapath.EventDrop: "drop", datapath.EventTrace: "trace"}[ev.Kind]
	return fmt.Sprintf("{kind %s(%d) prog %s reason %s ifindex %d target %d len %d eth_proto %#04x proto %d %s:%d -> %s:%d}",
		kind, ev.Kind, ev.Prog, ev.Reason, ev.Ifindex, ev.Target, ev.Len, be16(ev.EthProto), ev.Proto,
		beAddr(ev.Saddr), be16(ev.Sport), beAddr(ev.Daddr), be16(ev.Dport))
}

func eventsString(evs []datapath.Event) string {
	s := make([]string, len(evs))
	for i, ev := range evs {
		s[i] = "  " + eventString(ev)
	}
	return strings.Join(s, "\n")
}

// be16 reads a field the kernel keeps in network byte order and Go decoded
// in host order.
func be16(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// beAddr reads an address field the way be16 reads a port.
func beAddr(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// packet is an IPv4 packet before it is marshalled, so that a test can derive
// the packet it expects from the one it sends.
type packet struct {
	ip ipv4
	l4 []byte // the TCP or UDP segment, or a fragment's bytes
}

func (p packet) marshal() []byte { return p.ip.marshal(p.l4) }

// withTTL returns the packet as a router would forward it, TTL ttl.
func (p packet) withTTL(ttl uint8) packet {
	p.ip.TTL = ttl
	return p
}

// withTOS returns the packet with TOS byte tos.
func (p packet) withTOS(tos uint8) packet {
	p.ip.TOS = tos
	return p
}

// udpPacket is a small DNS-like UDP datagram without DF.
func udpPacket(src, dst netip.Addr) packet {
	return packet{
		ip: ipv4{ID: 0x1c46, TTL: 64, Protocol: ipProtoUDP, Src: src, Dst: dst, L4Checksum: true},
		l4: udp{SrcPort: 40000, DstPort: 53}.marshal([]byte("patchcord: one hop, no bridge")),
	}
}

// udpPacketOfLen is a UDP datagram whose IP packet is tot bytes long, with
// DF or without.
func udpPacketOfLen(src, dst netip.Addr, tot int, df bool) packet {
	p := udpPacket(src, dst)
	if df {
		p.ip.FragOff = ipDF
	}
	p.l4 = udp{SrcPort: 40000, DstPort: 53}.marshal(make([]byte, tot-ipv4HdrLen-udpHdrLen))
	return p
}

// tcpPacket is a TCP data segment with DF, as Linux sends them.
func tcpPacket(src, dst netip.Addr) packet {
	return packet{
		ip: ipv4{ID: 0xbeef, FragOff: ipDF, TTL: 64, Protocol: ipProtoTCP, Src: src, Dst: dst, L4Checksum: true},
		l4: tcp{SrcPort: 41000, DstPort: 8080, Seq: 1000, Ack: 2000, Flags: tcpACK | tcpPSH, Window: 502}.
			marshal([]byte("GET / HTTP/1.1\r\n\r\n")),
	}
}

// fragment is a fragment of a UDP datagram that is not its first: raw bytes
// with no UDP header, as the wire carries them. fragOff holds MF and the
// offset in 8-byte units.
func fragment(src, dst netip.Addr, fragOff uint16) packet {
	return packet{
		ip: ipv4{ID: 0x4242, FragOff: fragOff, TTL: 64, Protocol: ipProtoUDP, Src: src, Dst: dst},
		l4: []byte("...the rest of a datagram, 8-byte aligned..."),
	}
}

// fromPod is p in an Ethernet frame from podA to its gateway.
func fromPod(p packet) []byte {
	return ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: ethTypeIPv4}.marshal(p.marshal())
}

// tunnel is a VXLAN frame arriving on the uplink, before it is marshalled.
type tunnel struct {
	eth      ethernet // outer
	ip       ipv4     // outer
	udp      udp
	vxlan    vxlan
	innerEth ethernet
	inner    []byte // the inner IPv4 packet, or whatever a test puts there
}

// fromPeer is inner as node 2 sends it to node 1: standard VXLAN, VNI 1.
func fromPeer(inner []byte) tunnel {
	return tunnel{
		eth:   ethernet{Dst: uplinkMAC, Src: peerMAC, Type: ethTypeIPv4},
		ip:    ipv4{ID: 0, FragOff: ipDF, TTL: 64, Protocol: ipProtoUDP, Src: peerIP, Dst: nodeIP},
		udp:   udp{SrcPort: 51234, DstPort: 4789},
		vxlan: vxlan{Flags: vxlanFlagI, VNI: 1},
		// A patchcord peer leaves the inner destination MAC zero.
		innerEth: ethernet{Src: peerMAC, Type: ethTypeIPv4},
		inner:    inner,
	}
}

func (t tunnel) marshal() []byte {
	return t.eth.marshal(t.ip.marshal(t.udp.marshal(t.vxlan.marshal(t.innerEth.marshal(t.inner)))))
}

// encapsulated is the frame from_pod and to_uplink should make of inner
// for node under cfg: eth is the outer Ethernet header, left for
// bpf_redirect_neigh to address; tos and df are what the outer header copies
// from inner. The outer source port and IP ID come from a hash and a random
// number, so the caller passes what the program chose after checking it.
func encapsulated(eth ethernet, inner []byte, cfg bpfmaps.Config, node bpfmaps.Node, tos uint8, df bool, srcPort, id uint16) []byte {
	var frag uint16
	if df {
		frag = ipDF
	}
	return tunnel{
		eth:      eth,
		ip:       ipv4{TOS: tos, ID: id, FragOff: frag, TTL: 64, Protocol: ipProtoUDP, Src: cfg.NodeIP, Dst: node.NodeIP},
		udp:      udp{SrcPort: srcPort, DstPort: cfg.VXLANPort},
		vxlan:    vxlan{Flags: vxlanFlagI, VNI: cfg.VNI},
		innerEth: ethernet{Dst: node.VtepMAC, Src: cfg.UplinkMAC, Type: ethTypeIPv4},
		inner:    inner,
	}.marshal()
}

// wantForwarded checks that prog redirects in to pod to: p one hop later,
// addressed from to's gateway to to, counted under counter as bytes.
func wantForwarded(t *testing.T, n *testNode, prog string, in []byte, to pod, p packet, counter string, bytes int) {
	t.Helper()
	ret, out := mustRun(t, n.prog(prog), in)

	wantVerdict(t, ret, tcActRedirect)
	want := ethernet{Dst: to.MAC, Src: to.HostMAC, Type: ethTypeIPv4}.marshal(p.withTTL(p.ip.TTL - 1).marshal())
	wantFrame(t, out, want)
	wantIPv4ChecksumValid(t, out, ethHdrLen, "forwarded packet")
	n.wantCounters(map[string]bpfmaps.Counter{counter: counted(bytes)})
	n.wantNoEvents()
}

// passCase is a frame a program must leave alone: passed on unchanged,
// counted nowhere, reported nowhere.
type passCase struct {
	name       string
	config     *bpfmaps.Config // nil: none written
	peerNative bool            // the peer node is reached by routing
	in         []byte
}

// newPeerNode is a node with cfg (nil: none written) that knows the peer
// node, native or not, and pods.
func newPeerNode(tb testing.TB, cfg *bpfmaps.Config, peerNative bool, pods ...pod) *testNode {
	tb.Helper()
	n := newTestNode(tb)
	if cfg != nil {
		n.configure(*cfg)
	}
	peer := peerNode()
	peer.Native = peerNative
	n.addNode(peer)
	for _, p := range pods {
		n.addPod(p)
	}
	return n
}

// runPassCases runs prog on each case's frame on a node that knows the peer
// node and pods.
func runPassCases(t *testing.T, prog string, tests []passCase, pods ...pod) {
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPeerNode(t, tt.config, tt.peerNative, pods...)

			ret, out := mustRun(t, n.prog(prog), tt.in)

			wantVerdict(t, ret, tcActOK)
			wantFrame(t, out, tt.in)
			n.wantCounters(nil)
			n.wantNoEvents()
		})
	}
}

// encapCase is one packet from_pod or to_uplink must wrap: the node's
// config, the peer it goes to, and what the outer header copies of it.
type encapCase struct {
	name   string
	config bpfmaps.Config
	node   bpfmaps.Node
	packet packet
	tos    uint8
	df     bool
}

// encapPeerCases are the peers every encapsulating program must address
// right: a Flannel peer (its port, its VTEP MAC) and another VNI.
func encapPeerCases(src netip.Addr) []encapCase {
	flannel := defaultConfig()
	flannel.VXLANPort = 8472
	vni42 := defaultConfig()
	vni42.VNI = 42
	vtep := peerNode()
	vtep.VtepMAC = peerVtepMAC
	return []encapCase{
		{name: "flannel port and vtep MAC", config: flannel, node: vtep, packet: udpPacket(src, peerPodIP)},
		{name: "vni 42", config: vni42, node: peerNode(), packet: tcpPacket(src, peerPodIP), df: true},
	}
}

// wantEncapsulated checks that prog redirected in wrapped for tt: eth is
// the outer Ethernet header it keeps, inner the packet inside.
func (tt encapCase) wantEncapsulated(t *testing.T, n *testNode, prog string, in []byte, eth ethernet, inner []byte) []byte {
	t.Helper()
	ret, out := mustRun(t, n.prog(prog), in)
	wantVerdict(t, ret, tcActRedirect)
	srcPort, id := chosenByEncap(t, out, tt.df)
	wantFrame(t, out, encapsulated(eth, inner, tt.config, tt.node, tt.tos, tt.df, srcPort, id))
	wantIPv4ChecksumValid(t, out, ethHdrLen, "outer header")
	// Counted before encapsulation: the sender's bytes.
	n.wantCounters(map[string]bpfmaps.Counter{"encap": counted(len(in))})
	n.wantNoEvents()
	return out
}

// Offsets of the outer fields encapsulation fills with a hash and a random
// number.
const (
	outerIPIDOffset   = ethHdrLen + 4
	outerUDPSrcOffset = ethHdrLen + ipv4HdrLen
)

// chosenByEncap returns the outer UDP source port and IP ID the program
// chose, after checking what can be checked of them: the port lies in the
// dynamic range (RFC 6335), which gives ECMP in the underlay its entropy,
// and the ID is zero when DF is set (RFC 6864: atomic datagrams need none).
func chosenByEncap(tb testing.TB, out []byte, df bool) (srcPort, id uint16) {
	tb.Helper()
	if len(out) < outerUDPSrcOffset+2 {
		tb.Fatalf("frame of %d bytes is too short to be encapsulated:\n%s", len(out), describe(out))
	}
	srcPort = binary.BigEndian.Uint16(out[outerUDPSrcOffset:])
	if srcPort < 49152 {
		tb.Errorf("outer UDP source port %d: want one from 49152-65535", srcPort)
	}
	id = binary.BigEndian.Uint16(out[outerIPIDOffset:])
	if df && id != 0 {
		tb.Errorf("outer IP ID %#04x with DF set: want 0", id)
	}
	return srcPort, id
}

// wantIPv4ChecksumValid checks the IPv4 header at off in frame the way a
// receiver would.
func wantIPv4ChecksumValid(tb testing.TB, frame []byte, off int, what string) {
	tb.Helper()
	if len(frame) < off+ipv4HdrLen {
		tb.Errorf("%s: no IPv4 header at byte %d of a %d-byte frame", what, off, len(frame))
		return
	}
	hlen := int(frame[off]&0x0f) * 4
	if hlen < ipv4HdrLen || len(frame) < off+hlen {
		tb.Errorf("%s: bad IPv4 header length %d", what, hlen)
		return
	}
	if hdr := frame[off : off+hlen]; !ipv4ChecksumValid(hdr) {
		tb.Errorf("%s: IPv4 checksum %#04x is invalid, want %#04x", what,
			binary.BigEndian.Uint16(hdr[10:]), ipv4Checksum(hdr))
	}
}

// truncate returns the first n bytes of b.
func truncate(b []byte, n int) []byte { return slices.Clone(b[:n]) }

func ptr[T any](v T) *T { return &v }
