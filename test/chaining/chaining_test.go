// Chaining end to end: the conflists in examples/ (patchcord-cni as the primary plugin, and
// chained after ptp and after bridge, each followed by portmap and bandwidth; and followed
// by tuning), fitted to lab nodes and driven by cnitool with the runtime config a kubelet
// would pass (CAP_ARGS). They show that pods reach each other over the fast path in every
// mode, that traffic patchcord hands on (to the node, to a bridge port, to a shaped pod)
// still flows, that hostPorts reach pods from the node and from another node, that
// bandwidth limits hold, that tuning's sysctls land, that STATUS, CHECK, GC and VERSION
// answer, and that DEL leaves nothing of any plugin behind.
package chaining

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// conflistMode is one of the example conflists.
type conflistMode struct {
	name    string // subtest name
	example string // file in examples/
	veth    string // prefix of the host veths of its pods
	// bridge is the bridge the first plugin attaches pods to ("" for none): it, and the
	// route to the pod CIDR through it, stay after the last pod goes.
	bridge string
	// primary: patchcord-cni runs IPAM, so its GC releases leases too.
	primary bool
}

var modes = []conflistMode{
	{name: "primary", example: "05-patchcord.conflist", veth: "pc", primary: true},
	{name: "chained-ptp", example: "05-patchcord-ptp.conflist", veth: "veth"},
	{name: "chained-bridge", example: "05-patchcord-bridge.conflist", veth: "veth", bridge: "cni0"},
}

// received runs an iperf3 client in from against dst:port with extra args (-t 2, -R) and
// returns the received rate in bit/s and the bytes moved.
func received(t *testing.T, ctx context.Context, from e2e.Execer, dst string, port int, extra ...string) (float64, uint64) {
	t.Helper()
	r := e2e.IperfRun(t, ctx, from, dst, port, extra...).End.SumReceived
	return r.BitsPerSecond, r.Bytes
}

// Bandwidth limit of the shaped pods, bit/s both ways, and what a measurement may reach.
const (
	shapedRate = 50_000_000
	rateMax    = 70_000_000
	burst      = 1_000_000 // bits
	freeRate   = 2 * shapedRate
)

// chainRun is one mode of TestChaining: its two nodes and the pods on them.
type chainRun struct {
	m               conflistMode
	c               *e2e.Cluster
	n1, n2          *lab.Node
	a, web, slow, b *e2e.CNIPod
	pods            []*e2e.CNIPod
}

// TestChaining runs, for each example conflist, pods on two nodes with agents: a plain
// pod a, a pod web with hostPort 8080 to its port 80, and a pod slow limited to 50 Mbit/s
// both ways on node 1; a plain pod b on node 2.
func TestChaining(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			ctx := e2e.Ctx(t)
			c := e2e.NewCluster(t, ctx, m.example, 2)
			n1, n2 := c.Nodes[0], c.Nodes[1]

			e2e.RunSteps(t, ctx,
				e2e.Step{Name: "status", Run: func(t *testing.T, ctx context.Context) { assertStatus(t, ctx, n1, c.Network, m.example) }},
			)

			a := e2e.AddCNIPod(t, ctx, n1, "a", c.Network, nil)
			web := e2e.AddCNIPod(t, ctx, n1, "web", c.Network, map[string]any{
				"portMappings": []map[string]any{{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}},
			})
			slow := e2e.AddCNIPod(t, ctx, n1, "slow", c.Network, map[string]any{
				"bandwidth": map[string]int{"ingressRate": shapedRate, "ingressBurst": burst, "egressRate": shapedRate, "egressBurst": burst},
			})
			b := e2e.AddCNIPod(t, ctx, n2, "b", c.Network, nil)
			pods := []*e2e.CNIPod{a, web, slow, b}
			for _, p := range pods {
				if !p.Node.PodCIDR.Contains(p.IP) {
					t.Fatalf("pod %s got %s, outside %s", p.Name, p.IP, p.Node.PodCIDR)
				}
			}
			e2e.AssertRegistered(t, ctx, n1, m.veth, a.Ref(), web.Ref(), slow.Ref())
			e2e.AssertRegistered(t, ctx, n2, m.veth, b.Ref())
			f := &chainRun{m: m, c: c, n1: n1, n2: n2, a: a, web: web, slow: slow, b: b, pods: pods}

			e2e.RunSteps(t, ctx,
				e2e.Step{Name: "ping", Run: f.ping},
				e2e.Step{Name: "portmap", Run: f.portmap},
				e2e.Step{Name: "bandwidth", Run: f.bandwidth},
				e2e.Step{Name: "check", Run: f.check},
				e2e.Step{Name: "gc", Run: f.gc},
				e2e.Step{Name: "del", Run: f.del},
			)
		})
	}
}

