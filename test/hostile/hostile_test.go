// Hostile pods and nodes end to end: raw frames a pod or a node may not
// send (VLAN tags, IPv6 and router advertisements, ARP in another pod's name,
// VXLAN whose inner source the sending node does not own) are sent through
// AF_PACKET sockets and must reach nothing; a fragmented reply through a
// kube-proxy DNAT still reaches its client from the service address; and a
// flood of forged frames neither silences the monitor for other drops nor
// goes unreported.
//
// Each case proves "nothing arrived" with a marker: after the hostile frames the
// same sender sends one legitimate datagram on the same path, and the sink must
// receive the marker and nothing before it.
package hostile

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// Ports of the sinks: a UDP socket in node 1's namespace (IPv4 and IPv6,
// on the wildcard address) and one in pod a of each node.
const (
	hSinkPort = 9999
	hPodPort  = 9998
)

var (
	hNode3      = nodes.Entry{Name: "node3", NodeIP: "198.18.0.3", PodCIDR: "10.244.3.0/24"}
	hNode3Pod   = netip.MustParseAddr("10.244.3.9")
	hForged     = netip.MustParseAddr("10.244.1.250") // in node 1's CIDR, no pod's
	hAllNodes   = netip.MustParseAddr("ff02::1")
	hAllNodesL2 = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
	hBroadcast  = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

// hostileLab is nodes 1 and 2 with agents (node 3 listed, not running),
// pods a and b on each, and the sinks.
type hostileLab struct {
	c            *e2e.Mesh
	n1, n2       *lab.Node
	a, b, r      *lab.Pod // a and b on node 1, r (pod a) on node 2
	aMAC, aGW    net.HardwareAddr
	aGW6         netip.Addr     // the link-local address of a's host veth
	node4, node6 net.PacketConn // node 1's sinks
	podA, podR   net.PacketConn // sinks in a and r
}

func newHostileLab(t *testing.T, ctx context.Context) *hostileLab {
	t.Helper()
	c := e2e.NewMesh(t, 1, 2)
	h := &hostileLab{c: c, n1: c.Nodes[0], n2: c.Nodes[1]}
	// Loose reverse-path filtering, so that only patchcord stands between a
	// forged source and the node's sockets.
	for _, n := range c.Nodes {
		if out, err := n.Exec(ctx, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"); err != nil {
			t.Fatalf("rp_filter on %s: %v\n%s", n.NetNS, err, out)
		}
	}
	c.StartAgents(t, ctx, []nodes.Entry{hNode3})
	c.AddPods(t, ctx, 2)
	h.a, h.b, h.r = c.Pod(1, 0), c.Pod(1, 1), c.Pod(2, 0)
	h.aMAC = linkMAC(t, h.a.NSPath, "eth0")
	ep := e2e.Endpoints(t, ctx, h.n1)[h.a.IP.String()]
	h.aGW = mustParseMAC(t, ep.HostMAC)
	// With IPv6 off on the host veth (as CNI ADD sets it), the node is
	// reached through all-nodes multicast, if at all.
	// A tentative address (DAD still running) drops what is sent to it.
	err := lab.WaitFor(ctx, "link-local address of "+ep.Ifname, func(context.Context) error {
		var tentative bool
		if h.aGW6, tentative = linkLocal(t, h.n1.NSPath, ep.Ifname); tentative {
			return fmt.Errorf("%s is tentative", h.aGW6)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !h.aGW6.IsValid() {
		h.aGW6 = hAllNodes
	}
	h.node4 = mustListenUDP(t, h.n1.NSPath, "udp4", ":"+strconv.Itoa(hSinkPort))
	h.node6 = mustListenUDP(t, h.n1.NSPath, "udp6", ":"+strconv.Itoa(hSinkPort))
	h.podA = mustListenUDP(t, h.a.NSPath, "udp4", ":"+strconv.Itoa(hPodPort))
	h.podR = mustListenUDP(t, h.r.NSPath, "udp4", ":"+strconv.Itoa(hPodPort))
	return h
}

// fromA is an IPv4 UDP frame from pod a to its gateway, with any source.
func (h *hostileLab) fromA(src, dst netip.Addr, port uint16, payload string) []byte {
	return rawEth(h.aGW, h.aMAC, rawEthIPv4, rawIPv4(17, src, dst, rawUDP(40000, port, []byte(payload))))
}

// vxlanFromN2 is VXLAN from node 2's uplink to node 1's, VNI 1, carrying
// UDP from src to pod a.
func (h *hostileLab) vxlanFromN2(t *testing.T, src netip.Addr, payload string) []byte {
	n1MAC, n2MAC := linkMAC(t, h.n1.NSPath, "eth0"), linkMAC(t, h.n2.NSPath, "eth0")
	inner := rawEth(make(net.HardwareAddr, 6), n2MAC, rawEthIPv4, rawIPv4(17, src, h.a.IP, rawUDP(40000, hPodPort, []byte(payload))))
	return rawEth(n1MAC, n2MAC, rawEthIPv4, rawIPv4(17, h.n2.IP, h.n1.IP, rawUDP(50000, 4789, rawVXLAN(1, inner))))
}

// hostileCase is frames one sender may not send, where they must not
// arrive, and what must count them.
type hostileCase struct {
	name     string
	sender   string // namespace path; frames leave its eth0
	frames   [][]byte
	sink     net.PacketConn
	marker   []byte         // a legitimate frame on the same path
	markSink net.PacketConn // where the marker arrives; nil: sink
	node     *lab.Node      // whose counter counts the drops
	counter  string
	state    func(t *testing.T) string // node state the frames must not change
}

const hRepeat = 5

func runHostileCase(t *testing.T, ctx context.Context, tc hostileCase) {
	t.Helper()
	var before string
	if tc.state != nil {
		before = tc.state(t)
	}
	st := e2e.Stats(t, ctx, tc.node)
	mustRawSend(t, tc.sender, "eth0", hRepeat, tc.frames...)
	mustRawSend(t, tc.sender, "eth0", 1, tc.marker)
	markSink := tc.markSink
	if markSink == nil {
		markSink = tc.sink
	}
	got, err := receiveUntil(markSink, "marker", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if markSink != tc.sink {
		// The marker crossed the same softirq after the frames: whatever of
		// them got through is queued already.
		more, err := queued(tc.sink)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, more...)
	}
	for _, d := range got {
		t.Errorf("%s received %q from %s", tc.name, d.payload, d.from)
	}
	want := uint64(hRepeat * len(tc.frames))
	if d := e2e.Delta(st, e2e.Stats(t, ctx, tc.node), tc.counter).Packets; d < want {
		t.Errorf("%s on %s grew by %d, want at least %d", tc.counter, tc.node.NetNS, d, want)
	}
	if tc.state != nil {
		if after := tc.state(t); after != before {
			t.Errorf("node state changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	}
}

// nodeState runs a command in a node and returns its output, for
// before/after comparisons.
func nodeState(ctx context.Context, n *lab.Node, cmds ...[]string) func(*testing.T) string {
	return func(t *testing.T) string {
		var sb strings.Builder
		for _, c := range cmds {
			out, err := n.Exec(ctx, c[0], c[1:]...)
			if err != nil {
				t.Fatalf("%s on %s: %v\n%s", strings.Join(c, " "), n.NetNS, err, out)
			}
			sb.Write(out)
		}
		return sb.String()
	}
}

// TestPodFrames: VLAN tags, IPv6, router advertisements and ARP in
// another pod's name, sent raw from pod a, reach nothing and are counted.
func TestPodFrames(t *testing.T) {
	ctx := e2e.Ctx(t)
	h := newHostileLab(t, ctx)
	toNode := h.fromA(h.a.IP, h.n1.IP, hSinkPort, "marker")
	ipv6 := func(next, hops uint8, src, dst netip.Addr, l4 []byte, csum int) []byte {
		l2 := h.aGW
		if dst.IsMulticast() {
			l2 = hAllNodesL2
		}
		return rawEth(l2, h.aMAC, rawEthIPv6, rawIPv6(next, hops, src, dst, l4, csum))
	}
	// What an RA configures: global addresses and main-table routes (not
	// link-local addresses, whose DAD may finish meanwhile).
	v6state := nodeState(ctx, h.n1, []string{"ip", "-6", "addr", "show", "scope", "global"}, []string{"ip", "-6", "route", "show"})
	neigh := nodeState(ctx, h.n1, []string{"ip", "neigh", "show", "to", h.b.IP.String()})
	forged := h.fromA(hForged, h.n1.IP, hSinkPort, "forged behind two VID-0 tags")
	cases := []hostileCase{
		{name: "802.1ad+802.1Q VID 0, forged source, to the node",
			frames: [][]byte{rawEth(h.aGW, h.aMAC, rawEthQinQ, rawTag(0, rawEth8021Q, rawTag(0, rawEthIPv4, forged[14:])))},
			sink:   h.node4, marker: toNode, counter: "drop_vlan"},
		{name: "802.1Q VID 100, own source, to a remote pod",
			frames: [][]byte{rawEth(h.aGW, h.aMAC, rawEth8021Q, rawTag(100, rawEthIPv4, h.fromA(h.a.IP, h.r.IP, hPodPort, "tagged")[14:]))},
			sink:   h.podR, marker: h.fromA(h.a.IP, h.r.IP, hPodPort, "marker"), counter: "drop_vlan"},
		{name: "IPv6 from a forged source to the node's link-local address",
			frames: [][]byte{ipv6(17, 64, netip.MustParseAddr("fe80::bad"), h.aGW6, rawUDP(40000, hSinkPort, []byte("forged ipv6")), 6)},
			sink:   h.node6, marker: toNode, markSink: h.node4, counter: "drop_ipv6"},
		{name: "router advertisement",
			frames: [][]byte{ipv6(58, 255, netip.MustParseAddr("fe80::bad"), hAllNodes, rawRA(netip.MustParsePrefix("2001:db8:bad::/64")), 2)},
			sink:   h.node6, marker: toNode, markSink: h.node4, counter: "drop_ipv6", state: v6state},
		{name: "gratuitous ARP for another pod",
			frames: [][]byte{rawEth(hBroadcast, h.aMAC, rawEthARP, rawARP(1, h.aMAC, h.b.IP, make(net.HardwareAddr, 6), h.b.IP))},
			sink:   h.node4, marker: toNode, counter: "drop_spoofed", state: neigh},
		{name: "ARP reply in another pod's name",
			frames: [][]byte{rawEth(h.aGW, h.aMAC, rawEthARP, rawARP(2, h.aMAC, h.b.IP, h.aGW, netip.MustParseAddr("169.254.1.1")))},
			sink:   h.node4, marker: toNode, counter: "drop_spoofed", state: neigh},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.sender, tc.node = h.a.NSPath, h.n1
			runHostileCase(t, ctx, tc)
		})
	}
}

// TestForgedVXLAN: node 2, a known node, sends VXLAN to node 1 whose
// inner source is one of node 3's pods or one of node 1's own: pod a
// receives none of it, and node 1 counts it as drop_inner_spoofed. The
// marker, from node 2's own pod, is decapsulated.
func TestForgedVXLAN(t *testing.T) {
	ctx := e2e.Ctx(t)
	h := newHostileLab(t, ctx)
	for _, tt := range []struct {
		name string
		src  netip.Addr
	}{
		{"inner source of node 3", hNode3Pod},
		{"inner source of a local pod", h.b.IP},
		{"inner source outside the cluster", netip.MustParseAddr("192.0.2.1")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			runHostileCase(t, ctx, hostileCase{
				name: tt.name, sender: h.n2.NSPath, node: h.n1, counter: "drop_inner_spoofed",
				frames: [][]byte{h.vxlanFromN2(t, tt.src, "forged vxlan")},
				sink:   h.podA, marker: h.vxlanFromN2(t, h.r.IP, "marker"),
			})
		})
	}
}

// hSuppressed is the whole line `monitor -o json` prints for drop events
// the datapath's rate limit held back (events.Suppressed in cmd/patchcord's
// monitor: {"suppressed": N}, N > 0, nothing else on the line).
var hSuppressed = regexp.MustCompile(`^\{"suppressed":([1-9][0-9]*)\}$`)

// suppressedReports sums the monitor's suppressed reports in out; a line
// that mentions suppression in any other shape fails the test.
func suppressedReports(t *testing.T, out []byte) (reports int, total uint64) {
	t.Helper()
	for _, line := range strings.Split(string(out), "\n") {
		m := hSuppressed.FindStringSubmatch(line)
		if m == nil {
			if strings.HasPrefix(line, "{") && strings.Contains(line, "suppressed") {
				t.Errorf("monitor line %q: want exactly {\"suppressed\":N}", line)
			}
			continue
		}
		n, err := strconv.ParseUint(m[1], 10, 64)
		if err != nil {
			t.Fatalf("monitor line %q: %v", line, err)
		}
		reports, total = reports+1, total+n
	}
	return reports, total
}

// TestFloodMonitor: pod a floods 200k frames from a forged source
// while `patchcord monitor` runs; midway pod b sends VLAN-tagged frames.
// The monitor still shows b's drops, reports that it held back events, and
// the node counts every forged frame.
func TestFloodMonitor(t *testing.T) {
	ctx := e2e.Ctx(t)
	h := newHostileLab(t, ctx)
	bEP := e2e.Endpoints(t, ctx, h.n1)[h.b.IP.String()]
	bMAC, bGW := linkMAC(t, h.b.NSPath, "eth0"), mustParseMAC(t, bEP.HostMAC)
	spoofed := h.fromA(hForged, h.b.IP, hPodPort, "flood")
	tagged := rawEth(bGW, bMAC, rawEth8021Q, rawTag(7, rawEthIPv4, rawIPv4(17, h.b.IP, h.n1.IP, rawUDP(1, 2, []byte("b")))))

	before := e2e.Stats(t, ctx, h.n1)
	mon := e2e.StartMonitor(t, ctx, h.n1, "--type", "drop", "-o", "json")
	const chunks, perChunk = 4, 50000
	start := time.Now()
	sent := 0
	for i := range chunks {
		n, err := rawSend(h.a.NSPath, "eth0", [][]byte{spoofed}, perChunk)
		if err != nil {
			t.Fatal(err)
		}
		sent += n
		if i == chunks/2-1 {
			mustRawSend(t, h.b.NSPath, "eth0", 10, tagged)
		}
	}
	elapsed := time.Since(start)
	after := e2e.Stats(t, ctx, h.n1)
	if err := mon.Stop(); err != nil {
		t.Logf("monitor stop: %v", err)
	}
	out, _ := mon.Output()

	spoofedDrops := e2e.Delta(before, after, "drop_spoofed").Packets
	t.Logf("flood: %d frames sent in %s (%.0f frames/s, %.2f µs each); drop_spoofed +%d, events_suppressed +%d, events_lost +%d",
		sent, elapsed, float64(sent)/elapsed.Seconds(), elapsed.Seconds()*1e6/float64(sent), spoofedDrops,
		e2e.Delta(before, after, "events_suppressed").Packets, e2e.Delta(before, after, "events_lost").Packets)
	if spoofedDrops < uint64(sent) {
		t.Errorf("drop_spoofed grew by %d for %d forged frames sent", spoofedDrops, sent)
	}
	if e2e.Delta(before, after, "events_suppressed").Packets == 0 {
		t.Errorf("events_suppressed did not grow during a flood of %d drops", sent)
	}
	var vlanShown, spoofShown int
	for _, ev := range e2e.ParseEvents(t, out) {
		switch {
		case ev.Reason == "drop_vlan" && ev.Ifname == bEP.Ifname:
			vlanShown++
		case ev.Reason == "drop_spoofed":
			spoofShown++
		}
	}
	if vlanShown == 0 {
		t.Errorf("monitor showed none of pod b's 10 drop_vlan events during the flood (and %d drop_spoofed)", spoofShown)
	}
	// The monitor reports what the counter gained since it started (the
	// last report when it stops), so it never reports more than that.
	reports, reported := suppressedReports(t, out)
	t.Logf("monitor: %d drop_spoofed and %d drop_vlan events shown, %d suppressed reports totalling %d", spoofShown, vlanShown, reports, reported)
	if suppressed := e2e.Delta(before, after, "events_suppressed").Packets; reports == 0 || reported > suppressed {
		t.Errorf("monitor reported %d suppressed events in %d lines, want 1..%d (events_suppressed grew by that)", reported, reports, suppressed)
	}
}

func mustParseMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	mac, err := net.ParseMAC(s)
	if err != nil {
		t.Fatalf("MAC %q: %v", s, err)
	}
	return mac
}
