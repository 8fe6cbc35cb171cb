// The datapath's own cost: nanoseconds per packet for each path of each
// program, measured with BPF_PROG_RUN (see bpfMethod for how).
//
// BPF_PROG_RUN with Repeat runs the program again and again on the same
// skb, so a path that rewrites the packet (redirect, encap, decap) would see
// its own output from the second run on: a redirected frame fails
// anti-spoofing, a decapsulated one passes through. Redirect and decap are
// looped on maps arranged so that the output takes the same path again, and
// every loop is checked by the path's counter moving once per run. Encap
// cannot be looped (the kernel refuses to encapsulate an skb twice); it has
// only the cold figure, one packet per call.
package main

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// BPFResults is the BPF group's part of the JSON.
type BPFResults = GroupResults[BPFSample, BPFSummary]

// BPFSample is one path measured in one round with one map state, in ns.
type BPFSample struct {
	Maps    string `json:"maps"`
	Program string `json:"program"`
	Path    string `json:"path"`
	Round   int    `json:"round"`
	// SteadyNs is the cost per packet when the program runs back to back
	// on one skb (see bpfMethod).
	SteadyNs float64 `json:"steadyNs,omitempty"`
	// ColdNs is the cost of one packet per BPF_PROG_RUN call: the median
	// kernel timing of the path (ColdRawNs) less the empty program's
	// (ColdEmptyNs).
	ColdNs      float64 `json:"coldNs"`
	ColdRawNs   float64 `json:"coldRawNs"`
	ColdEmptyNs float64 `json:"coldEmptyNs"`
}

// BPFSummary is one path over all rounds.
type BPFSummary struct {
	Maps    string `json:"maps"`
	Program string `json:"program"`
	Path    string `json:"path"`
	Verdict string `json:"verdict"`
	Counter string `json:"counter,omitempty"`
	// SteadyNs is absent for encap, which cannot run back to back on one
	// skb: the kernel refuses to encapsulate an skb twice (-EALREADY).
	SteadyNs *float64 `json:"steadyNs,omitempty"`
	Min      float64  `json:"steadyMinNs,omitempty"`
	Max      float64  `json:"steadyMaxNs,omitempty"`
	ColdNs   float64  `json:"coldNs"`
}

const bpfMethod = "BPF_PROG_RUN on a datapath loaded on a lab node's private bpffs and never attached, run inside that node's namespace. " +
	"**Steady** (the target's figure): the program runs Repeat times on one skb, for two Repeat counts; " +
	"(time of the larger minus time of the smaller, less the same difference for an empty tc program) / (difference of the counts), " +
	"median over pairs of calls: that cancels the clock reads, the test loop and the cold first run. A path that rewrites the packet " +
	"runs on maps arranged so that its output takes the same path again (local redirect: the destination's MACs mirror the " +
	"sender's, TTL 255; decap: VXLAN nested 30 deep, every layer addressed to the node), checked by its counter moving once per run. " +
	"Encap cannot loop: the kernel refuses to encapsulate an skb twice (-EALREADY). " +
	"**Cold**: one packet per call on realistic maps, median kernel timing less the empty program's, calls interleaved; caches and " +
	"branch predictors are cold after each syscall, so this bounds the steady cost from above. " +
	"UDP paths include the NAT check (bpf_skb_ct_lookup on every datagram); TCP paths take the verdict recorded for their connection (one LRU hash probe: " +
	"the first call records it, every later one finds it); the ICMP local redirect shows the path without any. Decap TCP is cold only: nested VXLAN is UDP. " +
	"Drop paths run with the events ring buffer full, as on a node where no monitor reads it."

