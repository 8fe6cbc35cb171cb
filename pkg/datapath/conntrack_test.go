// This file tests the NAT-aware fast path: a packet of a connection the
// kernel's conntrack has translated is left to the host stack, which reverses
// the translation; any other packet keeps the fast path. Each case runs in a
// namespace of its own whose conntrack table holds one entry made with the
// conntrack tool, so the root namespace's table is never touched.
package datapath_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"

	"github.com/patchcord/patchcord/internal/checksum"
)

// clusterIP stands for a service address kube-proxy DNATs.
const clusterIP = "10.96.0.10"

// mustConntrackNS returns a fresh namespace whose conntrack table holds the
// entry made by `conntrack -I args...`.
func mustConntrackNS(t *testing.T, args ...string) ns.NetNS {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	if len(args) > 0 {
		conntrackIn(t, netns, append([]string{"-I", "-t", "60"}, args...)...)
	}
	return netns
}

// conntrackIn runs the conntrack tool in netns.
func conntrackIn(t *testing.T, netns ns.NetNS, args ...string) {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=" + netns.Path(), "conntrack"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("conntrack %v: %v\n%s", args, err, out)
	}
}

// runIn runs prog on in from inside netns, so that the conntrack lookup
// sees that namespace's table.
func runIn(t *testing.T, netns ns.NetNS, n *testNode, prog string, in []byte) (ret uint32, out []byte) {
	t.Helper()
	err := netns.Do(func(ns.NetNS) error {
		ret, out = mustRun(t, n.prog(prog), in)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ret, out
}

// wantToStack checks that the program left the frame want to the host stack
// (TC_ACT_OK), counted once on each of counters.
func (n *testNode) wantToStack(ret uint32, out, want []byte, counters ...string) {
	n.tb.Helper()
	wantVerdict(n.tb, ret, tcActOK)
	wantFrame(n.tb, out, want)
	c := make(map[string]bpfmaps.Counter)
	for _, name := range counters {
		c[name] = counted(len(want))
	}
	n.wantCounters(c)
}

func TestFromPodNATedReplyGoesToHost(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	// podB asked the service on udp/40000 from port 53 and was DNATed
	// to podA; podA's answer, podA:40000 -> podB:53, is the reply.
	service := []string{"-p", "udp", "-s", podB.IP.String(), "-d", clusterIP,
		"--sport", "53", "--dport", "40000", "--dst-nat", podA.IP.String()}
	plain := []string{"-p", "udp", "-s", podB.IP.String(), "-d", podA.IP.String(),
		"--sport", "53", "--dport", "40000"}
	tests := []struct {
		name      string
		conntrack []string
		nat       bool
	}{
		{name: "reply of a DNATed connection", conntrack: service, nat: true},
		{name: "connection without NAT", conntrack: plain},
		{name: "no connection", conntrack: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			netns := mustConntrackNS(t, tt.conntrack...)
			n := newPodNode(t)
			in := fromPod(udpPacket(podA.IP, podB.IP))

			ret, out := runIn(t, netns, n, datapath.FromPod, in)

			if tt.nat {
				n.wantToStack(ret, out, in, "to_host_nat")
				return
			}
			wantVerdict(t, ret, tcActRedirect)
			n.wantCounters(map[string]bpfmaps.Counter{"local_redirect": counted(len(in))})
		})
	}
}

// TestNATVerdictPerTCPConnection follows one TCP tuple while conntrack's
// table changes under it: segments with SYN, FIN or RST ask conntrack, the
// others take what the last of those recorded.
func TestNATVerdictPerTCPConnection(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs)
	// podB asks the service from 41000 on 8080 and is DNATed to podA;
	// podA's segments, podA:8080 -> podB:41000, are the replies.
	seg := func(flags uint8) []byte {
		p := tcpPacket(podA.IP, podB.IP)
		p.l4 = tcp{SrcPort: 8080, DstPort: 41000, Seq: 1000, Ack: 2000, Flags: flags, Window: 502}.marshal([]byte("200 OK"))
		return fromPod(p)
	}
	nat := []string{"-p", "tcp", "-s", podB.IP.String(), "-d", clusterIP, "--sport", "41000", "--dport", "8080",
		"--dst-nat", podA.IP.String(), "--state", "ESTABLISHED"}
	netns := mustConntrackNS(t)
	n := newPodNode(t)
	steps := []struct {
		do      func()
		flags   uint8
		verdict uint32
		why     string
	}{
		{nil, tcpACK, tcActRedirect, "no connection: asked, redirected"},
		{func() { conntrackIn(t, netns, append([]string{"-I", "-t", "60"}, nat...)...) }, tcpACK | tcpPSH, tcActRedirect,
			"NAT entry made mid-stream: the recorded verdict holds until the next SYN, FIN or RST"},
		{nil, tcpSYN | tcpACK, tcActOK, "the backend's SYN-ACK asks again and finds the NAT"},
		{nil, tcpACK, tcActOK, "the rest of the connection follows it to the stack"},
		{func() { conntrackIn(t, netns, "-D", "-p", "tcp", "-s", podB.IP.String(), "-d", clusterIP) }, tcpACK, tcActOK,
			"entry flushed: the stale NAT verdict keeps the (always correct) stack path"},
		{nil, tcpRST | tcpACK, tcActRedirect, "RST asks again: no connection"},
		{func() { conntrackIn(t, netns, append([]string{"-I", "-t", "60"}, nat...)...) }, tcpFIN | tcpACK, tcActOK, "FIN asks again"},
	}
	for i, st := range steps {
		if st.do != nil {
			st.do()
		}
		ret, _ := runIn(t, netns, n, datapath.FromPod, seg(st.flags))
		if ret != st.verdict {
			t.Fatalf("step %d (%s): verdict %d, want %d", i, st.why, ret, st.verdict)
		}
	}
	// One tuple, one recorded verdict.
	var k [12]byte
	var v uint32
	entries := 0
	it := n.d.Maps.CtVerdicts.Iterate()
	for it.Next(&k, &v) {
		entries++
	}
	if err := it.Err(); err != nil || entries != 1 {
		t.Fatalf("ct_verdicts holds %d entries (%v), want 1", entries, err)
	}
}

