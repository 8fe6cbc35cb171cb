// Services end to end: kube-proxy's iptables mode on top of patchcord. Two nodes carry
// the rule set kube-proxy would write for three services (their NAT chains, its filter
// chains, its jumps), and pods, nodes and an outside host use them: pod -> ClusterIP ->
// backend on the same node and on the other node (TCP, UDP, a bulk transfer, many short
// connections), node -> ClusterIP, NodePort from another node, a pod reaching its own
// service, and pods leaving the cluster through the agent's masquerade. Between these,
// pod-to-pod traffic must keep its fast path.
package services

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/kubeproxy"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// The service side of the lab: kube-proxy's --cluster-cidr (every node's pod CIDR lies
// in it) and the service range, which a real node reaches by its default route.
var (
	podsCIDR     = netip.MustParsePrefix("10.244.0.0/16")
	serviceRange = netip.MustParsePrefix("10.96.0.0/12")
	// outsideIP is a host on the fabric that is no node and has no route to any pod
	// CIDR: what "the internet" is to the pods.
	outsideIP = netip.MustParseAddr("198.18.0.200")
	// The services of serviceLab.
	webIP   = netip.MustParseAddr("10.96.0.10")
	webN1IP = netip.MustParseAddr("10.96.0.11")
	webN2IP = netip.MustParseAddr("10.96.0.12")
)

// Ports the backends listen on, and the ports of the services in front of them.
const (
	backendTCP = 8080
	backendUDP = 5353
	httpPort   = 80
	dnsPort    = 53
	// nodeServerPort is a plain server in a node's own namespace.
	nodeServerPort = 8090
	// The NodePorts of serviceLab's services.
	nodePortWeb   = 30080
	nodePortWebN1 = 30081
	nodePortWebN2 = 30082
)

// ---- the cluster -------------------------------------------------------------------------

// serviceLab is two patchcord nodes running kube-proxy's rules for three services:
//
//	web     10.96.0.10  backends b1 (node 1) and b2 (node 2), NodePort 30080
//	web-n1  10.96.0.11  backend b1 only, NodePort 30081
//	web-n2  10.96.0.12  backend b2 only, NodePort 30082
//
// each with port http (TCP 80 -> 8080) and port dns (UDP 53 -> 5353). Clients: pod c1 on
// node 1, pod c2 on node 2. A host outside the cluster sits on the fabric.
type serviceLab struct {
	// routing is the agents' --routing; out and in the counters of
	// cross-node pod traffic leaving and reaching a node with it.
	routing    nodes.Routing
	out, in    string
	lab        *lab.Lab
	n1, n2     *lab.Node
	nodesFile  string
	agents     map[int]*lab.Process
	c1, b1, b2 *lab.Pod
	c2         *lab.Pod
	outside    *lab.Node // a namespace on the fabric; not a cluster node
	serverPy   string
	clientPy   string
	svcs       []kubeproxy.ServicePort
}

