// This file fuzzes from_pod and from_uplink through BPF_PROG_RUN: any frame a
// pod or the wire can send must leave the programs without breaking the
// invariants the datapath's security rests on. from_pod forwards only what
// carries the pod's own addresses (or answers its ARP for the gateway); from_uplink
// decapsulates only VXLAN from a known node to this node's tunnel endpoint,
// with an inner source that node may send; a frame handed to the host
// stack is the frame that came in; every run counts exactly its verdict.
//
// `go test -fuzz` runs the target in worker processes, each of which runs the
// Fuzz function's body: the datapath is loaded once there, before f.Fuzz.
package datapath_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// Node 3 is a second peer: node 2 may not send in its pods' name.
var (
	thirdIP    = netip.MustParseAddr("198.18.0.3")
	thirdCIDR  = netip.MustParsePrefix("10.244.3.0/24")
	thirdPodIP = netip.MustParseAddr("10.244.3.9")
)

// BPF_PROG_RUN refuses (EINVAL) frames shorter than an Ethernet header,
// IPv4 and IPv6 frames shorter than their network header (this kernel checks
// the L3 header the ethertype announces) and frames longer than a page less
// the skb's head- and tailroom (3720 bytes here): a device never hands tc such
// an skb, so the targets skip them rather than call them errors.
const fuzzMaxFrame = 3000

func runnable(in []byte) bool {
	if len(in) < ethHdrLen || len(in) > fuzzMaxFrame {
		return false
	}
	switch ethType(in) {
	case ethTypeIPv4:
		return len(in) >= ethHdrLen+ipv4HdrLen
	case ethTypeIPv6:
		return len(in) >= ethHdrLen+40
	}
	return true
}

// Byte offsets in an Ethernet frame carrying IPv4.
const (
	offEthSrc  = 6
	offEthType = 12
	offIPSrc   = ethHdrLen + 12
	offIPDst   = ethHdrLen + 16
	offUDPDst  = ethHdrLen + ipv4HdrLen + 2
	offVXLAN   = ethHdrLen + ipv4HdrLen + udpHdrLen
	offInnerIP = ethHdrLen + vxlanOverhead
)

// eventCounters count events rather than packets; they move beside a
// verdict counter, or not, depending on the ring buffer and the rate limit.
var eventCounters = map[string]bool{"events_lost": true, "events_suppressed": true}

// fuzzRun is one run's verdict, output and counter movement.
type fuzzRun struct {
	in, out []byte
	ret     uint32
	moved   map[string]uint64 // packets per counter, only those that moved
}

// mustFuzzRun runs prog on in and returns what moved. Counters are read
// before and after rather than reset, so that the loaded datapath serves
// every input of the worker.
func mustFuzzRun(t *testing.T, d *datapath.Datapath, prog string, in []byte) fuzzRun {
	p, err := d.Program(prog)
	if err != nil {
		t.Fatal(err)
	}
	st := bpfmaps.NewStats(&d.Maps)
	before, err := st.Read()
	if err != nil {
		t.Fatal(err)
	}
	ret, out, err := run(p, in)
	if err != nil {
		t.Fatalf("run %s on a %d-byte frame: %v\n%s", prog, len(in), err, describe(in))
	}
	after, err := st.Read()
	if err != nil {
		t.Fatal(err)
	}
	r := fuzzRun{in: in, out: out, ret: ret, moved: map[string]uint64{}}
	for name, c := range after {
		if d := c.Packets - before[name].Packets; d != 0 && !eventCounters[name] {
			r.moved[name] = d
		}
	}
	for name := range r.moved {
		coverOutcome(name)
	}
	return r
}

// coverSink keeps coverOutcome's branches from being optimised away.
var coverSink int

// coverOutcome gives each datapath outcome its own Go branch. The fuzzer
// sees coverage of Go code only, not of the BPF program; with a branch per
// counter, an input that reaches a new verdict counts as new coverage and
// joins the corpus.
func coverOutcome(name string) {
	sink := 0
	switch name {
	case "local_redirect":
		sink++
	case "encap":
		sink++
	case "decap":
		sink++
	case "to_host":
		sink++
	case "arp_reply":
		sink++
	case "drop_malformed":
		sink++
	case "drop_spoofed":
		sink++
	case "drop_unregistered":
		sink++
	case "drop_unknown_tunnel":
		sink++
	case "drop_bad_vni":
		sink++
	case "drop_no_endpoint":
		sink++
	case "drop_encap_failed":
		sink++
	case "to_host_nat":
		sink++
	case "drop_vlan":
		sink++
	case "drop_ipv6":
		sink++
	case "drop_ethertype":
		sink++
	case "drop_inner_spoofed":
		sink++
	case "to_host_untracked":
		sink++
	case "to_host_encapsulated":
		sink++
	}
	coverSink += sink
}