// TestNATVerdictUDPAsksEveryDatagram: UDP has no handshake, so a NAT entry
// made between two datagrams of one flow takes effect at once.
func TestNATVerdictUDPAsksEveryDatagram(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs)
	netns := mustConntrackNS(t)
	n := newPodNode(t)
	in := fromPod(udpPacket(podA.IP, podB.IP))
	if ret, _ := runIn(t, netns, n, datapath.FromPod, in); ret != tcActRedirect {
		t.Fatalf("no connection: verdict %d, want redirect", ret)
	}
	conntrackIn(t, netns, "-I", "-t", "60", "-p", "udp", "-s", podB.IP.String(), "-d", clusterIP,
		"--sport", "53", "--dport", "40000", "--dst-nat", podA.IP.String())
	if ret, _ := runIn(t, netns, n, datapath.FromPod, in); ret != tcActOK {
		t.Fatalf("NATed: verdict %d, want TC_ACT_OK", ret)
	}
}

func TestFromUplinkNATedReplyGoesToHost(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	// dstPod asked a service from udp/53 and was DNATed to a pod on the
	// peer node; the peer pod's answer arrives in VXLAN.
	netns := mustConntrackNS(t, "-p", "udp", "-s", dstPod.IP.String(), "-d", clusterIP,
		"--sport", "53", "--dport", "40000", "--dst-nat", peerPodIP.String())
	n := newUplinkNode(t, defaultConfig())
	inner := udpPacket(peerPodIP, dstPod.IP).withTTL(63).marshal()
	tun := fromPeer(inner)
	in := tun.marshal()

	ret, out := runIn(t, netns, n, datapath.FromUplink, in)

	// Decapsulated, still addressed to the uplink, TTL left for the stack.
	n.wantToStack(ret, out, tun.eth.marshal(inner), "decap", "to_host_nat")
}

const (
	ipProtoICMP = 1
	ipProtoSCTP = 132

	icmpDestUnreach  = 3
	icmpTimeExceeded = 11
	icmpPortUnreach  = 3 // code of icmpDestUnreach
	icmpFragNeeded   = 4 // code of icmpDestUnreach
)

