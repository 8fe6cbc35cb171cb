package crossnode

import (
	"context"
	"maps"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// TestNativeRouting: with --routing native the nodes' pods reach each other
// by the fabric's routes, unencapsulated: from_pod sends by the FIB,
// from_uplink hands routed packets to the pod, and nothing is wrapped.
func TestNativeRouting(t *testing.T) {
	c := e2e.NewMesh(t, 1, 2)
	ctx := e2e.Ctx(t)
	c.StartAgents(t, ctx, nil, "--routing", "native")
	c.AddPods(t, ctx, 1)
	n1, n2 := c.Nodes[0], c.Nodes[1]

	// No tunnel overhead: the pod gets the uplink's MTU.
	if pod, up := linkMTU(t, ctx, c.Pod(1, 0), "eth0"), linkMTU(t, ctx, n1, "eth0"); pod != up {
		t.Errorf("pod MTU %d, want the uplink's %d", pod, up)
	}

	b1, b2 := e2e.Stats(t, ctx, n1), e2e.Stats(t, ctx, n2)
	e2e.PingMesh(t, ctx, []*lab.Pod{c.Pod(1, 0), c.Pod(2, 0)}, 3)
	e2e.IperfServer(t, ctx, c.Pod(2, 0), 5201)
	r := e2e.IperfRun(t, ctx, c.Pod(1, 0), c.Pod(2, 0).IP.String(), 5201, "-t", "1")
	t.Logf("tcp native: %d bytes received, %.2f Gbit/s", r.End.SumReceived.Bytes, r.Gbps())
	if r.End.SumReceived.Bytes < 1<<20 {
		t.Errorf("tcp native: %d bytes received, want >= 1 MiB", r.End.SumReceived.Bytes)
	}
	a1, a2 := e2e.Stats(t, ctx, n1), e2e.Stats(t, ctx, n2)
	for _, d := range []struct {
		node          string
		before, after map[string]e2e.Counter
	}{{n1.NetNS, b1, a1}, {n2.NetNS, b2, a2}} {
		out, in := e2e.Delta(d.before, d.after, "native_out"), e2e.Delta(d.before, d.after, "native_in")
		if out.Packets < 6 || in.Packets < 6 {
			t.Errorf("%s: native_out %d, native_in %d packets: want >= 6 each", d.node, out.Packets, in.Packets)
		}
		for _, name := range []string{"encap", "decap"} {
			if c := e2e.Delta(d.before, d.after, name); c.Packets != 0 {
				t.Errorf("%s: %s %d packets with every node native", d.node, name, c.Packets)
			}
		}
	}

	// The node's own traffic to a remote pod takes the agent's route.
	e2e.Ping(t, ctx, n1, c.Pod(2, 0).IP.String())
}

// TestNativeWithTunnelledNode: nodes 1 and 2 route natively and their pods
// get the uplink's whole MTU; node 3 is tunnelled (a source says so), so a
// full-size packet to its pods would not fit the uplink encapsulated. It
// must come back as "fragmentation needed" with the tunnel's MTU, never be
// encapsulated past the uplink's, and TCP must cross at the path MTU.
func TestNativeWithTunnelledNode(t *testing.T) {
	c := e2e.NewMesh(t, 1, 2, 3)
	ctx := e2e.Ctx(t)
	n1, n3 := c.Nodes[0], c.Nodes[2]
	for _, n := range c.Nodes {
		var es []nodes.Entry
		for _, e := range c.Entries() {
			if e.Name == n3.NetNS {
				e.Routing = string(nodes.Tunnel)
			}
			es = append(es, e)
		}
		e2e.WriteNodes(t, c.Files[n.Index], es...)
		routing := "native"
		if n == n3 {
			routing = "tunnel"
		}
		c.Agents[n.Index] = e2e.StartAgent(t, ctx, n, c.Files[n.Index], "--routing", routing)
	}
	c.AddPods(t, ctx, 1)
	p1, p3 := c.Pod(1, 0), c.Pod(3, 0)
	if got := linkMTU(t, ctx, p1, "eth0"); got != 1500 {
		t.Errorf("pod MTU on native node %d, want the uplink's 1500", got)
	}
	if got := linkMTU(t, ctx, p3, "eth0"); got != 1450 {
		t.Errorf("pod MTU on tunnelled node %d, want 1450", got)
	}
	e2e.PingMesh(t, ctx, []*lab.Pod{p1, c.Pod(2, 0), p3}, 3)

	wantFragNeeded(t, ctx, n1, p1, p3.IP.String())
	before := e2e.Stats(t, ctx, n1)
	e2e.IperfServer(t, ctx, p3, 5201)
	r := e2e.IperfRun(t, ctx, p1, p3.IP.String(), 5201, "-t", "1")
	if r.End.SumReceived.Bytes < 1<<20 {
		t.Errorf("tcp to the tunnelled node: %d bytes received, want >= 1 MiB", r.End.SumReceived.Bytes)
	}
	if enc := e2e.Delta(before, e2e.Stats(t, ctx, n1), "encap"); enc.Packets == 0 {
		t.Errorf("%s: nothing encapsulated for the tunnelled node", n1.NetNS)
	}
}

// TestAutoAcrossSubnets: with --routing auto, nodes 1 and 3 share a subnet
// and route natively; node 2 sits in another, behind the router, and is
// reached by VXLAN, the tunnel crossing the router as any UDP would.
func TestAutoAcrossSubnets(t *testing.T) {
	c := e2e.NewMesh(t, 1, 2, 3)
	ctx := e2e.Ctx(t)
	router := routedFabric(t, ctx, c, func(n *lab.Node) int {
		if n.Index == 2 {
			return 2
		}
		return 1
	})
	c.StartAgents(t, ctx, nil, "--routing", "auto")
	c.AddPods(t, ctx, 1)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	p1, p2, p3 := c.Pod(1, 0), c.Pod(2, 0), c.Pod(3, 0)

	want := map[string]string{n2.PodCIDR.String(): "tunnel", n3.PodCIDR.String(): "native"}
	if got := nodeRouting(t, ctx, n1); !maps.Equal(got, want) {
		t.Errorf("%s: bpf node list routing %v, want %v", n1.NetNS, got, want)
	}
	// Some peer is tunnelled: pods keep room for VXLAN.
	if mtu := linkMTU(t, ctx, p1, "eth0"); mtu != 1450 {
		t.Errorf("pod MTU %d with --routing auto, want 1450", mtu)
	}

	vxlan := routerCounter(t, ctx, router, n1.IP, n2.IP, "-p", "udp", "--dport", "4789")
	before := e2e.Stats(t, ctx, n1)
	e2e.PingMesh(t, ctx, []*lab.Pod{p1, p2, p3}, 3)
	after := e2e.Stats(t, ctx, n1)
	// p1 pinged p2 and p3, and answered both: 3 echo requests and 3
	// replies each way, for each kind of peer.
	if d := e2e.Delta(before, after, "native_out"); d.Packets < 6 {
		t.Errorf("native_out %d packets, want >= 6 (to the same-subnet node)", d.Packets)
	}
	if d := e2e.Delta(before, after, "encap"); d.Packets < 6 {
		t.Errorf("encap %d packets, want >= 6 (to the other subnet's node)", d.Packets)
	}
	if n := vxlan(); n < 6 {
		t.Errorf("router forwarded %d VXLAN packets %s -> %s, want >= 6", n, n1.IP, n2.IP)
	}
	for _, dst := range []*lab.Pod{p2, p3} {
		e2e.IperfServer(t, ctx, dst, 5201)
		r := e2e.IperfRun(t, ctx, p1, dst.IP.String(), 5201, "-t", "1")
		if r.End.SumReceived.Bytes < 1<<20 {
			t.Errorf("tcp to %s: %d bytes received, want >= 1 MiB", dst.IP, r.End.SumReceived.Bytes)
		}
	}
}

// nodeRouting is `patchcord bpf node list`'s routing of each pod CIDR.
func nodeRouting(t *testing.T, ctx context.Context, n *lab.Node) map[string]string {
	t.Helper()
	list, err := e2e.NodeList(ctx, n)
	if err != nil {
		t.Fatalf("bpf node list: %v", err)
	}
	m := map[string]string{}
	for _, e := range list {
		m[e.PodCIDR] = e.Routing
	}
	return m
}

// TestRoutingSwitch: a node switched from tunnel to native and back by its
// nodes-file entry, while a pod streams datagrams to it: none is lost (in
// between, each side takes what the other sends either way), and the
// traffic really moves from encap to native_out and back.
func TestRoutingSwitch(t *testing.T) {
	c, ctx := e2e.NewPair(t)
	n1, p1, p2 := c.Nodes[0], c.Pod(1, 0), c.Pod(2, 0)
	flows := e2e.NewFlows()
	flows.UDP(t, "udp", p1, p2, 5201)
	flows.WaitProgress(t, ctx, 200)
	for _, routing := range []nodes.Routing{nodes.Native, nodes.Tunnel} {
		var es []nodes.Entry
		for _, e := range c.Entries() {
			e.Routing = string(routing)
			es = append(es, e)
		}
		for _, n := range c.Nodes {
			e2e.WriteNodes(t, c.Files[n.Index], es...)
		}
		e2e.WaitNodeRouting(t, ctx, n1, c.Nodes[1].PodCIDR, string(routing))
		flows.WaitProgress(t, ctx, 100)
		before := e2e.Stats(t, ctx, n1)
		flows.WaitProgress(t, ctx, 200)
		counter := map[nodes.Routing]string{nodes.Native: "native_out", nodes.Tunnel: "encap"}[routing]
		if d := e2e.Delta(before, e2e.Stats(t, ctx, n1), counter); d.Packets < 150 {
			t.Errorf("switched to %s: %s %d packets for 200 datagrams, want >= 150", routing, counter, d.Packets)
		}
	}
	flows.Finish(t, "across the switches between tunnel and native")
}