func (r fuzzRun) String() string {
	return fmt.Sprintf("verdict %s, counters moved %v\ninput:\n%soutput:\n%s", verdictName(r.ret), r.moved, describe(r.in), describe(r.out))
}

// total is how many packets the verdict counters moved by.
func (r fuzzRun) total() uint64 {
	var n uint64
	for _, d := range r.moved {
		n += d
	}
	return n
}

// wantOneCounter checks that exactly one verdict counter moved, by one, and
// that it agrees with the verdict: drops count a drop_ reason, and only they do.
func (r fuzzRun) wantOneCounter(t *testing.T) {
	t.Helper()
	if r.total() != 1 || len(r.moved) != 1 {
		t.Fatalf("want exactly one verdict counter to move by one: %s", r)
	}
	for name := range r.moved {
		if strings.HasPrefix(name, "drop_") != (r.ret == tcActShot) {
			t.Fatalf("counter %s does not match the verdict: %s", name, r)
		}
	}
}

// fuzzTarget seeds f and returns a node that knows both peers and pods.
func fuzzTarget(f *testing.F, seeds [][]byte, pods ...pod) *datapath.Datapath {
	for _, s := range seeds {
		f.Add(s)
	}
	n := newTestNode(f)
	n.configure(defaultConfig())
	n.addNode(peerNode())
	n.addNode(bpfmaps.Node{PodCIDR: thirdCIDR, NodeIP: thirdIP})
	for _, p := range pods {
		n.addPod(p)
	}
	return n.d
}

func ethType(b []byte) uint16 { return binary.BigEndian.Uint16(b[offEthType:]) }

func addrAt(b []byte, off int) netip.Addr {
	if len(b) < off+4 {
		return netip.Addr{}
	}
	return netip.AddrFrom4([4]byte(b[off : off+4]))
}

// podSeeds are frames of every class a pod sends.
func podSeeds() [][]byte {
	fromA := func(typ uint16, payload []byte) []byte {
		return ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: typ}.marshal(payload)
	}
	icmp := packet{ip: ipv4{TTL: 64, Protocol: 1, Src: podA.IP, Dst: podB.IP}, l4: []byte{8, 0, 0xf7, 0xff, 0, 0, 0, 0}}
	vlan := binary.BigEndian.AppendUint16([]byte{0, 100}, ethTypeIPv4)
	qinq := binary.BigEndian.AppendUint16([]byte{0, 0}, ethTypeVLAN)
	qinq = append(binary.BigEndian.AppendUint16(qinq, 0), 0x08, 0x00)
	return [][]byte{
		ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}.marshal(arpRequest(podA.MAC, podA.IP, gatewayIP).marshal()),
		ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}.marshal(arpRequest(podA.MAC, podB.IP, gatewayIP).marshal()),
		fromPod(udpPacket(podA.IP, podB.IP)),
		fromPod(tcpPacket(podA.IP, podB.IP)),
		fromA(ethTypeIPv4, icmp.marshal()),
		fromPod(udpPacket(podA.IP, peerPodIP)),
		fromPod(tcpPacket(podA.IP, thirdPodIP)),
		fromPod(udpPacket(podA.IP, outsideIP)),
		fromPod(udpPacket(podB.IP, peerPodIP)), // spoofed
		fromPod(fragment(podA.IP, peerPodIP, ipMF|8)),
		fromA(ethTypeIPv6, ipv6(netip.MustParseAddr("fe80::1"), netip.MustParseAddr("ff02::2"))),
		fromA(ethTypeVLAN, append(vlan, udpPacket(podA.IP, peerPodIP).marshal()...)),
		fromA(0x88a8, append(qinq, udpPacket(nodeIP, nodeIP).marshal()...)),
		fromA(0x88cc, []byte("lldp")),
		fromA(ethTypeIPv4, fromPeer(udpPacket(podA.IP, peerPodIP).marshal()).marshal()[ethHdrLen:]),
		truncate(ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}.marshal(arpRequest(podA.MAC, podA.IP, gatewayIP).marshal()), ethHdrLen+20),
		truncate(fromPod(tcpPacket(podA.IP, peerPodIP)), ethHdrLen+ipv4HdrLen+4),
	}
}