// icmpError is an ICMP error of type typ and code about a packet, of which
// it carries quoted: RFC 792 asks for the IP header and 8 bytes more (quote),
// a test may cut that short. A frag-needed error names MTU 1400.
func icmpError(src, dst netip.Addr, typ, code uint8, quoted []byte) packet {
	b := make([]byte, 8, 8+len(quoted))
	b[0], b[1] = typ, code
	if typ == icmpDestUnreach && code == icmpFragNeeded {
		binary.BigEndian.PutUint16(b[6:], 1400)
	}
	b = append(b, quoted...)
	binary.BigEndian.PutUint16(b[2:], ^checksum.OnesSum(b, 0))
	return packet{ip: ipv4{ID: 0x0c0c, TTL: 64, Protocol: ipProtoICMP, Src: src, Dst: dst}, l4: b}
}

// quote is what an ICMP error about p carries: its IP header and 8 bytes.
func quote(p packet) []byte { return p.marshal()[:p.ip.headerLen()+8] }

// entryFor is the conntrack entry of p's connection in p's direction; with
// nat, p's sender addressed clusterIP and conntrack DNATed it to p's
// destination.
func entryFor(p packet, nat bool) []string {
	proto := map[uint8]string{ipProtoUDP: "udp", ipProtoTCP: "tcp"}[p.ip.Protocol]
	args := []string{"-p", proto, "-s", p.ip.Src.String(),
		"--sport", fmt.Sprint(binary.BigEndian.Uint16(p.l4[0:])), "--dport", fmt.Sprint(binary.BigEndian.Uint16(p.l4[2:]))}
	if proto == "tcp" {
		args = append(args, "--state", "ESTABLISHED")
	}
	if nat {
		return append(args, "-d", clusterIP, "--dst-nat", p.ip.Dst.String())
	}
	return append(args, "-d", p.ip.Dst.String())
}

// untrackedCases are packets from src to dst that conntrack cannot be asked
// about on the fast path.
func untrackedCases(src, dst netip.Addr) []struct {
	name   string
	packet packet
} {
	first := udpPacket(src, dst)
	first.ip.FragOff = ipMF
	sctp := packet{ip: ipv4{ID: 0x5c79, TTL: 64, Protocol: ipProtoSCTP, Src: src, Dst: dst},
		l4: []byte("\x9c\x40\x00\x35\x00\x00\x00\x01 an SCTP common header")}
	shortTCP := tcpPacket(src, dst)
	shortTCP.ip.L4Checksum = false
	shortTCP.l4 = shortTCP.l4[:2]
	shortUDP := udpPacket(src, dst)
	shortUDP.ip.L4Checksum = false
	shortUDP.l4 = shortUDP.l4[:3]
	// An error about a packet dst sent to src.
	reply := udpPacket(dst, src)
	cutICMP := icmpError(src, dst, icmpDestUnreach, icmpPortUnreach, nil)
	cutICMP.l4 = cutICMP.l4[:4]
	return []struct {
		name   string
		packet packet
	}{
		{"first fragment", first},
		{"later fragment", fragment(src, dst, ipMF|185)},
		{"last fragment", fragment(src, dst, 370)},
		{"sctp", sctp},
		{"tcp header beyond the packet", shortTCP},
		{"udp ports beyond the packet", shortUDP},
		{"icmp header beyond the packet", cutICMP},
		{"icmp error quoting a cut ip header", icmpError(src, dst, icmpDestUnreach, icmpPortUnreach, quote(reply)[:12])},
		{"icmp error quoting no ports", icmpError(src, dst, icmpTimeExceeded, 0, quote(reply)[:ipv4HdrLen+2])},
		{"icmp error quoting sctp", icmpError(src, dst, icmpDestUnreach, icmpPortUnreach,
			sctp.marshal()[:ipv4HdrLen+8])},
	}
}

