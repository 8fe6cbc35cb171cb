package crossnode

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/views"
)

// routerASN is the top-of-rack's AS; node i is AS 64600+i, as with an AS
// per rack (eBGP, so the router passes each node's route to the others
// with itself as the next hop).
const routerASN = 65000

// fabricSubnet is node i's subnet behind the router: 198.18.i.0/24, the
// router at .254.
func fabricSubnet(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i), 0}), 24)
}

func routerIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, byte(i), 254}) }

// routedFabric renumbers the mesh's nodes into subnets, node n into
// 198.18.subnet(n).0/24, behind a router namespace (the top-of-rack) that
// holds .254 of each: nodes of different subnets reach each other only
// through it.
func routedFabric(t *testing.T, ctx context.Context, c *e2e.Mesh, subnet func(*lab.Node) int) *lab.Node {
	t.Helper()
	router, err := c.Lab.AddNode(200)
	if err != nil {
		t.Fatal(err)
	}
	// One L2 segment carries every subnet; the router must not tell the
	// nodes (ICMP redirects) that they could talk directly.
	run(t, ctx, router, "ip", "addr", "flush", "dev", "eth0")
	run(t, ctx, router, "sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0")
	routed := map[int]bool{}
	for _, n := range c.Nodes {
		i := subnet(n)
		if !routed[i] {
			run(t, ctx, router, "ip", "addr", "add", netip.PrefixFrom(routerIP(i), 24).String(), "dev", "eth0")
			routed[i] = true
		}
		ip := netip.AddrFrom4([4]byte{198, 18, byte(i), byte(n.Index)})
		run(t, ctx, n, "ip", "addr", "flush", "dev", "eth0")
		run(t, ctx, n, "ip", "addr", "add", netip.PrefixFrom(ip, 24).String(), "dev", "eth0")
		run(t, ctx, n, "ip", "route", "add", "default", "via", routerIP(i).String())
		n.IP = ip
	}
	return router
}

func run(t *testing.T, ctx context.Context, e e2e.Execer, args ...string) {
	t.Helper()
	if out, err := e.Exec(ctx, args[0], args[1:]...); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// startBIRD runs BIRD on the router as the top-of-rack: an eBGP session
// with every node (node i is AS 64600+i), passing each node's routes to
// the others with itself as the next hop.
func startBIRD(t *testing.T, ctx context.Context, c *e2e.Mesh, router *lab.Node) {
	t.Helper()
	if _, err := os.Stat("/usr/sbin/bird"); err != nil {
		t.Fatalf("needs BIRD (Debian's bird2, make deps installs it): %v", err)
	}
	var protocols strings.Builder
	for _, n := range c.Nodes {
		fmt.Fprintf(&protocols, "protocol bgp n%d from nodes { neighbor %s as %d; }\n", n.Index, n.IP, 64600+n.Index)
	}
	dir := filepath.Join(c.Lab.Dir, "bird")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "bird.conf")
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`router id %s;
log stderr all;
protocol device { }
protocol kernel { ipv4 { import none; export all; }; }
template bgp nodes {
	local as %d;
	passive on;
	hold time 9;
	graceful restart on;
	# One L2 segment carries every subnet: without it BIRD passes the
	# nodes their peers' own addresses as next hops (third-party).
	ipv4 { import all; export all; next hop self; };
}
# A hostile or misconfigured announcement: part of node 1's pod CIDR.
protocol static hijack { ipv4; route %s blackhole; }
%s`, routerIP(1), routerASN, hijack(c.Nodes[0]), protocols.String())), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := router.Start(ctx, "bird", "-f", "-c", conf, "-s", filepath.Join(dir, "bird.ctl"), "-P", filepath.Join(dir, "bird.pid")); err != nil {
		t.Fatal(err)
	}
	if err := router.WaitListening(ctx, 179); err != nil {
		t.Fatalf("bird: %v", err)
	}
}

// hijack is the upper half of n's pod CIDR (its pods are in the lower),
// which the router announces to everyone.
func hijack(n *lab.Node) netip.Prefix {
	a := n.PodCIDR.Addr().As4()
	a[3] = 128
	return netip.PrefixFrom(netip.AddrFrom4(a), 25)
}