// The node the packets are made for: node 1 of the lab's address plan with
// node 2 as its peer, as in the datapath's own tests. They are never sent.
var (
	bNodeIP    = netip.MustParseAddr("198.18.0.1")
	bUplinkMAC = mustMAC("02:00:c6:12:00:01")
	bPeerIP    = netip.MustParseAddr("198.18.0.2")
	bPeerMAC   = mustMAC("02:00:c6:12:00:02")
	bPeerCIDR  = netip.MustParsePrefix("10.244.2.0/24")
	bPeerPod   = netip.MustParseAddr("10.244.2.7")
	bStranger  = netip.MustParseAddr("198.18.0.99")
	bOutside   = netip.MustParseAddr("192.0.2.10")
	bSpoofed   = netip.MustParseAddr("10.244.1.99")

	// bPodA sends in the from_pod cases: BPF_PROG_RUN runs packets on lo,
	// ifindex 1, so that is its veth. bPodB receives redirects and decaps.
	bPodA = bpfmaps.EndpointInfo{IP: netip.MustParseAddr("10.244.1.5"), Ifindex: 1,
		MAC: mustMAC("02:00:0a:f4:01:05"), HostMAC: mustMAC("ee:ee:00:00:00:01"), Ifname: "lo"}
	bPodB = bpfmaps.EndpointInfo{IP: netip.MustParseAddr("10.244.1.6"), Ifindex: 42,
		MAC: mustMAC("02:00:0a:f4:01:06"), HostMAC: mustMAC("ee:ee:00:00:00:2a"), Ifname: "bench42"}

	// On the self-feeding maps bPodB's MACs mirror bPodA's, so that a frame
	// redirected from bPodA to bPodB is again one from bPodA to bPodB. And
	// VXLAN nested in VXLAN decapsulates the same way layer after layer: the
	// node's tunnel address is also bPodA's, so each inner packet is for a
	// local endpoint, and the peer's lies in its own pod CIDR, so each inner
	// packet comes from a remote pod (what decap hands to pods directly).
	fNodeIP = bPodA.IP
	fPeerIP = netip.MustParseAddr("10.244.2.1")
	fPodB   = bpfmaps.EndpointInfo{IP: bPodB.IP, Ifindex: 42, MAC: bPodA.HostMAC, HostMAC: bPodA.MAC, Ifname: "bench42"}
)

// tc verdicts.
const (
	tcActOK       = 0
	tcActShot     = 2
	tcActRedirect = 7
)

func verdictName(v uint32) string {
	switch v {
	case tcActOK:
		return "TC_ACT_OK"
	case tcActShot:
		return "TC_ACT_SHOT"
	case tcActRedirect:
		return "TC_ACT_REDIRECT"
	}
	return fmt.Sprint(v)
}

// bpfPath is one path through one program: the packets that take it, and
// how the program must answer, so that we time the path we name.
type bpfPath struct {
	Program, Path string
	// Packet takes the path on the plain maps, once per call.
	Packet  []byte
	Verdict uint32
	Counter string // the one counter that must move; "" for none
	// Loop takes the path run after run on one skb, on the self-feeding
	// maps if Feeds, else on the plain ones; N1 < N2 are the Repeat counts.
	Loop   []byte
	Feeds  bool
	N1, N2 int
}

func fromPodUDP(src, dst netip.Addr, ttl uint8) []byte {
	return ethernet(bPodA.HostMAC, bPodA.MAC, ipv4(src, dst, ipProtoUDP, ttl, 0, udp(40000, 5201, payload64), true))
}

func fromPodTCP(src, dst netip.Addr, ttl uint8) []byte {
	return ethernet(bPodA.HostMAC, bPodA.MAC, ipv4(src, dst, ipProtoTCP, ttl, ipDF, tcpACK(40000, 5201, payload64), true))
}

func fromPodICMP(src, dst netip.Addr, ttl uint8) []byte {
	return ethernet(bPodA.HostMAC, bPodA.MAC, ipv4(src, dst, ipProtoICMP, ttl, 0, icmpEcho(payload64), false))
}

// tunnel is VXLAN from src to dst, layers deep, around a UDP packet from a
// pod on node 2 to bPodB; a patchcord peer leaves the inner destination MAC
// zero. Every layer but the innermost is addressed to dst itself.
func tunnel(src, dst netip.Addr, layers int) []byte {
	return tunnelOf(ipv4(bPeerPod, bPodB.IP, ipProtoUDP, 63, 0, udp(40000, 5201, payload64), true), src, dst, layers)
}

// tunnelTCP is tunnel's one layer around a TCP segment.
func tunnelTCP(src, dst netip.Addr) []byte {
	return tunnelOf(ipv4(bPeerPod, bPodB.IP, ipProtoTCP, 63, ipDF, tcpACK(40000, 5201, payload64), true), src, dst, 1)
}

// tunnelOf is tunnel around any inner IPv4 packet.
func tunnelOf(pkt []byte, src, dst netip.Addr, layers int) []byte {
	for range layers {
		inner := ethernet(nil, bPeerMAC, pkt)
		pkt = ipv4(src, dst, ipProtoUDP, 64, ipDF, udp(51234, 4789, vxlan(1, inner)), false)
	}
	return ethernet(bUplinkMAC, bPeerMAC, pkt)
}

