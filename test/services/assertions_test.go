// What the service tests check on the nodes: counters, the fast path's
// redirects, conntrack states and kube-proxy's masquerade chain.
package services

import (
	"context"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// ---- assertions --------------------------------------------------------------------------

// nodeCounters are one node's counters by name.
type nodeCounters map[string]e2e.Counter

func (c *serviceLab) counters(t *testing.T, ctx context.Context) map[int]nodeCounters {
	t.Helper()
	return map[int]nodeCounters{1: e2e.Stats(t, ctx, c.n1), 2: e2e.Stats(t, ctx, c.n2)}
}

// grewOn is after minus before for one counter of one node.
func grewOn(before, after map[int]nodeCounters, node int, name string) e2e.Counter {
	b, a := before[node][name], after[node][name]
	return e2e.Counter{Packets: a.Packets - b.Packets, Bytes: a.Bytes - b.Bytes}
}

// chatterMax bounds what a node's pods send to the host stack by themselves during a
// second of pings (ARP for the gateway; router solicitations and MLD reports in a new
// pod's first seconds), well below the pingCount packets pod-to-pod pings would add to
// to_host if they took the host path.
const (
	chatterMax = 12
	pingCount  = 30
)

// checkRedirect proves that pod-to-pod traffic still takes the fast path: pings
// between c1 and b1 (same node) are redirected, pings between c1 and b2 (across) are
// encapsulated and decapsulated (or routed out and in), and neither goes through the
// host stack.
func (c *serviceLab) checkRedirect(t *testing.T, ctx context.Context) {
	t.Helper()
	const count = pingCount
	before := c.counters(t, ctx)
	for _, dst := range []*lab.Pod{c.b1, c.b2} {
		out, err := c.c1.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", "0.02", "-W", "2", dst.IP.String())
		if err != nil || !strings.Contains(string(out), " 0% packet loss") {
			t.Fatalf("ping %s -> %s: %v\n%s", c.c1.Name, dst.Name, err, out)
		}
	}
	after := c.counters(t, ctx)
	grew := func(node int, name string) uint64 { return grewOn(before, after, node, name).Packets }
	t.Logf("node1: local_redirect +%d %s +%d %s +%d to_host +%d to_host_nat +%d; node2: %s +%d %s +%d to_host +%d to_host_nat +%d",
		grew(1, "local_redirect"), c.out, grew(1, c.out), c.in, grew(1, c.in), grew(1, "to_host"), grew(1, "to_host_nat"),
		c.out, grew(2, c.out), c.in, grew(2, c.in), grew(2, "to_host"), grew(2, "to_host_nat"))
	want := map[string]uint64{"1/local_redirect": 2 * count, "1/" + c.out: count, "1/" + c.in: count, "2/" + c.out: count, "2/" + c.in: count}
	for key, least := range want {
		node, name, _ := strings.Cut(key, "/")
		i, _ := strconv.Atoi(node)
		if got := grew(i, name); got < least {
			t.Errorf("node%d %s grew by %d during %d pings each way, want at least %d", i, name, got, count, least)
		}
	}
	for _, i := range []int{1, 2} {
		if got := grew(i, "to_host"); got > chatterMax {
			t.Errorf("node%d to_host grew by %d during pod-to-pod pings (at most %d expected): pod traffic took the host path", i, got, chatterMax)
		}
		if got := grew(i, "to_host_nat"); got != 0 {
			t.Errorf("node%d to_host_nat grew by %d during pod-to-pod pings", i, got)
		}
	}
}

// checkService sends one GET and one UDP datagram from client to the service at ip,
// whose only backend is want, and checks that the answers come from the service's
// address, from want, and that the client's own address reached want unchanged.
func (c *serviceLab) checkService(t *testing.T, ctx context.Context, client *lab.Pod, ip netip.Addr, want *lab.Pod) {
	t.Helper()
	r := c.httpGet(t, ctx, client, ip.String(), httpPort, "/", 5*time.Second)
	if r.who() != want.Name || r.peerIP() != client.IP.String() {
		t.Errorf("GET http://%s/ from %s: got %q, want %s to answer and see %s (no SNAT inside the cluster)", ip, client.Name, r.Body, want.Name, client.IP)
	}
	u := c.udpQuery(t, ctx, client, ip.String(), dnsPort)
	wantFrom := netip.AddrPortFrom(ip, dnsPort).String()
	if u.From != wantFrom {
		t.Errorf("UDP to %s:%d from %s: reply came from %s, want %s (the ClusterIP: conntrack must reverse the DNAT)", ip, dnsPort, client.Name, u.From, wantFrom)
	}
	if who := strings.Fields(u.Body); len(who) == 0 || who[0] != want.Name {
		t.Errorf("UDP to %s:%d from %s: answered %q, want %s", ip, dnsPort, client.Name, u.Body, want.Name)
	}
}

// invalidDrops is how many packets kube-proxy's "KUBE-FORWARD -m conntrack
// --ctstate INVALID -j DROP" dropped on n so far. Conntrack calls a packet INVALID when
// it saw its connection only in part, e.g. a reply whose request bypassed the stack.
func invalidDrops(t *testing.T, ctx context.Context, n *lab.Node) uint64 {
	t.Helper()
	out, err := n.Exec(ctx, "iptables", "-w", "-t", "filter", "-L", "KUBE-FORWARD", "-v", "-n", "-x")
	if err != nil {
		t.Fatalf("list KUBE-FORWARD on %s: %v", n.NetNS, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "DROP" && strings.Contains(line, "ctstate INVALID") {
			v, _ := strconv.ParseUint(f[0], 10, 64)
			return v
		}
	}
	return 0
}

// explainFailure, deferred at the start of a subtest, says on failure where conntrack
// dropped packets as INVALID during it.
func (c *serviceLab) explainFailure(t *testing.T, ctx context.Context) func() {
	t.Helper()
	before := map[int]uint64{1: invalidDrops(t, ctx, c.n1), 2: invalidDrops(t, ctx, c.n2)}
	return func() {
		if !t.Failed() {
			return
		}
		for _, n := range []*lab.Node{c.n1, c.n2} {
			if d := invalidDrops(t, ctx, n) - before[n.Index]; d > 0 {
				t.Logf("node%d: kube-proxy's KUBE-FORWARD dropped %d packets as conntrack INVALID during this test: its stack saw those connections only in part", n.Index, d)
			}
		}
	}
}

// conntrackStates counts n's conntrack entries of TCP connections to ip by state,
// plus "UNREPLIED" (no reply seen) and "total"; sports holds each entry's
// original source port.
func conntrackStates(t *testing.T, ctx context.Context, n *lab.Node, ip netip.Addr) (states map[string]int, sports map[int]bool) {
	t.Helper()
	out, err := n.Exec(ctx, "conntrack", "-L", "-p", "tcp", "--orig-dst", ip.String())
	if err != nil {
		t.Fatalf("conntrack -L on %s: %v", n.NetNS, err)
	}
	states, sports = map[string]int{}, map[int]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		// tcp 6 <timeout> <STATE> src=... dst=... sport=... (the original direction first)
		if len(f) < 4 || f[0] != "tcp" {
			continue
		}
		states["total"]++
		states[f[3]]++
		if strings.Contains(line, "[UNREPLIED]") {
			states["UNREPLIED"]++
		}
		for _, kv := range f[4:] {
			if v, ok := strings.CutPrefix(kv, "sport="); ok {
				if p, err := strconv.Atoi(v); err == nil {
					sports[p] = true
				}
				break
			}
		}
	}
	return states, sports
}

// masqChain tells whether the agent's masquerade chain is in n's nat table.
func masqChain(t *testing.T, ctx context.Context, n *lab.Node) bool {
	t.Helper()
	out, err := n.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatalf("iptables-save on %s: %v", n.NetNS, err)
	}
	return strings.Contains(string(out), ":PATCHCORD-MASQ ")
}

// restartAgent stops node i's agent and starts it again with args.
func (c *serviceLab) restartAgent(t *testing.T, ctx context.Context, i int, args ...string) {
	t.Helper()
	if err := c.agents[i].Stop(); err != nil {
		t.Fatalf("stop agent on node%d: %v", i, err)
	}
	c.agents[i] = e2e.StartAgent(t, ctx, c.lab.Node(i), c.nodesFile, append([]string{"--routing", string(c.routing)}, args...)...)
}