// startBGPAgents starts every node's agent in native mode, peered with the
// router, with a nodes file that names the node itself only: every other
// node is known through BGP.
func startBGPAgents(t *testing.T, ctx context.Context, c *e2e.Mesh, restart time.Duration) {
	t.Helper()
	for _, n := range c.Nodes {
		e2e.WriteNodes(t, c.Files[n.Index], e2e.EntryOf(n))
		c.Agents[n.Index] = e2e.StartAgent(t, ctx, n, c.Files[n.Index], bgpArgs(n, restart)...)
	}
}

func bgpArgs(n *lab.Node, restart time.Duration) []string {
	return []string{"--routing", "native", "--bgp-asn", fmt.Sprint(64600 + n.Index),
		"--bgp-neighbor", fmt.Sprintf("%s,%d", routerIP(n.Index), routerASN), "--bgp-restart-time", restart.String()}
}

// bgpRoute is n's route of ours to cidr ("" when there is none).
func bgpRoute(ctx context.Context, n *lab.Node, cidr netip.Prefix) string {
	out, err := n.Exec(ctx, "ip", "-4", "route", "show", "exact", cidr.String(), "proto", "161")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

func waitBGPRoute(t *testing.T, ctx context.Context, n *lab.Node, cidr netip.Prefix, want bool) {
	t.Helper()
	err := lab.WaitFor(ctx, fmt.Sprintf("%s: route to %s present=%v", n.NetNS, cidr, want), func(context.Context) error {
		if got := bgpRoute(ctx, n, cidr); (got != "") != want {
			return fmt.Errorf("route %q", got)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// routerCounter counts, in the router's iptables, the packets from src to
// dst it forwards, with match (iptables options) if given. For two pods'
// addresses: their own packets, no tunnel around them.
func routerCounter(t *testing.T, ctx context.Context, router *lab.Node, src, dst netip.Addr, match ...string) func() int {
	t.Helper()
	rule := append([]string{"FORWARD", "-s", src.String(), "-d", dst.String()}, append(match, "-j", "ACCEPT")...)
	if out, err := router.Exec(ctx, "iptables", append([]string{"-w", "-I"}, rule...)...); err != nil {
		t.Fatalf("iptables: %v\n%s", err, out)
	}
	return func() int {
		out, err := router.Exec(ctx, "iptables", "-w", "-L", "FORWARD", "-v", "-n", "-x")
		if err != nil {
			t.Fatalf("iptables -L: %v\n%s", err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			if len(f) >= 9 && f[7] == src.String() && f[8] == dst.String() {
				var n int
				fmt.Sscan(f[0], &n)
				return n
			}
		}
		t.Fatalf("no counter for %s -> %s in\n%s", src, dst, out)
		return 0
	}
}

// TestBGPRoutedFabric: two nodes in different subnets behind a router that
// speaks BGP (BIRD, as a top-of-rack would). Each agent announces its pod
// CIDR and learns the other's; pods reach each other unencapsulated through
// the router; an agent killed under load withdraws nothing and loses no
// datagram; a node gone for good takes its route with it once graceful
// restart's time is up.
func TestBGPRoutedFabric(t *testing.T) {
	c := e2e.NewMesh(t, 1, 2)
	ctx := e2e.Ctx(t)
	router := routedFabric(t, ctx, c, func(n *lab.Node) int { return n.Index })
	startBIRD(t, ctx, c, router)
	const restart = 6 * time.Second
	startBGPAgents(t, ctx, c, restart)
	c.AddPods(t, ctx, 1)
	n1, n2, p1, p2 := c.Nodes[0], c.Nodes[1], c.Pod(1, 0), c.Pod(2, 0)

	// Routes appear: each node routes the other's pod CIDR via the router.
	waitBGPRoute(t, ctx, n1, n2.PodCIDR, true)
	waitBGPRoute(t, ctx, n2, n1.PodCIDR, true)
	if r := bgpRoute(ctx, n1, n2.PodCIDR); !strings.Contains(r, "via "+routerIP(1).String()) {
		t.Errorf("%s: route %q, want via the router %s", n1.NetNS, r, routerIP(1))
	}
	e2e.WaitNodeList(t, ctx, n1, "the BGP-learned node", func(m map[string]string) bool {
		return m[n2.PodCIDR.String()] == routerIP(1).String()
	})
	wantBGPStatus(t, ctx, n1, views.BGPNeighbor{Neighbor: routerIP(1).String(), ASN: fmt.Sprint(routerASN), Established: true, Routes: 2})
	// Part of n1's pod CIDR, announced by the router: n2 takes it (it is
	// no pod CIDR of its own), n1 must not, or its pods' traffic would
	// leave for the router.
	waitBGPRoute(t, ctx, n2, hijack(n1), true)
	if r := bgpRoute(ctx, n1, hijack(n1)); r != "" {
		t.Errorf("%s routes part of its own pod CIDR as BGP says: %s", n1.NetNS, r)
	}
	e2e.WaitNodeList(t, ctx, n1, "no node for part of its own pod CIDR", func(m map[string]string) bool {
		_, ok := m[hijack(n1).String()]
		return !ok
	})

	there, back := routerCounter(t, ctx, router, p1.IP, p2.IP), routerCounter(t, ctx, router, p2.IP, p1.IP)
	b1, b2 := e2e.Stats(t, ctx, n1), e2e.Stats(t, ctx, n2)
	e2e.PingMesh(t, ctx, []*lab.Pod{p1, p2}, 3)
	e2e.IperfServer(t, ctx, p2, 5201)
	r := e2e.IperfRun(t, ctx, p1, p2.IP.String(), 5201, "-t", "1")
	t.Logf("tcp across the routed fabric: %.2f Gbit/s", r.Gbps())
	if r.End.SumReceived.Bytes < 1<<20 {
		t.Errorf("tcp: %d bytes received, want >= 1 MiB", r.End.SumReceived.Bytes)
	}
	// On the wire: the router forwarded the pods' own packets.
	if a, b := there(), back(); a < 100 || b < 3 {
		t.Errorf("router forwarded %d packets %s->%s and %d back, want >= 100 and >= 3 unencapsulated", a, p1.IP, p2.IP, b)
	}
	a1, a2 := e2e.Stats(t, ctx, n1), e2e.Stats(t, ctx, n2)
	for _, d := range []struct {
		n             *lab.Node
		before, after map[string]e2e.Counter
	}{{n1, b1, a1}, {n2, b2, a2}} {
		if out := e2e.Delta(d.before, d.after, "native_out"); out.Packets < 3 {
			t.Errorf("%s: native_out %d packets, want >= 3", d.n.NetNS, out.Packets)
		}
		if enc := e2e.Delta(d.before, d.after, "encap"); enc.Packets != 0 {
			t.Errorf("%s: %d packets encapsulated on a routed fabric", d.n.NetNS, enc.Packets)
		}
	}

	// kill -9 under load: the routes on both sides stay, every datagram
	// arrives, and the restarted agent takes its sessions up again.
	flows := e2e.NewFlows()
	flows.UDP(t, "udp", p1, p2, 5301)
	flows.WaitProgress(t, ctx, 300)
	watch := watchRoutes(ctx, map[*lab.Node]netip.Prefix{n1: n2.PodCIDR, n2: n1.PodCIDR})
	if err := c.Agents[1].Kill(); err != nil {
		t.Fatalf("kill agent: %v", err)
	}
	flows.WaitProgress(t, ctx, 200) // with no agent on n1
	c.Agents[1] = e2e.StartAgent(t, ctx, n1, c.Files[1], bgpArgs(n1, restart)...)
	flows.WaitProgress(t, ctx, 300)
	flows.Finish(t, "across the agent's kill and restart")
	if gaps := watch(); len(gaps) != 0 {
		t.Errorf("routes withdrawn across the restart, seen by %d polls of 20 ms; first: %s", len(gaps), gaps[0])
	}
	e2e.Ping(t, ctx, p1, p2.IP.String())

	// A node gone for good: its agent is not back within the restart
	// time, the router withdraws its route, and n1 forgets it.
	if err := c.Agents[2].Kill(); err != nil {
		t.Fatalf("kill agent: %v", err)
	}
	gone, cancel := context.WithTimeout(ctx, restart+20*time.Second)
	defer cancel()
	waitBGPRoute(t, gone, n1, n2.PodCIDR, false)
	e2e.WaitNodeList(t, ctx, n1, "the gone node removed", func(m map[string]string) bool {
		_, ok := m[n2.PodCIDR.String()]
		return !ok
	})
}

// wantBGPStatus: `patchcord status -o json` on n shows exactly the one
// session, as want says (routes: what the router passes on).
func wantBGPStatus(t *testing.T, ctx context.Context, n *lab.Node, want views.BGPNeighbor) {
	t.Helper()
	out, err := n.CLI(ctx, "status", "-o", "json")
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	var v views.Status
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if len(v.BGP) != 1 || v.BGP[0] != want {
		t.Errorf("%s: status bgp %+v, want [%+v]", n.NetNS, v.BGP, want)
	}
}

// watchRoutes polls every 20 ms that each node keeps its route to the pod
// CIDR, until the returned function is called, which reports the gaps.
func watchRoutes(ctx context.Context, want map[*lab.Node]netip.Prefix) func() []string {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan []string)
	go func() {
		var gaps []string
		for {
			for n, cidr := range want {
				if bgpRoute(ctx, n, cidr) == "" && ctx.Err() == nil {
					gaps = append(gaps, fmt.Sprintf("%s lost %s at %s", n.NetNS, cidr, time.Now().Format("15:04:05.000")))
				}
			}
			select {
			case <-ctx.Done():
				done <- gaps
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() []string {
		cancel()
		return <-done
	}
}

// TestBGPFullMesh: nodes on one subnet peer with each other, no router:
// each learns the other's pod CIDR with the node itself as next hop.
func TestBGPFullMesh(t *testing.T) {
	c := e2e.NewMesh(t, 1, 2)
	ctx := e2e.Ctx(t)
	n1, n2 := c.Nodes[0], c.Nodes[1]
	// Together, as a DaemonSet starts them: each agent's first node sync
	// waits for its neighbours' End-of-RIB.
	peers := []*lab.Node{n2, n1}
	for _, n := range c.Nodes {
		e2e.WriteNodes(t, c.Files[n.Index], e2e.EntryOf(n))
	}
	procs := make([]*lab.Process, 2)
	e2e.InParallel(t, 2, func(i int) (err error) {
		n, peer := c.Nodes[i], peers[i]
		procs[i], err = e2e.Launch(ctx, n, "agent", e2e.ReadyFile(n), 30*time.Second, e2e.AgentArgs(n, c.Files[n.Index], "--routing", "native",
			"--bgp-asn", fmt.Sprint(64600+n.Index), "--bgp-neighbor", fmt.Sprintf("%s,%d", peer.IP, 64600+peer.Index))...)
		return err
	})
	for i, n := range c.Nodes {
		c.Agents[n.Index] = procs[i]
	}
	c.AddPods(t, ctx, 1)
	waitBGPRoute(t, ctx, n1, n2.PodCIDR, true)
	waitBGPRoute(t, ctx, n2, n1.PodCIDR, true)
	if r := bgpRoute(ctx, n1, n2.PodCIDR); !strings.Contains(r, "via "+n2.IP.String()) {
		t.Errorf("%s: route %q, want via the node %s", n1.NetNS, r, n2.IP)
	}
	before := e2e.Stats(t, ctx, n1)
	e2e.PingMesh(t, ctx, []*lab.Pod{c.Pod(1, 0), c.Pod(2, 0)}, 3)
	if out := e2e.Delta(before, e2e.Stats(t, ctx, n1), "native_out"); out.Packets < 3 {
		t.Errorf("native_out %d packets, want >= 3", out.Packets)
	}
}