func fromHost(src, dst netip.Addr, proto uint8, seg []byte) []byte {
	return ethernet(bPeerMAC, bUplinkMAC, ipv4(src, dst, proto, 64, ipDF, seg, true))
}

func bpfPaths() []bpfPath {
	kubelet := tcpACK(41000, 10250, []byte("GET /healthz HTTP/1.1\r\n\r\n"))
	unchanged := func(p bpfPath) bpfPath {
		p.Loop, p.N1, p.N2 = p.Packet, 100, 1000
		return p
	}
	return []bpfPath{
		{Program: datapath.FromPod, Path: "local redirect (UDP)", Packet: fromPodUDP(bPodA.IP, bPodB.IP, 64),
			Verdict: tcActRedirect, Counter: "local_redirect",
			Loop: fromPodUDP(bPodA.IP, bPodB.IP, 255), Feeds: true, N1: 25, N2: 250},
		{Program: datapath.FromPod, Path: "local redirect (TCP, NAT verdict recorded)", Packet: fromPodTCP(bPodA.IP, bPodB.IP, 64),
			Verdict: tcActRedirect, Counter: "local_redirect",
			Loop: fromPodTCP(bPodA.IP, bPodB.IP, 255), Feeds: true, N1: 25, N2: 250},
		{Program: datapath.FromPod, Path: "local redirect (ICMP: no NAT check)", Packet: fromPodICMP(bPodA.IP, bPodB.IP, 64),
			Verdict: tcActRedirect, Counter: "local_redirect",
			Loop: fromPodICMP(bPodA.IP, bPodB.IP, 255), Feeds: true, N1: 25, N2: 250},
		{Program: datapath.FromPod, Path: "encap (UDP)", Packet: fromPodUDP(bPodA.IP, bPeerPod, 64),
			Verdict: tcActRedirect, Counter: "encap",
		},
		unchanged(bpfPath{Program: datapath.FromPod, Path: "to host (UDP, outside)", Packet: fromPodUDP(bPodA.IP, bOutside, 64),
			Verdict: tcActOK, Counter: "to_host"}),
		unchanged(bpfPath{Program: datapath.FromPod, Path: "drop (spoofed source)", Packet: fromPodUDP(bSpoofed, bPodB.IP, 64),
			Verdict: tcActShot, Counter: "drop_spoofed"}),
		{Program: datapath.FromUplink, Path: "decap (UDP)", Packet: tunnel(bPeerIP, bNodeIP, 1),
			Verdict: tcActRedirect, Counter: "decap",
			Loop: tunnel(fPeerIP, fNodeIP, 30), Feeds: true, N1: 3, N2: 30},
		// Nested VXLAN is UDP at every layer but the last: a TCP decap has
		// only the cold figure, beside UDP's.
		{Program: datapath.FromUplink, Path: "decap (TCP, NAT verdict recorded)", Packet: tunnelTCP(bPeerIP, bNodeIP),
			Verdict: tcActRedirect, Counter: "decap"},
		unchanged(bpfPath{Program: datapath.FromUplink, Path: "pass-through (TCP to node)",
			Packet:  ethernet(bUplinkMAC, bPeerMAC, ipv4(bPeerIP, bNodeIP, ipProtoTCP, 64, ipDF, kubelet, true)),
			Verdict: tcActOK}),
		unchanged(bpfPath{Program: datapath.FromUplink, Path: "drop (unknown tunnel source)", Packet: tunnel(bStranger, bNodeIP, 1),
			Verdict: tcActShot, Counter: "drop_unknown_tunnel"}),
		{Program: datapath.ToUplink, Path: "encap (UDP, host to pod)", Packet: fromHost(bNodeIP, bPeerPod, ipProtoUDP, udp(40000, 5201, payload64)),
			Verdict: tcActRedirect, Counter: "encap",
		},
		unchanged(bpfPath{Program: datapath.ToUplink, Path: "pass-through (TCP to node)", Packet: fromHost(bNodeIP, bPeerIP, ipProtoTCP, kubelet),
			Verdict: tcActOK}),
	}
}

// Map states the paths are measured with.
const (
	mapsMinimal = "minimal"
	mapsLoaded  = "1k endpoints + 5k nodes"
)