func FuzzFromPod(f *testing.F) {
	d := fuzzTarget(f, podSeeds(), podA, podB)
	f.Fuzz(func(t *testing.T, in []byte) {
		if !runnable(in) {
			return // a frame BPF_PROG_RUN refuses: no device ever hands it to tc
		}
		r := mustFuzzRun(t, d, datapath.FromPod, bytes.Clone(in))
		r.wantOneCounter(t)
		switch r.ret {
		case tcActShot:
		case tcActOK:
			if !bytes.Equal(r.out, in) {
				t.Fatalf("frame for the host stack was modified: %s", r)
			}
		case tcActRedirect:
			wantPodRedirectAllowed(t, r)
		default:
			t.Fatalf("unexpected verdict: %s", r)
		}
	})
}

// wantPodRedirectAllowed checks a frame from_pod forwarded: the pod's own
// ARP request for the gateway, answered, or IPv4 from the pod's own
// addresses, still carrying its source after rewriting or encapsulation.
func wantPodRedirectAllowed(t *testing.T, r fuzzRun) {
	t.Helper()
	if !bytes.Equal(r.in[offEthSrc:offEthSrc+6], podA.MAC) {
		t.Fatalf("redirected a frame whose Ethernet source is not the pod's: %s", r)
	}
	switch ethType(r.in) {
	case ethTypeARP:
		wantGatewayReply(t, r)
	case ethTypeIPv4:
		if addrAt(r.in, offIPSrc) != podA.IP {
			t.Fatalf("redirected IPv4 whose source is not the pod's: %s", r)
		}
		switch {
		case r.moved["local_redirect"] == 1 && len(r.out) == len(r.in):
			if addrAt(r.out, offIPSrc) != podA.IP {
				t.Fatalf("local redirect lost the pod's source: %s", r)
			}
		case r.moved["encap"] == 1 && len(r.out) == len(r.in)+vxlanOverhead:
			if addrAt(r.out, offInnerIP+12) != podA.IP || addrAt(r.out, offIPSrc) != nodeIP {
				t.Fatalf("encapsulation lost the pod's or the node's source: %s", r)
			}
		default:
			t.Fatalf("redirect neither local nor encapsulated: %s", r)
		}
	default:
		t.Fatalf("redirected ethertype %#04x: %s", ethType(r.in), r)
	}
}

// wantGatewayReply checks that a redirected ARP frame is the gateway's reply
// to the pod's request: from the host veth's MAC to the pod, naming the pod's
// address as the sender asked with it (0.0.0.0 for a duplicate-address probe).
func wantGatewayReply(t *testing.T, r fuzzRun) {
	t.Helper()
	if len(r.out) < ethHdrLen+arpLen || len(r.in) < ethHdrLen+arpLen {
		t.Fatalf("redirected a truncated ARP frame: %s", r)
	}
	a, in := r.out[ethHdrLen:], r.in[ethHdrLen:]
	spa := addrAt(in, 14)
	want := ethernet{Dst: podA.MAC, Src: podA.HostMAC, Type: ethTypeARP}.marshal(arp{
		HType: 1, PType: ethTypeIPv4, HLen: 6, PLen: 4, Op: arpOpReply,
		SHA: podA.HostMAC, SPA: gatewayIP, THA: podA.MAC, TPA: spa,
	}.marshal())
	ok := r.moved["arp_reply"] == 1 && bytes.Equal(r.out[:ethHdrLen+arpLen], want) &&
		binary.BigEndian.Uint16(in[6:]) == arpOpRequest && addrAt(in, 24) == gatewayIP &&
		(spa == podA.IP || spa == netip.IPv4Unspecified()) && bytes.Equal(a[arpLen:], in[arpLen:])
	if !ok {
		t.Fatalf("redirected ARP that is not the gateway's reply to the pod:\n%s\nwant:\n%s", r, describe(want))
	}
}