// ping is the ping step of TestChaining.
func (f *chainRun) ping(t *testing.T, ctx context.Context) {
	// Each request and reply is redirected once on the node.
	e2e.PingRedirected(t, ctx, f.n1, f.a, f.web.IP, 10)
	e2e.PingRedirected(t, ctx, f.n1, f.web, f.a.IP, 10)
	// Across nodes, both ways; to and from the node; to the shaped pod,
	// which patchcord hands to the host stack (on the bridge, to the
	// bridge's forwarding).
	e2e.Ping(t, ctx, f.a, f.b.IP.String())
	e2e.Ping(t, ctx, f.b, f.a.IP.String())
	e2e.Ping(t, ctx, f.a, f.n1.IP.String())
	e2e.Ping(t, ctx, f.n1, f.a.IP.String())
	e2e.Ping(t, ctx, f.a, f.slow.IP.String())
	e2e.Ping(t, ctx, f.slow, f.a.IP.String())
	e2e.Ping(t, ctx, f.b, f.slow.IP.String())
	if f.m.bridge != "" {
		// The pod's gateway is the bridge's address.
		e2e.Ping(t, ctx, f.a, e2e.DefaultGateway(t, ctx, f.a))
	}
}

// portmap is the portmap step of TestChaining.
func (f *chainRun) portmap(t *testing.T, ctx context.Context) {
	e2e.IperfServer(t, ctx, f.web, 80)
	hostPort := f.n1.IP.String()
	for _, from := range []struct {
		name string
		e    e2e.Execer
	}{{"node1", f.n1}, {"node2", f.n2}, {"pod b on node2", f.b}, {"pod a on node1", f.a}} {
		if _, err := e2e.IperfErr(ctx, from.e, hostPort, 8080, "-n", "256K"); err != nil {
			t.Errorf("from %s to web through hostPort %s:8080: %v", from.name, hostPort, err)
		}
	}
}

// bandwidth is the bandwidth step of TestChaining.
func (f *chainRun) bandwidth(t *testing.T, ctx context.Context) {
	e2e.IperfServer(t, ctx, f.slow, 5201)
	before := e2e.Stats(t, ctx, f.n1)
	in, moved := received(t, ctx, f.a, f.slow.IP.String(), 5201, "-t", "2")
	out, movedOut := received(t, ctx, f.a, f.slow.IP.String(), 5201, "-t", "2", "-R")
	after := e2e.Stats(t, ctx, f.n1)
	t.Logf("into slow %.1f Mbit/s, out of slow %.1f Mbit/s (limit %d)", in/1e6, out/1e6, shapedRate/1_000_000)
	if in > rateMax {
		t.Errorf("into the shaped pod: %.1f Mbit/s, limit %d Mbit/s: its ingress limit does not apply", in/1e6, shapedRate/1_000_000)
	}
	if out > rateMax {
		t.Errorf("out of the shaped pod: %.1f Mbit/s, limit %d Mbit/s: its egress limit does not apply", out/1e6, shapedRate/1_000_000)
	}
	if got := after["local_redirect"].Bytes - before["local_redirect"].Bytes; got > (moved+movedOut)/10 {
		t.Errorf("local_redirect grew by %d bytes while %d went to and from the shaped pod: it took the fast path past its qdiscs", got, moved+movedOut)
	}
	// Two pods of the same node without a limit.
	free, _ := received(t, ctx, f.a, f.web.IP.String(), 80, "-t", "1")
	t.Logf("unshaped a -> web %.1f Mbit/s", free/1e6)
	if free < freeRate {
		t.Errorf("unshaped a -> web: %.1f Mbit/s, want above %d Mbit/s", free/1e6, freeRate/1_000_000)
	}
}