// bpfDatapath is a datapath loaded on a lab node's bpffs and filled with
// one map state, plain or self-feeding. Its programs run inside the node's
// namespace, so that the conntrack lookup sees that namespace's (empty)
// table.
type bpfDatapath struct {
	maps   string
	feeds  bool
	nsPath string
	dp     *datapath.Datapath
}

func openBPFDatapath(n *lab.Node, state string, feeds bool, log *slog.Logger) (*bpfDatapath, error) {
	dp, err := datapath.Open(n.BpffsRoot, log)
	if err != nil {
		return nil, err
	}
	b := &bpfDatapath{maps: state, feeds: feeds, nsPath: n.NSPath, dp: dp}
	if err := b.fill(); err != nil {
		dp.Close()
		return nil, err
	}
	return b, nil
}

func (b *bpfDatapath) fill() error {
	m := &b.dp.Maps
	cfg := bpfmaps.Config{NodeIP: bNodeIP, UplinkIfindex: 7, UplinkMAC: bUplinkMAC, VXLANPort: 4789, VNI: 1, TunnelMTU: 1450}
	eps := []bpfmaps.EndpointInfo{bPodA, bPodB}
	peer := bpfmaps.Node{PodCIDR: bPeerCIDR, NodeIP: bPeerIP}
	if b.feeds {
		cfg.NodeIP, eps[1], peer.NodeIP = fNodeIP, fPodB, fPeerIP
	}
	if err := bpfmaps.NewConfig(m).Put(cfg); err != nil {
		return err
	}
	for _, ep := range eps {
		if err := bpfmaps.NewEndpoints(m).Put(ep); err != nil {
			return err
		}
	}
	if err := bpfmaps.NewNodes(m).Put(peer); err != nil {
		return err
	}
	if b.maps != mapsLoaded {
		return nil
	}
	if _, err := fillOpen(m, scaleEndpoints); err != nil {
		return err
	}
	return fillNodes(m, scaleNodes)
}

// bpfPair is the plain and the self-feeding datapath of one map state.
type bpfPair struct {
	maps         string
	plain, feeds *bpfDatapath
}

func (p *bpfPair) close() {
	p.plain.dp.Close()
	p.feeds.dp.Close()
}

// emptyProgram returns TC_ACT_OK at once: what BPF_PROG_RUN costs around
// any program.
func emptyProgram() (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	})
}

// in runs fn inside the datapath's node namespace.
func (b *bpfDatapath) in(fn func() error) error {
	return ns.WithNetNSPath(b.nsPath, func(ns.NetNS) error { return fn() })
}

// verify checks that every packet takes the path it names: once per call
// on the plain maps, and run after run for the loop packet.
func (p *bpfPair) verify(paths []bpfPath) error {
	for _, path := range paths {
		if err := p.plain.check(path, path.Packet, 1); err != nil {
			return err
		}
		loopOn := p.plain
		if path.Feeds {
			loopOn = p.feeds
		}
		if path.Loop == nil {
			continue
		}
		if err := loopOn.check(path, path.Loop, path.N2); err != nil {
			return err
		}
	}
	return nil
}

// check runs pkt repeat times on one skb and wants the path's verdict and
// its counter, alone, moved by repeat packets. events_lost and
// events_suppressed may move too: on drop paths the events ring buffer fills
// up, and the rate limit on drop events holds most of them back.
func (b *bpfDatapath) check(path bpfPath, pkt []byte, repeat int) error {
	prog, err := b.dp.Program(path.Program)
	if err != nil {
		return err
	}
	stats := bpfmaps.NewStats(&b.dp.Maps)
	return b.in(func() error {
		before, err := stats.Read()
		if err != nil {
			return err
		}
		ret, _, err := prog.Benchmark(pkt, repeat, nil)
		if err != nil {
			return fmt.Errorf("run %s %s: %w", path.Program, path.Path, err)
		}
		after, err := stats.Read()
		if err != nil {
			return err
		}
		moved := map[string]uint64{}
		for name, c := range after {
			if d := c.Packets - before[name].Packets; d != 0 && name != "events_lost" && name != "events_suppressed" {
				moved[name] = d
			}
		}
		want := map[string]uint64{}
		if path.Counter != "" {
			want[path.Counter] = uint64(repeat)
		}
		if ret != path.Verdict || fmt.Sprint(moved) != fmt.Sprint(want) {
			return fmt.Errorf("%s %s (%s maps, self-feeding %t, %d runs): got %s with counters %v, want %s with %v",
				path.Program, path.Path, b.maps, b.feeds, repeat, verdictName(ret), moved, verdictName(path.Verdict), want)
		}
		return nil
	})
}