// icmpCases are ICMP errors the backend sends about a request from client
// it received (DNATed to it when nat), and whether they are NATed.
func icmpCases(backend, client netip.Addr) []struct {
	name      string
	packet    packet
	conntrack []string
	nat       bool
} {
	udpReq, tcpReq := udpPacket(client, backend), tcpPacket(client, backend)
	unreach := icmpError(backend, client, icmpDestUnreach, icmpPortUnreach, quote(udpReq))
	fragNeeded := icmpError(backend, client, icmpDestUnreach, icmpFragNeeded, quote(tcpReq))
	return []struct {
		name      string
		packet    packet
		conntrack []string
		nat       bool
	}{
		{"port unreachable of a NATed udp flow", unreach, entryFor(udpReq, true), true},
		{"frag needed of a NATed tcp flow", fragNeeded, entryFor(tcpReq, true), true},
		{"time exceeded of a NATed udp flow", icmpError(backend, client, icmpTimeExceeded, 0, quote(udpReq)),
			entryFor(udpReq, true), true},
		{"port unreachable of a plain udp flow", unreach, entryFor(udpReq, false), false},
		{"frag needed of a plain tcp flow", fragNeeded, entryFor(tcpReq, false), false},
		{"port unreachable without a connection", unreach, nil, false},
	}
}

// Fragments, SCTP and headers the fast path cannot read cross the host
// stack, to a local pod as to a remote one.
func TestFromPodUntrackedGoesToHost(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	for _, dst := range []struct {
		name string
		ip   netip.Addr
	}{{"local pod", podB.IP}, {"remote pod", peerPodIP}} {
		for _, tt := range untrackedCases(podA.IP, dst.ip) {
			t.Run(dst.name+"/"+tt.name, func(t *testing.T) {
				n := newPodNode(t)
				n.configure(defaultConfig())
				in := fromPod(tt.packet)

				ret, out := mustRun(t, n.prog(datapath.FromPod), in)

				n.wantToStack(ret, out, in, "to_host_untracked")
			})
		}
	}
}

// An ICMP error a backend pod sends about a client's request is NATed when
// the request was: the stack must rewrite the quoted header too.
func TestFromPodICMPErrorOfNATedFlow(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	for _, client := range []struct {
		name, fast string
		ip         netip.Addr
	}{{"local client", "local_redirect", podB.IP}, {"remote client", "encap", peerPodIP}} {
		for _, tt := range icmpCases(podA.IP, client.ip) {
			t.Run(client.name+"/"+tt.name, func(t *testing.T) {
				netns := mustConntrackNS(t, tt.conntrack...)
				n := newPodNode(t)
				n.configure(defaultConfig())
				in := fromPod(tt.packet)

				ret, out := runIn(t, netns, n, datapath.FromPod, in)

				if tt.nat {
					n.wantToStack(ret, out, in, "to_host_nat")
					return
				}
				wantVerdict(t, ret, tcActRedirect)
				n.wantCounters(map[string]bpfmaps.Counter{client.fast: counted(len(in))})
			})
		}
	}
}

// Decapsulated traffic from a remote pod is judged as from_pod judges it;
// what goes to the host leaves decapsulated, addressed to the uplink.
func TestFromUplinkUntrackedGoesToHost(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	for _, tt := range untrackedCases(peerPodIP, dstPod.IP) {
		t.Run(tt.name, func(t *testing.T) {
			n := newUplinkNode(t, defaultConfig())
			inner := toDstPod(tt.packet).marshal()
			tun := fromPeer(inner)

			ret, out := mustRun(t, n.prog(datapath.FromUplink), tun.marshal())

			n.wantToStack(ret, out, tun.eth.marshal(inner), "decap", "to_host_untracked")
		})
	}
}

func TestFromUplinkICMPErrorOfNATedFlow(t *testing.T) {
	requireFeature(t, datapath.FeatureCTKfuncs) // the NAT check runs only with them
	for _, tt := range icmpCases(peerPodIP, dstPod.IP) {
		t.Run(tt.name, func(t *testing.T) {
			netns := mustConntrackNS(t, tt.conntrack...)
			n := newUplinkNode(t, defaultConfig())
			inner := toDstPod(tt.packet).marshal()
			tun := fromPeer(inner)

			ret, out := runIn(t, netns, n, datapath.FromUplink, tun.marshal())

			want := tun.eth.marshal(inner)
			if tt.nat {
				n.wantToStack(ret, out, want, "decap", "to_host_nat")
				return
			}
			wantVerdict(t, ret, tcActRedirect)
			n.wantCounters(map[string]bpfmaps.Counter{"decap": counted(len(want))})
		})
	}
}
