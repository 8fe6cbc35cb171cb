// Same-node end-to-end tests: pods on one emulated node, wired by the real
// cnitool, host-local and (chained) ptp, in both CNI modes. They show that
// pod-to-pod traffic takes the bpf_redirect_peer shortcut and not the host
// stack, that a pod cannot send as someone else, and that DEL, also twenty at
// once, leaves nothing behind.
package samenode

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// cniMode is one way of installing patchcord-cni on a node.
type cniMode struct {
	name    string                 // subtest name
	network string                 // the conflist's "name", also host-local's state dir
	conf    func(*lab.Node) []byte // the conflist
	veth    string                 // prefix of the host veths the mode creates
}

var cniModes = []cniMode{
	{name: "primary", network: "patchcord", conf: (*lab.Node).PrimaryConflist, veth: "pc"},
	{name: "chained-ptp", network: "patchcord-ptp", conf: (*lab.Node).ChainedPTPConflist, veth: "veth"},
}

// modeNode is node 1 of a fresh lab with the mode's conflist installed. No
// agent runs: same-node traffic needs none, and the first ADD loads the
// datapath.
func modeNode(t *testing.T, m cniMode) *lab.Node {
	t.Helper()
	l := e2e.NewLab(t)
	n := e2e.AddNodes(t, l, 1)[0]
	e2e.WriteConflist(t, n, m.network, m.conf(n))
	return n
}

// assertRegistered checks that every pod has its endpoint, on a host veth of
// the mode's kind, with from_pod pinned to it, and that nothing else is
// registered.
func assertRegistered(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	t.Helper()
	if eps := e2e.Endpoints(t, ctx, n); len(eps) != len(pods) {
		t.Errorf("%d endpoints registered, want %d (one per pod): %+v", len(eps), len(pods), eps)
	}
	e2e.AssertRegistered(t, ctx, n, m.veth, e2e.PodRefs(pods)...)
}

// pingPairs pings every ordered pair of pods at once, count pings each, and
// returns how many echo requests that made.
func pingPairs(t *testing.T, ctx context.Context, pods []*lab.Pod, count int, interval string) int {
	t.Helper()
	sent := e2e.PingMesh(t, ctx, pods, count, "-i", interval)
	if t.Failed() {
		t.FailNow()
	}
	return sent
}

// chatterPerPod bounds what a pod sends to the host stack by itself while
// pinging other pods: its ARP for the gateway in chained mode (ptp's gateway
// is a host address, so from_pod hands the request to the host) and a
// re-probe, and IPv6 link-local chatter (DAD, router solicitation, MLD),
// which from_pod passes up by design.
const chatterPerPod = 4

// TestSameNode runs three pods on one node, in each CNI mode: they reach each
// other over the redirect shortcut and the node through the host stack,
// cannot spoof their address or MAC, pass CHECK, and DEL removes every trace.
func TestSameNode(t *testing.T) {
	for _, m := range cniModes {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			ctx := e2e.Ctx(t)
			n := modeNode(t, m)
			var pods []*lab.Pod
			for _, name := range []string{"a", "b", "c"} {
				p := e2e.AddPod(t, ctx, n, name, m.network)
				pods = append(pods, p)
			}
			assertRegistered(t, ctx, n, m, pods)

			t.Run("ping", func(t *testing.T) { ping(t, ctx, n, m, pods) })

			t.Run("tcp", func(t *testing.T) { tcp(t, ctx, n, m, pods) })

			t.Run("counters", func(t *testing.T) { counters(t, ctx, n, m, pods) })

			t.Run("spoofing", func(t *testing.T) { spoofing(t, ctx, n, m, pods) })

			t.Run("check", func(t *testing.T) { check(t, ctx, n, m, pods) })

			t.Run("del", func(t *testing.T) { del(t, ctx, n, m, pods) })
		})
	}
}

// ping is the ping step of TestSameNode.
func ping(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	pingPairs(t, ctx, pods, 3, "0.2")
	// The node, at its uplink address (in primary mode a pod
	// sees no other), through the host stack; and the pods
	// from the node, along its routes to them.
	for _, p := range pods {
		e2e.Ping(t, ctx, p, n.IP.String())
		e2e.Ping(t, ctx, n, p.IP.String())
	}
}