// check is the check step of TestChaining.
func (f *chainRun) check(t *testing.T, ctx context.Context) {
	for _, p := range f.pods {
		if out, err := p.CNI(ctx, "check"); err != nil {
			t.Errorf("check pod %s: %v\n%s", p.Name, err, out)
		}
	}
	// A pod whose MAC changed fails CHECK, and says why.
	if _, err := f.a.Exec(ctx, "ip", "link", "set", "eth0", "address", "02:00:5e:00:53:02"); err != nil {
		t.Fatal(err)
	}
	out, err := f.a.CNI(ctx, "check")
	if _, rerr := f.a.Exec(ctx, "ip", "link", "set", "eth0", "address", f.a.MAC); rerr != nil {
		t.Fatal(rerr)
	}
	if err == nil || !strings.Contains(strings.ToLower(string(out)), "mac") {
		t.Errorf("check of a pod with a new MAC: want an error naming the MAC, got %v\n%s", err, out)
	}
}

// gc is the gc step of TestChaining.
func (f *chainRun) gc(t *testing.T, ctx context.Context) {
	// GC on node n with the attachments the runtime still knows there.
	gc := func(n *lab.Node, valid ...*e2e.CNIPod) {
		t.Helper()
		conflist, err := os.ReadFile(filepath.Join(n.ConfDir, f.c.Network+".conflist"))
		if err != nil {
			t.Fatal(err)
		}
		eps := e2e.Endpoints(t, ctx, n)
		var attachments [][2]string
		for _, p := range valid {
			attachments = append(attachments, [2]string{eps[p.IP.String()].ContainerID, "eth0"})
		}
		e2e.GC(t, ctx, n, conflist, attachments)
	}
	// Every pod valid: GC changes nothing.
	gc(f.n1, f.a, f.web, f.slow)
	gc(f.n2, f.b)
	e2e.AssertRegistered(t, ctx, f.n1, f.m.veth, f.a.Ref(), f.web.Ref(), f.slow.Ref())
	e2e.AssertRegistered(t, ctx, f.n2, f.m.veth, f.b.Ref())
	e2e.Ping(t, ctx, f.a, f.web.IP.String())
	// The runtime forgot slow: its endpoint and link go, and in primary
	// mode its lease; the others stay. When chained, the veth and lease
	// are the first plugin's (ptp and bridge have no GC in plugins
	// v1.10) and go with its DEL.
	gc(f.n1, f.a, f.web)
	e2e.AssertRegistered(t, ctx, f.n1, f.m.veth, f.a.Ref(), f.web.Ref())
	if _, ok := e2e.Endpoints(t, ctx, f.n1)[f.slow.IP.String()]; ok {
		t.Errorf("GC kept the endpoint of pod slow, which is not among the valid attachments")
	}
	if pins, _ := os.ReadDir(filepath.Join(f.n1.BpffsRoot, "links", "from_pod")); len(pins) != 2 {
		t.Errorf("%d from_pod links pinned after GC, want 2 (a and web)", len(pins))
	}
	if _, err := os.Stat(filepath.Join(f.n1.IPAMDir, f.c.Network, f.slow.IP.String())); err == nil && f.m.primary {
		t.Errorf("GC kept the address lease of pod slow")
	}
	e2e.Ping(t, ctx, f.a, f.web.IP.String())
	e2e.Ping(t, ctx, f.b, f.a.IP.String())
}

// del is the del step of TestChaining.
func (f *chainRun) del(t *testing.T, ctx context.Context) {
	// DEL after GC, as a runtime may send it, succeeds too.
	for _, p := range f.pods {
		p.Del(t, ctx)
	}
	for _, n := range f.c.Nodes {
		e2e.AssertClean(t, ctx, n, f.c.Network, f.m.bridge)
	}
}