func newCluster(t *testing.T, ctx context.Context, routing nodes.Routing) *serviceLab {
	t.Helper()
	l := e2e.NewLab(t)
	c := &serviceLab{lab: l, agents: map[int]*lab.Process{}, routing: routing, out: "encap", in: "decap"}
	if routing == nodes.Native {
		c.out, c.in = "native_out", "native_in"
	}
	c.serverPy = filepath.Join(l.Dir, "svc_server.py")
	c.clientPy = filepath.Join(l.Dir, "svc_client.py")
	for path, src := range map[string]string{c.serverPy: serverScript, c.clientPy: clientScript} {
		if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	nodes := c.addNodes(t, ctx)
	type podSpec struct {
		node *lab.Node
		name string
		dst  **lab.Pod
	}
	specs := []podSpec{{c.n1, "c1", &c.c1}, {c.n1, "b1", &c.b1}, {c.n2, "b2", &c.b2}, {c.n2, "c2", &c.c2}}
	e2e.InParallel(t, len(specs), func(i int) (err error) {
		*specs[i].dst, err = specs[i].node.AddPod(ctx, specs[i].name, "patchcord")
		return err
	})

	c.serve(t, ctx, c.b1, "b1", backendTCP, backendUDP)
	c.serve(t, ctx, c.b2, "b2", backendTCP, backendUDP)
	c.serve(t, ctx, c.n2, "n2", nodeServerPort, 0)

	c.svcs = services(c.b1, c.b2)
	// kube-proxy runs on every node.
	for _, n := range nodes {
		if err := kubeproxy.Load(ctx, n, podsCIDR, c.svcs); err != nil {
			t.Fatal(err)
		}
	}

	c.outside = addOutsideHost(t, ctx, l)
	srv := c.serve(t, ctx, c.outside, "outside", backendTCP, 0)
	t.Cleanup(func() { _ = srv.Stop() })
	return c
}

// addOutsideHost plugs a namespace "<Prefix>-outside" into the fabric with
// outsideIP/24 and no other route: a host beyond the cluster that can answer only
// addresses on the fabric. It returns it as a lab.Node for Exec and Start (it is no
// cluster node: no agent, no bpffs); it goes before the lab does, and lab.Sweep knows
// it by its prefix if a run dies.
func addOutsideHost(t *testing.T, ctx context.Context, l *lab.Lab) *lab.Node {
	t.Helper()
	name := l.Prefix + "-outside"
	fabric := l.FabricNS()
	ipCmd := func(args ...string) {
		t.Helper()
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ipCmd("netns", "add", name)
	host := &lab.Node{Lab: l, Index: 200, NetNS: name, NSPath: filepath.Join("/var/run/netns", name), IP: outsideIP}
	t.Cleanup(func() {
		// Its veth goes with it, and with that the fabric port. Processes started
		// in it must be stopped by cleanups registered later (they run first).
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete %s: %v\n%s", name, err, out)
		}
	})
	// Like the fabric: no IPv6 chatter into the nodes' uplinks.
	if out, err := host.Exec(ctx, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
		t.Fatalf("disable IPv6 in %s: %v\n%s", name, err, out)
	}
	ipCmd("-n", fabric, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", name)
	ipCmd("-n", fabric, "link", "set", "out0", "master", "br0", "up")
	ipCmd("-n", name, "link", "set", "lo", "up")
	ipCmd("-n", name, "addr", "add", netip.PrefixFrom(outsideIP, 24).String(), "dev", "eth0")
	ipCmd("-n", name, "link", "set", "eth0", "up")
	return host
}

// ---- tests -------------------------------------------------------------------------------

// TestKubeProxyChainNames checks the chain-name hash against names every
// kube-proxy cluster has: the apiserver's service and kube-dns.
func TestKubeProxyChainNames(t *testing.T) {
	for _, tc := range []struct {
		port kubeproxy.ServicePort
		want string
	}{
		{kubeproxy.ServicePort{Namespace: "default", Name: "kubernetes", PortName: "https", Protocol: "tcp"}, "KUBE-SVC-NPX46M4PTMTKRN6Y"},
		{kubeproxy.ServicePort{Namespace: "kube-system", Name: "kube-dns", PortName: "dns", Protocol: "udp"}, "KUBE-SVC-TCOU7JCQXEZGVUNU"},
		{kubeproxy.ServicePort{Namespace: "kube-system", Name: "kube-dns", PortName: "dns-tcp", Protocol: "tcp"}, "KUBE-SVC-ERIFXISQEP7F7OF4"},
		{kubeproxy.ServicePort{Namespace: "kube-system", Name: "kube-dns", PortName: "metrics", Protocol: "tcp"}, "KUBE-SVC-JD5MR3NA4I4DYORP"},
	} {
		if got := tc.port.SvcChain(); got != tc.want {
			t.Errorf("%s/%s: chain %s, want %s", tc.port.String(), tc.port.Protocol, got, tc.want)
		}
	}
}

// TestServices runs the service cases on one cluster, in order, with pod-to-pod checks
// before, between and after them; once with the nodes tunnelled, once routed natively.
func TestServices(t *testing.T) {
	for _, routing := range []nodes.Routing{nodes.Tunnel, nodes.Native} {
		t.Run(string(routing), func(t *testing.T) { testServices(t, routing) })
	}
}

func testServices(t *testing.T, routing nodes.Routing) {
	ctx := e2e.Ctx(t)
	c := newCluster(t, ctx, routing)
	e2e.RunSteps(t, ctx,
		e2e.Step{Name: "kube-proxy-rules", Run: c.kubeProxyRules},
		e2e.Step{Name: "redirect-before", Run: c.checkRedirect},
		e2e.Step{Name: "clusterip-same-node", Run: c.clusteripSameNode},
		e2e.Step{Name: "clusterip-other-node", Run: c.clusteripOtherNode},
		e2e.Step{Name: "clusterip-udp-fragmented-same-node", Run: func(t *testing.T, ctx context.Context) { c.clusteripFragmented(t, ctx, webN1IP, c.b1) }},
		e2e.Step{Name: "clusterip-udp-fragmented-other-node", Run: func(t *testing.T, ctx context.Context) { c.clusteripFragmented(t, ctx, webN2IP, c.b2) }},
		e2e.Step{Name: "clusterip-from-other-node-client", Run: c.clusteripFromOtherNodeClient},
		e2e.Step{Name: "redirect-during", Run: c.checkRedirect},
		e2e.Step{Name: "clusterip-many-connections", Run: c.clusteripManyConnections},
		e2e.Step{Name: "node-to-clusterip", Run: c.nodeToClusterip},
		e2e.Step{Name: "node-to-pod", Run: c.nodeToPod},
		e2e.Step{Name: "nodeport-from-other-node", Run: c.nodeportFromOtherNode},
		e2e.Step{Name: "hairpin", Run: c.hairpin},
		e2e.Step{Name: "masquerade", Run: c.masquerade},
		e2e.Step{Name: "redirect-after", Run: c.checkRedirect},
	)
}

// kubeProxyRules is the kube-proxy-rules step of TestServices.
func (c *serviceLab) kubeProxyRules(t *testing.T, ctx context.Context) {
	web := c.svcs[0]
	// What iptables-save prints for kube-proxy's rules is well known from every
	// cluster; the kernel's normalised form of ours must read the same.
	out, err := c.n1.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	sorted := slices.Clone(web.Endpoints)
	sepA, sepB := web.SepChain(sorted[0]), web.SepChain(sorted[1])
	for _, line := range []string{
		`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`,
		`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000`,
		`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN`,
		`-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0`,
		`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`,
		`-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j ` + web.SvcChain(),
		`-A ` + web.SvcChain() + ` ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ`,
		`-A ` + web.SvcChain() + ` -m comment --comment "default/web:http -> ` + sorted[0].String() + `" -m statistic --mode random --probability 0.50000000000 -j ` + sepA,
		`-A ` + web.SvcChain() + ` -m comment --comment "default/web:http -> ` + sorted[1].String() + `" -j ` + sepB,
		`-A ` + sepA + ` -s ` + sorted[0].Addr().String() + `/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ`,
		`-A ` + sepA + ` -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination ` + sorted[0].String(),
		`-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j ` + web.ExtChain(),
		`-A ` + web.ExtChain() + ` -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ`,
		`-A ` + web.ExtChain() + ` -j ` + web.SvcChain(),
		`-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`,
	} {
		if !strings.Contains(string(out), line+"\n") {
			t.Errorf("iptables-save -t nat on node1 lacks\n\t%s", line)
		}
	}
	if t.Failed() {
		t.Logf("iptables-save -t nat:\n%s", out)
	}
}

// clusteripSameNode is the clusterip-same-node step of TestServices.
func (c *serviceLab) clusteripSameNode(t *testing.T, ctx context.Context) {
	c.clusteripDownload(t, ctx, webN1IP, c.b1)
}

// clusteripOtherNode is the clusterip-other-node step of TestServices. GSO
// packets of the backend cross nodes whole and must survive the path to the
// stack on arrival and the forwarding after it.
func (c *serviceLab) clusteripOtherNode(t *testing.T, ctx context.Context) {
	before, after := c.clusteripDownload(t, ctx, webN2IP, c.b2)
	t.Logf("node1 %s +%d packets; node1 %s +%d; node2 %s +%d", c.in, grewOn(before, after, 1, c.in).Packets,
		c.out, grewOn(before, after, 1, c.out).Packets, c.out, grewOn(before, after, 2, c.out).Packets)
	// The DNATed requests leave node1 through to_uplink (tunnel) or the
	// stack's route (native, to_uplink leaving them alone); b2's replies
	// through from_pod on node2.
	if got := grewOn(before, after, 1, "encap").Packets; c.routing == nodes.Tunnel && got == 0 {
		t.Error("node1 encapsulated nothing: the DNATed requests did not cross to node2 through to_uplink")
	}
	if got := grewOn(before, after, 2, c.out).Bytes; got < 50_000_000 {
		t.Errorf("node2 %s counted %d bytes while b2 sent 50 MB to c1", c.out, got)
	}
}

// clusteripDownload has c1 download 50 MB through service ip, served by
// backend, and returns the counters before and after.
func (c *serviceLab) clusteripDownload(t *testing.T, ctx context.Context, ip netip.Addr, backend *lab.Pod) (before, after map[int]nodeCounters) {
	defer c.explainFailure(t, ctx)()
	before = c.counters(t, ctx)
	c.checkService(t, ctx, c.c1, ip, backend)
	r := c.httpGet(t, ctx, c.c1, ip.String(), httpPort, "/bytes/50000000", 30*time.Second)
	if r.Bytes != 50_000_000 {
		t.Errorf("downloaded %d bytes through %s, want 50000000", r.Bytes, ip)
	}
	after = c.counters(t, ctx)
	nat := grewOn(before, after, 1, "to_host_nat")
	t.Logf("50 MB in %.2fs; node1 to_host_nat +%d packets, +%d bytes", r.Seconds, nat.Packets, nat.Bytes)
	// Every reply of the backend to c1 belongs to a DNATed connection:
	// none may be redirected past the stack.
	if nat.Bytes < 50_000_000 {
		t.Errorf("node1 to_host_nat grew by %d bytes while %s sent 50 MB through the service", nat.Bytes, backend.Name)
	}
	return before, after
}

// clusteripFragmented: a reply of 4000 bytes leaves the backend in
// fragments; conntrack cannot be asked about fragments on the fast path, so
// they cross the stack, which reassembles them and reverses the DNAT.
func (c *serviceLab) clusteripFragmented(t *testing.T, ctx context.Context, ip netip.Addr, backend *lab.Pod) {
	defer c.explainFailure(t, ctx)()
	before := c.counters(t, ctx)
	u := c.udpQuery(t, ctx, c.c1, ip.String(), dnsPort, "big 4000")
	if want := netip.AddrPortFrom(ip, dnsPort).String(); u.From != want || u.Bytes != 4000 {
		t.Errorf("fragmented UDP reply through %s: %d bytes from %s, want 4000 from %s", ip, u.Bytes, u.From, want)
	}
	if u.who() != backend.Name {
		t.Errorf("fragmented UDP reply through %s: answered %q, want %s", ip, u.Body, backend.Name)
	}
	if got := grewOn(before, c.counters(t, ctx), 1, "to_host_untracked").Packets; got < 3 {
		t.Errorf("node1 to_host_untracked grew by %d packets, want the reply's 3 fragments at least", got)
	}
}

// clusteripFromOtherNodeClient is the clusterip-from-other-node-client step of TestServices.
func (c *serviceLab) clusteripFromOtherNodeClient(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	// The mirror image: the service is NATed on node2, the backend on node1.
	c.checkService(t, ctx, c.c2, webN1IP, c.b1)
}

// clusteripManyConnections is the clusterip-many-connections step of TestServices.
func (c *serviceLab) clusteripManyConnections(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	const n = 200
	r, err := c.runClient(ctx, c.c1, "many", webIP.String(), strconv.Itoa(httpPort), strconv.Itoa(n), "5")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d of %d GETs through %s answered: %v", r.OK, n, webIP, r.Names)
	if r.OK != n {
		t.Errorf("%d of %d connections through %s failed; first errors: %v", n-r.OK, n, webIP, r.Errors)
	}
	// Two endpoints at probability 0.5: both answer 200 connections unless
	// one path is broken (a miss happens with probability 2^-199).
	for _, b := range []string{"b1", "b2"} {
		if r.Names[b] == 0 {
			t.Errorf("backend %s answered none of %d connections through %s: %v", b, n, webIP, r.Names)
		}
	}
	// Every connection was closed by both sides, so node1's conntrack, which
	// NATed them, must have seen each through to its end: an entry left
	// unreplied or half open means a direction bypassed the stack, and a
	// client port without an entry means a connection bypassed it entirely.
	// Entries are matched by the client's port rather than counted: a port the
	// kernel hands out twice reopens its TIME_WAIT entry, so 200 connections
	// may leave fewer entries without anything lost.
	ports := map[int]bool{}
	for _, p := range r.Ports {
		ports[p] = true
	}
	if len(ports) < len(r.Ports) {
		t.Logf("the client's %d connections used %d distinct source ports", len(r.Ports), len(ports))
	}
	var states map[string]int
	var missing []int
	err = lab.WaitFor(ctx, "conntrack entries of "+webIP.String()+" to close", func(ctx context.Context) error {
		var sports map[int]bool
		states, sports = conntrackStates(t, ctx, c.n1, webIP)
		var stale []string
		for _, st := range []string{"UNREPLIED", "SYN_SENT", "SYN_RECV", "ESTABLISHED"} {
			if states[st] > 0 {
				stale = append(stale, fmt.Sprintf("%s: %d", st, states[st]))
			}
		}
		missing = missing[:0]
		for p := range ports {
			if !sports[p] {
				missing = append(missing, p)
			}
		}
		if len(missing) > 0 {
			slices.Sort(missing)
			stale = append(stale, fmt.Sprintf("no entry for %d client ports: %v", len(missing), missing[:min(len(missing), 10)]))
		}
		if len(stale) > 0 {
			return errors.New(strings.Join(stale, ", "))
		}
		return nil
	})
	t.Logf("node1 conntrack entries for %s by state: %v", webIP, states)
	if err != nil {
		t.Error(err)
	}
	if len(r.Ports) != r.OK {
		t.Errorf("the client reported %d source ports for %d answered connections", len(r.Ports), r.OK)
	}
}

// nodeToClusterip is the node-to-clusterip step of TestServices.
func (c *serviceLab) nodeToClusterip(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	// The node's own connections are masqueraded by KUBE-SVC (source outside the
	// cluster CIDR), so the backends see the node's address.
	for _, tc := range []struct {
		ip   netip.Addr
		want *lab.Pod
	}{{webN1IP, c.b1}, {webN2IP, c.b2}} {
		r, err := c.runClient(ctx, c.n1, "get", tc.ip.String(), strconv.Itoa(httpPort), "/", "5")
		if err != nil {
			t.Errorf("node1 -> %s (backend %s): %v", tc.ip, tc.want.Name, err)
			continue
		}
		if r.who() != tc.want.Name || r.peerIP() != c.n1.IP.String() {
			t.Errorf("node1 -> %s: got %q, want %s to answer and see %s", tc.ip, r.Body, tc.want.Name, c.n1.IP)
		}
	}
}

// nodeToPod is the node-to-pod step of TestServices.
func (c *serviceLab) nodeToPod(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	// A node reaching pods directly (kubelet probes on its own node; an
	// apiserver or a hostNetwork scraper on another): no NAT, and the pod sees
	// the node's address.
	for _, tc := range []struct {
		from *lab.Node
		to   *lab.Pod
	}{{c.n1, c.b1}, {c.n2, c.b1}, {c.n1, c.b2}} {
		r, err := c.runClient(ctx, tc.from, "get", tc.to.IP.String(), strconv.Itoa(backendTCP), "/", "5")
		if err != nil {
			t.Errorf("node%d -> %s on node%d: %v", tc.from.Index, tc.to.Name, tc.to.Node.Index, err)
			continue
		}
		if r.who() != tc.to.Name || r.peerIP() != tc.from.IP.String() {
			t.Errorf("node%d -> %s: got %q, want %s to answer and see %s", tc.from.Index, tc.to.Name, r.Body, tc.to.Name, tc.from.IP)
		}
	}
}

// nodeportFromOtherNode is the nodeport-from-other-node step of TestServices.
func (c *serviceLab) nodeportFromOtherNode(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	// node2 reaches node1's NodePorts; node1 DNATs and masquerades.
	for _, tc := range []struct {
		port int
		want *lab.Pod
	}{{nodePortWebN1, c.b1}, {nodePortWebN2, c.b2}} {
		r, err := c.runClient(ctx, c.n2, "get", c.n1.IP.String(), strconv.Itoa(tc.port), "/", "5")
		if err != nil {
			t.Errorf("node2 -> %s:%d (backend %s on node%d): %v", c.n1.IP, tc.port, tc.want.Name, tc.want.Node.Index, err)
			continue
		}
		if r.who() != tc.want.Name || r.peerIP() != c.n1.IP.String() {
			t.Errorf("node2 -> %s:%d: got %q, want %s to answer and see %s (KUBE-EXT masquerades)", c.n1.IP, tc.port, r.Body, tc.want.Name, c.n1.IP)
		}
	}
}

// hairpin is the hairpin step of TestServices.
func (c *serviceLab) hairpin(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	// A backend reaching itself through its service: KUBE-SEP masquerades it,
	// or its own reply would go straight back to itself.
	for _, tc := range []struct {
		self *lab.Pod
		ip   netip.Addr
	}{{c.b1, webN1IP}, {c.b2, webN2IP}} {
		r, err := c.runClient(ctx, tc.self, "get", tc.ip.String(), strconv.Itoa(httpPort), "/", "5")
		if err != nil {
			t.Errorf("%s -> %s (itself): %v", tc.self.Name, tc.ip, err)
			continue
		}
		if r.who() != tc.self.Name || r.peerIP() == tc.self.IP.String() {
			t.Errorf("%s -> %s: got %q, want %s to answer a masqueraded peer", tc.self.Name, tc.ip, r.Body, tc.self.Name)
		}
		u := c.udpQuery(t, ctx, tc.self, tc.ip.String(), dnsPort)
		if want := netip.AddrPortFrom(tc.ip, dnsPort).String(); u.From != want {
			t.Errorf("%s -> %s:%d (itself, UDP): reply from %s, want %s", tc.self.Name, tc.ip, dnsPort, u.From, want)
		}
	}
}

// masquerade is the masquerade step of TestServices.
func (c *serviceLab) masquerade(t *testing.T, ctx context.Context) {
	defer c.explainFailure(t, ctx)()
	outside := outsideIP.String()
	// On: the outside host answers the node, which it can reach.
	r := c.httpGet(t, ctx, c.c1, outside, backendTCP, "/", 5*time.Second)
	if r.peerIP() != c.n1.IP.String() {
		t.Errorf("outside host saw %s, want node1's %s (masquerade)", r.peer(), c.n1.IP)
	}
	// Inside the cluster nothing is masqueraded: a pod on another node and
	// another node see the pod's own address.
	if r, err := c.runClient(ctx, c.c1, "get", c.b2.IP.String(), strconv.Itoa(backendTCP), "/", "5"); err != nil {
		t.Errorf("c1 -> b2 directly: %v", err)
	} else if r.peerIP() != c.c1.IP.String() {
		t.Errorf("b2 saw c1 as %s, want %s (pod-to-pod is never masqueraded)", r.peer(), c.c1.IP)
	}
	if r, err := c.runClient(ctx, c.c1, "get", c.n2.IP.String(), strconv.Itoa(nodeServerPort), "/", "5"); err != nil {
		t.Errorf("c1 -> node2 %s:%d: %v", c.n2.IP, nodeServerPort, err)
	} else if r.peerIP() != c.c1.IP.String() {
		t.Errorf("node2 saw c1 as %s, want %s (pod-to-node is never masqueraded)", r.peer(), c.c1.IP)
	}

	// Off: the chain goes, and the outside host cannot answer a pod address.
	c.restartAgent(t, ctx, 1, "--masquerade=false")
	if masqChain(t, ctx, c.n1) {
		t.Error("PATCHCORD-MASQ still in node1's nat table with --masquerade=false")
	}
	if r, err := c.runClient(ctx, c.c1, "get", outside, strconv.Itoa(backendTCP), "/", "2"); err == nil {
		t.Errorf("c1 reached the outside host without masquerade: %q (it has no route to pods)", r.Body)
	}

	// On again: back as it was.
	c.restartAgent(t, ctx, 1)
	if !masqChain(t, ctx, c.n1) {
		t.Error("PATCHCORD-MASQ missing from node1's nat table after restarting with masquerade")
	}
	r = c.httpGet(t, ctx, c.c1, outside, backendTCP, "/", 5*time.Second)
	if r.peerIP() != c.n1.IP.String() {
		t.Errorf("outside host saw %s after masquerade came back, want %s", r.peer(), c.n1.IP)
	}
}

// addNodes adds nodes 1 and 2 at once, each with its agent, the primary
// conflist and a route to the service range.
func (c *serviceLab) addNodes(t *testing.T, ctx context.Context) []*lab.Node {
	t.Helper()
	l := c.lab
	nodes := e2e.AddNodes(t, l, 1, 2)
	c.n1, c.n2 = nodes[0], nodes[1]
	c.nodesFile = filepath.Join(l.Dir, "nodes.json")
	e2e.WriteNodes(t, c.nodesFile, e2e.EntryOf(c.n1), e2e.EntryOf(c.n2))
	for _, n := range nodes {
		e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
		c.agents[n.Index] = e2e.StartAgent(t, ctx, n, c.nodesFile, "--routing", string(c.routing))
		// What a real node's default route does for the service range: without a
		// route, the node's own connect() to a ClusterIP fails before OUTPUT's DNAT.
		if out, err := n.Exec(ctx, "ip", "route", "add", serviceRange.String(), "dev", "eth0"); err != nil {
			t.Fatalf("route to service range on %s: %v\n%s", n.NetNS, err, out)
		}
	}

	return nodes
}

// services are the Services of the lab: web on both backends, web-n1 and
// web-n2 on one each, with an http (TCP) and a dns (UDP) port.
func services(b1, b2 *lab.Pod) []kubeproxy.ServicePort {
	ep := func(p *lab.Pod, port int) netip.AddrPort { return netip.AddrPortFrom(p.IP, uint16(port)) }
	service := func(name string, ip netip.Addr, nodePort int, backends ...*lab.Pod) []kubeproxy.ServicePort {
		var tcp, udp []netip.AddrPort
		for _, b := range backends {
			tcp = append(tcp, ep(b, backendTCP))
			udp = append(udp, ep(b, backendUDP))
		}
		// The endpoints cache hands them over sorted.
		slices.SortFunc(tcp, netip.AddrPort.Compare)
		slices.SortFunc(udp, netip.AddrPort.Compare)
		return []kubeproxy.ServicePort{
			{Namespace: "default", Name: name, PortName: "http", Protocol: "tcp", ClusterIP: ip, Port: httpPort, NodePort: nodePort, Endpoints: tcp},
			{Namespace: "default", Name: name, PortName: "dns", Protocol: "udp", ClusterIP: ip, Port: dnsPort, Endpoints: udp},
		}
	}
	return slices.Concat(
		service("web", webIP, nodePortWeb, b1, b2),
		service("web-n1", webN1IP, nodePortWebN1, b1),
		service("web-n2", webN2IP, nodePortWebN2, b2),
	)
}