// tcp is the tcp step of TestSameNode.
func tcp(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	before := e2e.Stats(t, ctx, n)
	// A ring, all flows at once: a->b, b->c, c->a.
	var servers []*lab.Process
	for _, p := range pods {
		s, err := p.Start(ctx, "iperf3", "-s", "-1")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.WaitListening(ctx, 5201); err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
	}
	results := make([]e2e.Iperf, len(pods))
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		dst := pods[(i+1)%len(pods)]
		wg.Go(func() {
			var err error
			if results[i], err = e2e.IperfErr(ctx, p, dst.IP.String(), 5201, "-t", "1"); err != nil {
				errs[i] = fmt.Errorf("iperf3 %s -> %s: %w", p.Name, dst.Name, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var moved uint64
	for i, r := range results {
		if r.Error != "" || r.End.SumReceived.Bytes == 0 {
			t.Errorf("iperf3 %s -> %s received %d bytes (error %q)", pods[i].Name, pods[(i+1)%len(pods)].Name, r.End.SumReceived.Bytes, r.Error)
		}
		moved += r.End.SumReceived.Bytes
	}
	for _, s := range servers {
		if err := s.Wait(); err != nil {
			t.Errorf("iperf3 server: %v", err)
		}
	}
	if t.Failed() {
		return
	}
	// Every payload byte crossed from_pod as part of a
	// redirected packet (headers and ACKs only add to it).
	after := e2e.Stats(t, ctx, n)
	if got := after["local_redirect"].Bytes - before["local_redirect"].Bytes; got < moved {
		t.Errorf("local_redirect grew by %d bytes while iperf3 moved %d between pods", got, moved)
	}
	if got := after["to_host"].Bytes - before["to_host"].Bytes; got >= moved/100 {
		t.Errorf("to_host grew by %d bytes while iperf3 moved %d between pods: TCP took the host path", got, moved)
	}
}

// counters is the counters step of TestSameNode.
func counters(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	before := e2e.Stats(t, ctx, n)
	requests := pingPairs(t, ctx, pods, 20, "0.01")
	after := e2e.Stats(t, ctx, n)
	delta := func(name string) uint64 { return after[name].Packets - before[name].Packets }
	t.Logf("%d echo requests: local_redirect +%d, to_host +%d", requests, delta("local_redirect"), delta("to_host"))
	// Each echo request and each reply is redirected once, at
	// the veth of the pod that sent it.
	if got := delta("local_redirect"); got < uint64(2*requests) {
		t.Errorf("local_redirect grew by %d packets, want at least %d (%d echo requests and their replies)", got, 2*requests, requests)
	}
	// Had pod traffic gone through the host, to_host would have
	// grown by at least one packet per request.
	if got, limit := delta("to_host"), uint64(chatterPerPod*len(pods)); got > limit {
		t.Errorf("to_host grew by %d packets while pods exchanged %d: want at most %d (neighbour and IPv6 chatter)", got, 2*requests, limit)
	}
	for _, name := range []string{"drop_spoofed", "drop_unregistered", "drop_malformed"} {
		if got := delta(name); got != 0 {
			t.Errorf("%s grew by %d during pod-to-pod pings", name, got)
		}
	}
}

// spoofing is the spoofing step of TestSameNode.
func spoofing(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	spoofer, victim, target := pods[0], pods[1], pods[2]
	self := e2e.Endpoints(t, ctx, n)[spoofer.IP.String()]
	gw := e2e.DefaultGateway(t, ctx, spoofer)
	for _, tc := range []struct {
		name       string
		spoof, fix [][]string // commands in the spoofer, to spoof and to undo it
		pingArgs   []string
	}{
		{
			// It claims a neighbour's address.
			name:     "ip",
			spoof:    [][]string{{"ip", "addr", "add", victim.IP.String() + "/32", "dev", "eth0"}},
			fix:      [][]string{{"ip", "addr", "del", victim.IP.String() + "/32", "dev", "eth0"}},
			pingArgs: []string{"-I", victim.IP.String()},
		},
		{
			// A new MAC flushes the pod's neighbours, and its ARP
			// for the gateway would be dropped (its sender MAC is
			// wrong too) before any echo request left: a static
			// entry makes the echo requests themselves go out.
			name: "mac",
			spoof: [][]string{
				{"ip", "link", "set", "eth0", "address", "02:00:5e:00:53:01"},
				{"ip", "neigh", "replace", gw, "lladdr", self.HostMAC, "dev", "eth0", "nud", "permanent"},
			},
			fix: [][]string{
				{"ip", "neigh", "del", gw, "dev", "eth0"},
				{"ip", "link", "set", "eth0", "address", self.MAC},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e2e.Stats(t, ctx, n)
			run := func(cmds [][]string) error {
				var errs []error
				for _, c := range cmds {
					if out, err := spoofer.Exec(ctx, c[0], c[1:]...); err != nil {
						errs = append(errs, fmt.Errorf("%w\n%s", err, out))
					}
				}
				return errors.Join(errs...)
			}
			// Undone however the case ends, so that the later
			// subtests find the pod as ADD left it.
			t.Cleanup(func() {
				if err := run(tc.fix); err != nil {
					t.Errorf("undo spoofing: %v", err)
				}
			})
			if err := run(tc.spoof); err != nil {
				t.Fatal(err)
			}
			const count = 3
			args := append([]string{"-c", fmt.Sprint(count), "-i", "0.2", "-W", "1"}, tc.pingArgs...)
			out, err := spoofer.Exec(ctx, "ping", append(args, target.IP.String())...)
			if err == nil {
				t.Errorf("spoofed ping got through:\n%s", out)
			}
			after := e2e.Stats(t, ctx, n)
			if got := after["drop_spoofed"].Packets - before["drop_spoofed"].Packets; got < count {
				t.Errorf("drop_spoofed grew by %d, want at least %d (one per echo request)", got, count)
			}
			if got := after["local_redirect"].Packets - before["local_redirect"].Packets; got != 0 {
				t.Errorf("local_redirect grew by %d: spoofed packets reached a pod", got)
			}
		})
	}
	// The spoofer, its victim and everyone else carry on.
	pingPairs(t, ctx, pods, 3, "0.2")
}

// check is the check step of TestSameNode.
func check(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	for _, p := range pods {
		if err := p.Check(ctx); err != nil {
			t.Error(err)
		}
	}
}

// del is the del step of TestSameNode.
func del(t *testing.T, ctx context.Context, n *lab.Node, m cniMode, pods []*lab.Pod) {
	for _, p := range pods {
		if err := p.Del(ctx); err != nil {
			t.Fatal(err)
		}
	}
	e2e.AssertClean(t, ctx, n, m.network, "")
}

// TestParallelAddDel runs twenty ADDs at once on a node whose
// datapath is not loaded yet, then twenty DELs at once, in each CNI mode.
func TestParallelAddDel(t *testing.T) {
	const count = 20
	for _, m := range cniModes {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			ctx := e2e.Ctx(t)
			n := modeNode(t, m)

			pods := make([]*lab.Pod, count)
			e2e.InParallel(t, count, func(i int) (err error) {
				pods[i], err = n.AddPod(ctx, fmt.Sprintf("par%02d", i), m.network)
				return err
			})
			seen := map[netip.Addr]string{}
			for _, p := range pods {
				if other, dup := seen[p.IP]; dup {
					t.Errorf("pods %s and %s both got %s", other, p.Name, p.IP)
				}
				seen[p.IP] = p.Name
				if !n.PodCIDR.Contains(p.IP) {
					t.Errorf("pod %s got %s, outside the node's %s", p.Name, p.IP, n.PodCIDR)
				}
			}
			assertRegistered(t, ctx, n, m, pods)
			// The first and last pod to come up reach each other.
			e2e.Ping(t, ctx, pods[0], pods[count-1].IP.String())

			e2e.InParallel(t, count, func(i int) error { return pods[i].Del(ctx) })
			e2e.AssertClean(t, ctx, n, m.network, "")
		})
	}
}