// assertStatus checks STATUS through cnitool: ready on the node (loading the datapath if it
// is not yet), and not ready, with what to do, when bpffsRoot is on no bpffs. STATUS is a
// CNI 1.1 verb: libcni runs it only for 1.1.0 conflists, so it runs on 1.1.0 copies of the
// example.
func assertStatus(t *testing.T, ctx context.Context, n *lab.Node, network, example string) {
	t.Helper()
	for _, tc := range []struct {
		name, bpffsRoot, want string
	}{
		{"ready", n.BpffsRoot, ""},
		{"no-bpffs", filepath.Join(n.Lab.Dir, "not-bpffs", "patchcord"), "mount -t bpf"},
	} {
		_, b := e2e.Example(t, n, example)
		var conf map[string]any
		if err := json.Unmarshal(b, &conf); err != nil {
			t.Fatal(err)
		}
		copyName := network + "-status-" + tc.name
		conf["name"], conf["cniVersion"] = copyName, "1.1.0"
		for _, p := range conf["plugins"].([]any) {
			if plugin := p.(map[string]any); plugin["type"] == "patchcord-cni" {
				plugin["bpffsRoot"] = tc.bpffsRoot
			}
		}
		if b, err := json.Marshal(conf); err != nil {
			t.Fatal(err)
		} else if err := n.WriteConflist(copyName, b); err != nil {
			t.Fatal(err)
		}
		probe := &e2e.CNIPod{Node: n, Network: copyName, NSPath: "/var/run/netns/" + n.NetNS, CNIPath: strings.Join(e2e.CNIPathWithPlugin(t), ":"), Tool: e2e.CNITool(t)}
		out, err := probe.CNI(ctx, "status")
		os.Remove(filepath.Join(n.ConfDir, copyName+".conflist"))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("status %s: %v\n%s", copyName, err, out)
		case tc.want != "" && (err == nil || !strings.Contains(string(out), tc.want)):
			t.Errorf("status %s: want an error saying %q, got %v\n%s", copyName, tc.want, err, out)
		}
	}
	if _, err := os.Stat(filepath.Join(n.BpffsRoot, "maps")); err != nil {
		t.Errorf("STATUS did not load the datapath: %v", err)
	}
}

// TestTuning runs the tuning example: tuning after patchcord-cni sets its sysctl in
// every pod, and the pods still take the fast path and pass CHECK.
func TestTuning(t *testing.T) {
	ctx := e2e.Ctx(t)
	c := e2e.NewCluster(t, ctx, "05-patchcord-tuning.conflist", 1)
	n := c.Nodes[0]
	x := e2e.AddCNIPod(t, ctx, n, "x", c.Network, nil)
	y := e2e.AddCNIPod(t, ctx, n, "y", c.Network, nil)
	for _, p := range []*e2e.CNIPod{x, y} {
		out, err := p.Exec(ctx, "cat", "/proc/sys/net/core/somaxconn")
		if err != nil || strings.TrimSpace(string(out)) != "1024" {
			t.Errorf("net.core.somaxconn in pod %s: %v %q, want 1024 (set by tuning)", p.Name, err, out)
		}
	}
	if out, err := n.Exec(ctx, "cat", "/proc/sys/net/core/somaxconn"); err != nil || strings.TrimSpace(string(out)) == "1024" {
		t.Errorf("net.core.somaxconn on the node: %v %q: tuning must change the pod only", err, out)
	}
	e2e.PingRedirected(t, ctx, n, x, y.IP, 10)
	for _, p := range []*e2e.CNIPod{x, y} {
		if out, err := p.CNI(ctx, "check"); err != nil {
			t.Errorf("check pod %s: %v\n%s", p.Name, err, out)
		}
		p.Del(t, ctx)
	}
	e2e.AssertClean(t, ctx, n, c.Network, "")
}

// TestVersion asks the plugin for its versions, as a runtime does before ADD.
func TestVersion(t *testing.T) {
	// TestMain finds the plugin only as root.
	lab.RequireRoot(t)
	cmd := exec.Command(filepath.Join(e2e.BinDir(), "patchcord-cni"))
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("VERSION: %v\n%s", err, out)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("VERSION: %v\n%s", err, out)
	}
	if v.CNIVersion != "1.1.0" || !slices.Equal(v.SupportedVersions, []string{"0.4.0", "1.0.0", "1.1.0"}) {
		t.Errorf("VERSION answered %s, want cniVersion 1.1.0 and supportedVersions [0.4.0 1.0.0 1.1.0]", out)
	}
}