// measure times every path once for this round: the cold figure on the
// plain maps, the steady one on the maps its loop packet needs.
func (p *bpfPair) measure(paths []bpfPath, empty *ebpf.Program, round, runs int) ([]BPFSample, error) {
	var out []BPFSample
	for _, path := range paths {
		s := BPFSample{Maps: p.maps, Program: path.Program, Path: path.Path, Round: round}
		prog, err := p.plain.dp.Program(path.Program)
		if err != nil {
			return nil, err
		}
		err = p.plain.in(func() (err error) {
			s.ColdRawNs, s.ColdEmptyNs, err = timeCold(prog, empty, path.Packet, runs)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("time %s %s: %w", path.Program, path.Path, err)
		}
		s.ColdNs = s.ColdRawNs - s.ColdEmptyNs
		loopOn := p.plain
		if path.Feeds {
			loopOn = p.feeds
		}
		if path.Loop == nil {
			out = append(out, s)
			continue
		}
		if prog, err = loopOn.dp.Program(path.Program); err != nil {
			return nil, err
		}
		err = loopOn.in(func() (err error) {
			s.SteadyNs, err = timeSteady(prog, empty, path.Loop, path.N1, path.N2, max(runs/10, 1))
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("time %s %s: %w", path.Program, path.Path, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// timeCold alternates single runs of prog and empty on pkt and returns the
// medians of the kernel's timings of each, in ns.
func timeCold(prog, empty *ebpf.Program, pkt []byte, runs int) (progNs, emptyNs float64, err error) {
	p := make([]float64, runs)
	e := make([]float64, runs)
	for i := range runs {
		if e[i], err = totalNs(empty, pkt, 1); err != nil {
			return 0, 0, err
		}
		if p[i], err = totalNs(prog, pkt, 1); err != nil {
			return 0, 0, err
		}
	}
	return median(p), median(e), nil
}

// timeSteady returns prog's cost per run on pkt once warm: the difference
// between n2 and n1 runs on one skb, less the empty program's, over n2-n1;
// the median over pairs of such measurements, interleaved.
func timeSteady(prog, empty *ebpf.Program, pkt []byte, n1, n2, pairs int) (float64, error) {
	d := make([]float64, pairs)
	for i := range d {
		var t [4]float64
		for j, c := range []struct {
			prog *ebpf.Program
			n    int
		}{{prog, n1}, {empty, n1}, {prog, n2}, {empty, n2}} {
			var err error
			if t[j], err = totalNs(c.prog, pkt, c.n); err != nil {
				return 0, err
			}
		}
		d[i] = ((t[2] - t[0]) - (t[3] - t[1])) / float64(n2-n1)
	}
	return median(d), nil
}

// totalNs runs prog repeat times on one skb and returns the kernel's
// timing of all runs. The kernel reports whole ns per run, so the total is
// exact to within repeat ns.
func totalNs(prog *ebpf.Program, pkt []byte, repeat int) (float64, error) {
	_, per, err := prog.Benchmark(pkt, repeat, nil)
	if err != nil {
		return 0, err
	}
	return float64(per.Nanoseconds()) * float64(repeat), nil
}

// summarizeBPF takes medians over rounds per map state and path.
func summarizeBPF(paths []bpfPath, samples []BPFSample) []BPFSummary {
	var out []BPFSummary
	for _, state := range []string{mapsMinimal, mapsLoaded} {
		for _, p := range paths {
			var steady, cold []float64
			for _, s := range samples {
				if s.Maps == state && s.Program == p.Program && s.Path == p.Path {
					steady = append(steady, s.SteadyNs)
					cold = append(cold, s.ColdNs)
				}
			}
			if len(cold) == 0 {
				continue
			}
			sum := BPFSummary{Maps: state, Program: p.Program, Path: p.Path, Verdict: verdictName(p.Verdict),
				Counter: p.Counter, ColdNs: median(cold)}
			if p.Loop != nil {
				v := median(steady)
				sum.SteadyNs, sum.Min, sum.Max = &v, percentile(steady, 0), percentile(steady, 100)
			}
			out = append(out, sum)
		}
	}
	return out
}