// uplinkSeeds are frames of every class the uplink receives.
func uplinkSeeds() [][]byte {
	tun := func(inner packet, edit func(*tunnel)) []byte {
		t := fromPeer(inner.marshal())
		if edit != nil {
			edit(&t)
		}
		return t.marshal()
	}
	onWire := func(p packet) []byte {
		return ethernet{Dst: uplinkMAC, Src: peerMAC, Type: ethTypeIPv4}.marshal(p.marshal())
	}
	return [][]byte{
		tun(udpPacket(peerPodIP, dstPod.IP), nil),
		tun(tcpPacket(peerPodIP, dstPod.IP), nil),
		tun(tcpPacket(peerIP, dstPod.IP), nil),
		tun(udpPacket(peerPodIP, dstPod.IP).withTTL(1), nil),
		tun(udpPacket(thirdPodIP, dstPod.IP), nil), // node 2 in node 3's name
		tun(udpPacket(dstPod.IP, dstPod.IP), nil),  // in a local pod's name
		tun(udpPacket(outsideIP, dstPod.IP), nil),
		tun(udpPacket(peerPodIP, dstPod.IP), func(t *tunnel) { t.ip.Src = strangerIP }),
		tun(udpPacket(peerPodIP, dstPod.IP), func(t *tunnel) { t.vxlan.VNI = 2 }),
		tun(udpPacket(peerPodIP, dstPod.IP), func(t *tunnel) { t.udp.DstPort = 8472 }),
		tun(udpPacket(peerPodIP, dstPod.IP), func(t *tunnel) { t.ip.Dst = peerIP }),
		tun(udpPacket(peerPodIP, thirdPodIP), nil),
		onWire(udpPacket(peerIP, nodeIP)),
		onWire(tcpPacket(peerIP, nodeIP)),
		ethernet{Dst: uplinkMAC, Src: peerMAC, Type: ethTypeIPv6}.marshal(ipv6(netip.MustParseAddr("fe80::2"), netip.MustParseAddr("fe80::1"))),
		ethernet{Dst: broadcastMAC, Src: peerMAC, Type: ethTypeARP}.marshal(arpRequest(peerMAC, peerIP, nodeIP).marshal()),
		truncate(tun(udpPacket(peerPodIP, dstPod.IP), nil), offVXLAN+4),
		truncate(tun(udpPacket(peerPodIP, dstPod.IP), nil), offInnerIP+10),
	}
}

func FuzzFromUplink(f *testing.F) {
	d := fuzzTarget(f, uplinkSeeds(), dstPod)
	f.Fuzz(func(t *testing.T, in []byte) {
		if !runnable(in) {
			return // a frame BPF_PROG_RUN refuses: no device ever hands it to tc
		}
		r := mustFuzzRun(t, d, datapath.FromUplink, bytes.Clone(in))
		decapped := len(r.out) == len(in)-vxlanOverhead
		switch {
		case r.ret == tcActShot:
			r.wantOneCounter(t)
		case r.ret == tcActOK && !decapped:
			if !bytes.Equal(r.out, in) || r.total() != 0 {
				t.Fatalf("frame passed to the host stack was modified or counted: %s", r)
			}
		case r.ret == tcActOK || r.ret == tcActRedirect:
			wantDecapAllowed(t, r)
		default:
			t.Fatalf("unexpected verdict: %s", r)
		}
	})
}

// wantDecapAllowed checks a frame from_uplink decapsulated: VXLAN from a
// known node to this node's address, port and VNI, carrying a packet from one of
// that node's pods (or, for the host stack only, from the node itself);
// counted as decap and, when left to the stack, as its reason too.
func wantDecapAllowed(t *testing.T, r fuzzRun) {
	t.Helper()
	if len(r.out) != len(r.in)-vxlanOverhead || len(r.in) < offInnerIP+ipv4HdrLen {
		t.Fatalf("forwarded a frame that was not decapsulated: %s", r)
	}
	in := r.in
	outerSrc := addrAt(in, offIPSrc)
	if ethType(in) != ethTypeIPv4 || in[ethHdrLen] != 0x45 || in[ethHdrLen+9] != ipProtoUDP ||
		addrAt(in, offIPDst) != nodeIP || binary.BigEndian.Uint16(in[offUDPDst:]) != 4789 ||
		in[offVXLAN]&vxlanFlagI == 0 || binary.BigEndian.Uint32(in[offVXLAN+4:])>>8 != 1 {
		t.Fatalf("decapsulated a frame that is not VXLAN to this node's endpoint: %s", r)
	}
	if outerSrc != peerIP && outerSrc != thirdIP {
		t.Fatalf("decapsulated VXLAN from %s, not a known node: %s", outerSrc, r)
	}
	cidr := map[netip.Addr]netip.Prefix{peerIP: peerCIDR, thirdIP: thirdCIDR}[outerSrc]
	innerSrc := addrAt(in, offInnerIP+12)
	fromPodOfSender := cidr.Contains(innerSrc)
	if !fromPodOfSender && (r.ret == tcActRedirect || innerSrc != outerSrc) {
		t.Fatalf("decapsulated an inner source %s that node %s may not send: %s", innerSrc, outerSrc, r)
	}
	want := uint64(1)
	if r.ret == tcActOK {
		want = 2 // decap and the reason it goes via the host
	}
	if r.moved["decap"] != 1 || r.total() != want {
		t.Fatalf("decapsulation not counted as decap (and its host reason): %s", r)
	}
}
