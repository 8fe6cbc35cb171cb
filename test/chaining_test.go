// Chaining end to end: the conflists in examples/ (patchcord-cni as the primary plugin, and
// chained after ptp and after bridge, each followed by portmap and bandwidth; and followed
// by tuning), fitted to lab nodes and driven by cnitool with the runtime config a kubelet
// would pass (CAP_ARGS). They show that pods reach each other over the fast path in every
// mode, that traffic patchcord hands on (to the node, to a bridge port, to a shaped pod)
// still flows, that hostPorts reach pods from the node and from another node, that
// bandwidth limits hold, that tuning's sysctls land, that STATUS, CHECK, GC and VERSION
// answer, and that DEL leaves nothing of any plugin behind.
package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/internal/lab"
)

// chMode is one of the example conflists.
type chMode struct {
	name    string // subtest name
	example string // file in examples/
	veth    string // prefix of the host veths of its pods
	// bridge is the bridge the first plugin attaches pods to ("" for none): it, and the
	// route to the pod CIDR through it, stay after the last pod goes.
	bridge string
	// primary: patchcord-cni runs IPAM, so its GC releases leases too.
	primary bool
}

var chModes = []chMode{
	{name: "primary", example: "05-patchcord.conflist", veth: "pc", primary: true},
	{name: "chained-ptp", example: "05-patchcord-ptp.conflist", veth: "veth"},
	{name: "chained-bridge", example: "05-patchcord-bridge.conflist", veth: "veth", bridge: "cni0"},
}

// chRepoDir is the root of this repository.
func chRepoDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// chExample reads examples/<file> and fits it to node n: every patchcord-cni section gets
// the node's bpffsRoot, every ipam section the node's pod CIDR and IPAM dir; everything
// else stays as users copy it. It returns the network name and the conflist.
func chExample(t *testing.T, n *lab.Node, file string) (string, []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chRepoDir(), "examples", file))
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(b, &conf); err != nil {
		t.Fatalf("examples/%s: %v", file, err)
	}
	name, _ := conf["name"].(string)
	plugins, _ := conf["plugins"].([]any)
	// 1.0.0, not 1.1.0: containerd 1.6 and 1.7 (libcni 1.1) cannot read a 1.1.0 result.
	if name == "" || len(plugins) == 0 || conf["cniVersion"] != "1.0.0" {
		t.Fatalf("examples/%s: want a conflist with cniVersion 1.0.0, a name and plugins", file)
	}
	patchcord := false
	for _, p := range plugins {
		plugin, _ := p.(map[string]any)
		if plugin["type"] == "patchcord-cni" {
			patchcord = true
			if plugin["bpffsRoot"] != "/sys/fs/bpf/patchcord" {
				t.Errorf("examples/%s: patchcord-cni bpffsRoot %v, want the default /sys/fs/bpf/patchcord", file, plugin["bpffsRoot"])
			}
			plugin["bpffsRoot"] = n.BpffsRoot
		}
		if ipam, ok := plugin["ipam"].(map[string]any); ok {
			ipam["ranges"] = [][]map[string]string{{{"subnet": n.PodCIDR.String()}}}
			ipam["dataDir"] = n.IPAMDir
		}
	}
	if !patchcord {
		t.Fatalf("examples/%s has no patchcord-cni", file)
	}
	out, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return name, out
}

// chPod is a pod namespace wired by cnitool with a runtime config (CAP_ARGS, which
// lab.Node.AddPod does not pass): port mappings, bandwidth.
type chPod struct {
	node                *lab.Node
	name, netns, nsPath string
	network             string
	capArgs             string // JSON, "" for none
	cniPath, tool       string // CNI_PATH, cnitool
	ip                  netip.Addr
	mac                 string
	removeNS            func()
}

// chCNIPath is CNI_PATH for cnitool: this run's patchcord-cni, then the reference plugins.
func chCNIPath(t *testing.T) string {
	return strings.Join(append([]string{binDir}, cniPath(t)...), ":")
}

// chNewPod makes the pod's namespace ("<node netns>-<name>", so that lab.Sweep knows it),
// which goes away with the test.
func chNewPod(t *testing.T, n *lab.Node, name, network string, capArgs any) *chPod {
	t.Helper()
	p := &chPod{node: n, name: name, netns: n.NetNS + "-" + name, network: network, cniPath: chCNIPath(t), tool: cnitool(t)}
	p.nsPath = filepath.Join("/var/run/netns", p.netns)
	if capArgs != nil {
		b, err := json.Marshal(capArgs)
		if err != nil {
			t.Fatal(err)
		}
		p.capArgs = string(b)
	}
	if out, err := exec.Command("ip", "netns", "add", p.netns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", p.netns, err, out)
	}
	p.removeNS = func() {
		if out, err := exec.Command("ip", "netns", "del", p.netns).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
			t.Logf("ip netns del %s: %v: %s", p.netns, err, out)
		}
	}
	t.Cleanup(p.removeNS)
	if out, err := exec.Command("ip", "-n", p.netns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", p.netns, err, out)
	}
	return p
}

// chAddPod makes the pod and runs ADD, failing the test if ADD fails.
func chAddPod(t *testing.T, ctx context.Context, n *lab.Node, name, network string, capArgs any) *chPod {
	t.Helper()
	p := chNewPod(t, n, name, network, capArgs)
	if out, err := p.cni(ctx, "add"); err != nil {
		t.Fatalf("add pod %s: %v\n%s", name, err, out)
	}
	p.readAddr(t, ctx)
	return p
}

// readAddr takes the pod's IPv4 address and MAC from its eth0.
func (p *chPod) readAddr(t *testing.T, ctx context.Context) {
	t.Helper()
	out, err := p.Exec(ctx, "ip", "-j", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var links []struct {
		Address  string `json:"address"`
		AddrInfo []struct {
			Family string `json:"family"`
			Local  string `json:"local"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		t.Fatalf("eth0 of pod %s: %v\n%s", p.name, err, out)
	}
	for _, a := range links[0].AddrInfo {
		if a.Family == "inet" {
			if p.ip, err = netip.ParseAddr(a.Local); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !p.ip.IsValid() {
		t.Fatalf("eth0 of pod %s has no IPv4 address:\n%s", p.name, out)
	}
	p.mac = links[0].Address
}

// cni runs `cnitool <verb> <network> <netns>` in the node's namespace with the pod's
// runtime config, and returns its output (stdout and stderr).
func (p *chPod) cni(ctx context.Context, verb string) ([]byte, error) {
	args := []string{"-i", "PATH=" + os.Getenv("PATH"), "CNI_PATH=" + p.cniPath, "NETCONFPATH=" + p.node.ConfDir, "CNI_IFNAME=eth0"}
	if p.capArgs != "" {
		args = append(args, "CAP_ARGS="+p.capArgs)
	}
	args = append(args, p.tool, verb, p.network, p.nsPath)
	return p.node.Exec(ctx, "env", args...)
}

// del runs DEL and then removes the namespace.
func (p *chPod) del(t *testing.T, ctx context.Context) {
	t.Helper()
	if out, err := p.cni(ctx, "del"); err != nil {
		t.Fatalf("del pod %s: %v\n%s", p.name, err, out)
	}
	p.removeNS()
}

// Exec runs a command in the pod's namespace.
func (p *chPod) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return p.node.Exec(ctx, "nsenter", append([]string{"--net=" + p.nsPath, "--", name}, args...)...)
}

// Start runs a background command in the pod's namespace.
func (p *chPod) Start(ctx context.Context, name string, args ...string) (*lab.Process, error) {
	return p.node.Start(ctx, "nsenter", append([]string{"--net=" + p.nsPath, "--", name}, args...)...)
}

// chCluster is a lab of nodes that run agents and have one example conflist installed.
type chCluster struct {
	lab     *lab.Lab
	nodes   []*lab.Node
	network string
}

func chNewCluster(t *testing.T, ctx context.Context, example string, count int) *chCluster {
	t.Helper()
	c := &chCluster{lab: newLab(t)}
	var entries []nodeEntry
	for i := 1; i <= count; i++ {
		n, err := c.lab.AddNode(i)
		if err != nil {
			t.Fatal(err)
		}
		c.nodes = append(c.nodes, n)
		entries = append(entries, entryOf(n))
		var conf []byte
		c.network, conf = chExample(t, n, example)
		if err := n.WriteConflist(c.network, conf); err != nil {
			t.Fatal(err)
		}
	}
	if count > 1 {
		nodes := filepath.Join(c.lab.Dir, "nodes.json")
		writeNodes(t, nodes, entries...)
		for _, n := range c.nodes {
			startAgent(t, ctx, n, nodes)
		}
	}
	return c
}

// chIperf runs an iperf3 client in from against dst:port with extra args (-t 2, -R) and
// returns the received rate in bit/s and the bytes moved.
func chIperf(t *testing.T, ctx context.Context, from execer, dst string, port int, extra ...string) (float64, uint64) {
	t.Helper()
	r, err := chIperfErr(ctx, from, dst, port, extra...)
	if err != nil {
		t.Fatal(err)
	}
	return r.BitsPerSecond, r.Bytes
}

// chIperfResult is what iperf3 -J says was received.
type chIperfResult struct {
	Bytes         uint64  `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
}

// chIperfErr is chIperf that returns its error.
func chIperfErr(ctx context.Context, from execer, dst string, port int, extra ...string) (chIperfResult, error) {
	args := append([]string{"-c", dst, "-p", fmt.Sprint(port), "-J", "--connect-timeout", "5000"}, extra...)
	out, err := from.Exec(ctx, "iperf3", args...)
	var r struct {
		End struct {
			SumReceived chIperfResult `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	jerr := json.Unmarshal(out, &r)
	switch {
	case r.Error != "":
		return chIperfResult{}, fmt.Errorf("iperf3 to %s:%d: %s", dst, port, r.Error)
	case err != nil || jerr != nil || r.End.SumReceived.Bytes == 0:
		return chIperfResult{}, fmt.Errorf("iperf3 to %s:%d: %v %v\n%s", dst, port, err, jerr, out)
	}
	return r.End.SumReceived, nil
}

// chServe starts a persistent iperf3 server on port in the pod.
func chServe(t *testing.T, ctx context.Context, p *chPod, port int) {
	t.Helper()
	s, err := p.Start(ctx, "iperf3", "-s", "-p", fmt.Sprint(port))
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(ctx, fmt.Sprintf("iperf3 on %s:%d", p.name, port), func(ctx context.Context) error {
		select {
		case <-s.Done():
			out, _ := s.Output()
			return fmt.Errorf("iperf3 server exited: %s", out)
		default:
		}
		out, err := p.Exec(ctx, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if err != nil || len(strings.TrimSpace(string(out))) == 0 {
			return fmt.Errorf("not listening: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// Bandwidth limit of the shaped pods, bit/s both ways, and what a measurement may reach.
const (
	chRate     = 50_000_000
	chRateMax  = 70_000_000
	chBurst    = 1_000_000 // bits
	chFreeRate = 2 * chRate
)

// TestChaining runs, for each example conflist, pods on two nodes with agents: a plain
// pod a, a pod web with hostPort 8080 to its port 80, and a pod slow limited to 50 Mbit/s
// both ways on node 1; a plain pod b on node 2.
func TestChaining(t *testing.T) {
	for _, m := range chModes {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			c := chNewCluster(t, ctx, m.example, 2)
			n1, n2 := c.nodes[0], c.nodes[1]

			t.Run("status", func(t *testing.T) {
				chStatus(t, ctx, n1, c.network, m.example)
			})

			a := chAddPod(t, ctx, n1, "a", c.network, nil)
			web := chAddPod(t, ctx, n1, "web", c.network, map[string]any{
				"portMappings": []map[string]any{{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}},
			})
			slow := chAddPod(t, ctx, n1, "slow", c.network, map[string]any{
				"bandwidth": map[string]int{"ingressRate": chRate, "ingressBurst": chBurst, "egressRate": chRate, "egressBurst": chBurst},
			})
			b := chAddPod(t, ctx, n2, "b", c.network, nil)
			pods := []*chPod{a, web, slow, b}
			for _, p := range pods {
				if !p.node.PodCIDR.Contains(p.ip) {
					t.Fatalf("pod %s got %s, outside %s", p.name, p.ip, p.node.PodCIDR)
				}
			}
			chAssertRegistered(t, ctx, n1, m, a, web, slow)
			chAssertRegistered(t, ctx, n2, m, b)

			t.Run("ping", func(t *testing.T) {
				before := stats(t, ctx, n1)
				const count = 10
				for _, pair := range [][2]*chPod{{a, web}, {web, a}} {
					if err := pingErr(ctx, pair[0], pair[1].ip.String(), count, "0.01"); err != nil {
						t.Error(err)
					}
				}
				after := stats(t, ctx, n1)
				// Each request and reply is redirected once on the node.
				if got := after["local_redirect"].Packets - before["local_redirect"].Packets; got < 4*count {
					t.Errorf("local_redirect grew by %d for %d pings each way between a and web: want at least %d (the fast path)", got, count, 4*count)
				}
				// Across nodes, both ways; to and from the node; to the shaped pod,
				// which patchcord hands to the host stack (on the bridge, to the
				// bridge's forwarding).
				ping(t, ctx, a, b.ip.String())
				ping(t, ctx, b, a.ip.String())
				ping(t, ctx, a, n1.IP.String())
				ping(t, ctx, n1, a.ip.String())
				ping(t, ctx, a, slow.ip.String())
				ping(t, ctx, slow, a.ip.String())
				ping(t, ctx, b, slow.ip.String())
				if m.bridge != "" {
					// The pod's gateway is the bridge's address.
					ping(t, ctx, a, chDefaultGateway(t, ctx, a))
				}
			})

			t.Run("portmap", func(t *testing.T) {
				chServe(t, ctx, web, 80)
				hostPort := n1.IP.String()
				for _, from := range []struct {
					name string
					e    execer
				}{{"node1", n1}, {"node2", n2}, {"pod b on node2", b}, {"pod a on node1", a}} {
					if _, err := chIperfErr(ctx, from.e, hostPort, 8080, "-n", "256K"); err != nil {
						t.Errorf("from %s to web through hostPort %s:8080: %v", from.name, hostPort, err)
					}
				}
			})

			t.Run("bandwidth", func(t *testing.T) {
				chServe(t, ctx, slow, 5201)
				before := stats(t, ctx, n1)
				in, moved := chIperf(t, ctx, a, slow.ip.String(), 5201, "-t", "2")
				out, movedOut := chIperf(t, ctx, a, slow.ip.String(), 5201, "-t", "2", "-R")
				after := stats(t, ctx, n1)
				t.Logf("into slow %.1f Mbit/s, out of slow %.1f Mbit/s (limit %d)", in/1e6, out/1e6, chRate/1_000_000)
				if in > chRateMax {
					t.Errorf("into the shaped pod: %.1f Mbit/s, limit %d Mbit/s: its ingress limit does not apply", in/1e6, chRate/1_000_000)
				}
				if out > chRateMax {
					t.Errorf("out of the shaped pod: %.1f Mbit/s, limit %d Mbit/s: its egress limit does not apply", out/1e6, chRate/1_000_000)
				}
				if got := after["local_redirect"].Bytes - before["local_redirect"].Bytes; got > (moved+movedOut)/10 {
					t.Errorf("local_redirect grew by %d bytes while %d went to and from the shaped pod: it took the fast path past its qdiscs", got, moved+movedOut)
				}
				// Two pods of the same node without a limit.
				free, _ := chIperf(t, ctx, a, web.ip.String(), 80, "-t", "1")
				t.Logf("unshaped a -> web %.1f Mbit/s", free/1e6)
				if free < chFreeRate {
					t.Errorf("unshaped a -> web: %.1f Mbit/s, want above %d Mbit/s", free/1e6, chFreeRate/1_000_000)
				}
			})

			t.Run("check", func(t *testing.T) {
				for _, p := range pods {
					if out, err := p.cni(ctx, "check"); err != nil {
						t.Errorf("check pod %s: %v\n%s", p.name, err, out)
					}
				}
				// A pod whose MAC changed fails CHECK, and says why.
				if _, err := a.Exec(ctx, "ip", "link", "set", "eth0", "address", "02:00:5e:00:53:02"); err != nil {
					t.Fatal(err)
				}
				out, err := a.cni(ctx, "check")
				if _, rerr := a.Exec(ctx, "ip", "link", "set", "eth0", "address", a.mac); rerr != nil {
					t.Fatal(rerr)
				}
				if err == nil || !strings.Contains(strings.ToLower(string(out)), "mac") {
					t.Errorf("check of a pod with a new MAC: want an error naming the MAC, got %v\n%s", err, out)
				}
			})

			t.Run("gc", func(t *testing.T) {
				// GC on node n with the attachments the runtime still knows there.
				gc := func(n *lab.Node, valid ...*chPod) {
					t.Helper()
					conflist, err := os.ReadFile(filepath.Join(n.ConfDir, c.network+".conflist"))
					if err != nil {
						t.Fatal(err)
					}
					eps := endpoints(t, ctx, n)
					var attachments [][2]string
					for _, p := range valid {
						attachments = append(attachments, [2]string{eps[p.ip.String()].ContainerID, "eth0"})
					}
					rtGC(t, ctx, n, conflist, attachments)
				}
				// Every pod valid: GC changes nothing.
				gc(n1, a, web, slow)
				gc(n2, b)
				chAssertRegistered(t, ctx, n1, m, a, web, slow)
				chAssertRegistered(t, ctx, n2, m, b)
				ping(t, ctx, a, web.ip.String())
				// The runtime forgot slow: its endpoint and link go, and in primary
				// mode its lease; the others stay. When chained, the veth and lease
				// are the first plugin's (ptp and bridge have no GC in plugins
				// v1.10) and go with its DEL.
				gc(n1, a, web)
				chAssertRegistered(t, ctx, n1, m, a, web)
				if _, ok := endpoints(t, ctx, n1)[slow.ip.String()]; ok {
					t.Errorf("GC kept the endpoint of pod slow, which is not among the valid attachments")
				}
				if pins, _ := os.ReadDir(filepath.Join(n1.BpffsRoot, "links", "from_pod")); len(pins) != 2 {
					t.Errorf("%d from_pod links pinned after GC, want 2 (a and web)", len(pins))
				}
				if _, err := os.Stat(filepath.Join(n1.IPAMDir, c.network, slow.ip.String())); err == nil && m.primary {
					t.Errorf("GC kept the address lease of pod slow")
				}
				ping(t, ctx, a, web.ip.String())
				ping(t, ctx, b, a.ip.String())
			})

			t.Run("del", func(t *testing.T) {
				// DEL after GC, as a runtime may send it, succeeds too.
				for _, p := range pods {
					p.del(t, ctx)
				}
				for _, n := range c.nodes {
					chAssertClean(t, ctx, n, c.network, m.bridge)
				}
			})
		})
	}
}

// chDefaultGateway is the gateway of a pod's default route.
func chDefaultGateway(t *testing.T, ctx context.Context, p execer) string {
	t.Helper()
	out, err := p.Exec(ctx, "ip", "-j", "-4", "route", "show", "default")
	if err != nil {
		t.Fatal(err)
	}
	var routes []struct {
		Gateway string `json:"gateway"`
	}
	if err := json.Unmarshal(out, &routes); err != nil || len(routes) != 1 || routes[0].Gateway == "" {
		t.Fatalf("default route: %v\n%s", err, out)
	}
	return routes[0].Gateway
}

// chStatus checks STATUS through cnitool: ready on the node (loading the datapath if it
// is not yet), and not ready, with what to do, when bpffsRoot is on no bpffs. STATUS is a
// CNI 1.1 verb: libcni runs it only for 1.1.0 conflists, so it runs on 1.1.0 copies of the
// example.
func chStatus(t *testing.T, ctx context.Context, n *lab.Node, network, example string) {
	t.Helper()
	for _, tc := range []struct {
		name, bpffsRoot, want string
	}{
		{"ready", n.BpffsRoot, ""},
		{"no-bpffs", filepath.Join(n.Lab.Dir, "not-bpffs", "patchcord"), "mount -t bpf"},
	} {
		_, b := chExample(t, n, example)
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
		probe := &chPod{node: n, network: copyName, nsPath: "/var/run/netns/" + n.NetNS, cniPath: chCNIPath(t), tool: cnitool(t)}
		out, err := probe.cni(ctx, "status")
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

// chAssertRegistered checks that each pod has its endpoint on a host veth of the mode's
// kind with from_pod pinned to it.
func chAssertRegistered(t *testing.T, ctx context.Context, n *lab.Node, m chMode, pods ...*chPod) {
	t.Helper()
	eps := endpoints(t, ctx, n)
	for _, p := range pods {
		ep, ok := eps[p.ip.String()]
		switch {
		case !ok:
			t.Errorf("pod %s (%s) has no endpoint", p.name, p.ip)
			continue
		case ep.Netns != p.nsPath || ep.PodIfname != "eth0" || ep.MAC != p.mac:
			t.Errorf("endpoint %s is %s/%s in %s, want eth0 %s in %s", p.ip, ep.PodIfname, ep.MAC, ep.Netns, p.mac, p.nsPath)
		case !strings.HasPrefix(ep.Ifname, m.veth):
			t.Errorf("endpoint %s is on host veth %q, want a %s* veth", p.ip, ep.Ifname, m.veth)
		}
		if _, err := os.Stat(filepath.Join(n.BpffsRoot, "links", "from_pod", ep.Ifname)); err != nil {
			t.Errorf("from_pod link of pod %s: %v", p.name, err)
		}
	}
}

// chLeftovers lists what the node holds of pods other than keep (by address): links
// other than lo, eth0, the bridge and keep's veths; routes into the pod CIDR other than
// keep's and the bridge's; entries in each endpoint map; pinned from_pod links; address
// leases of network; portmap chains; the network's cached results in cacheDir (if set).
func chLeftovers(t *testing.T, ctx context.Context, n *lab.Node, network, bridge string, keep ...netip.Addr) []string {
	t.Helper()
	var left []string
	keepIP := map[string]bool{}
	keepVeth := map[string]bool{}
	eps := endpoints(t, ctx, n)
	for _, ip := range keep {
		keepIP[ip.String()] = true
		if ep, ok := eps[ip.String()]; ok {
			keepVeth[ep.Ifname] = true
		}
	}

	out, err := n.Exec(ctx, "ip", "-j", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	var links []struct {
		Ifname string `json:"ifname"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		t.Fatalf("ip -j link: %v\n%s", err, out)
	}
	for _, l := range links {
		if l.Ifname != "lo" && l.Ifname != "eth0" && (bridge == "" || l.Ifname != bridge) && !keepVeth[l.Ifname] {
			left = append(left, "link "+l.Ifname)
		}
	}

	out, err = n.Exec(ctx, "ip", "-j", "-4", "route", "show", "table", "all")
	if err != nil {
		t.Fatal(err)
	}
	var routes []struct {
		Dst   string `json:"dst"`
		Dev   string `json:"dev"`
		Table string `json:"table"`
	}
	if err := json.Unmarshal(out, &routes); err != nil {
		t.Fatalf("ip -j route: %v\n%s", err, out)
	}
	for _, r := range routes {
		dst, err := netip.ParsePrefix(r.Dst)
		if err != nil {
			a, aerr := netip.ParseAddr(r.Dst)
			if aerr != nil {
				continue // "default"
			}
			dst = netip.PrefixFrom(a, 32)
		}
		if !n.PodCIDR.Overlaps(dst) || (bridge != "" && r.Dev == bridge) || keepVeth[r.Dev] {
			continue
		}
		left = append(left, fmt.Sprintf("route %s dev %s table %s", r.Dst, r.Dev, r.Table))
	}

	// Every map, not just what `bpf endpoint list` shows: an ADD killed between its
	// writes leaves entries in some only.
	for _, name := range []string{"endpoints", "ep_by_ifindex", "ep_meta"} {
		keys, err := chMapKeys(filepath.Join(n.BpffsRoot, "maps", name))
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) > len(keep) {
			shown := keys
			if len(shown) > 8 {
				shown = append(shown[:8:8], "...")
			}
			left = append(left, fmt.Sprintf("map %s: %d entries %v, want %d", name, len(keys), shown, len(keep)))
		}
	}

	pinDir := filepath.Join(n.BpffsRoot, "links", "from_pod")
	pins, err := os.ReadDir(pinDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range pins {
		if !keepVeth[e.Name()] {
			left = append(left, "pinned link "+filepath.Join(pinDir, e.Name()))
		}
	}

	leaseDir := filepath.Join(n.IPAMDir, network)
	leases, err := os.ReadDir(leaseDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range leases {
		if a, err := netip.ParseAddr(e.Name()); err == nil && !keepIP[a.String()] {
			left = append(left, "lease "+filepath.Join(leaseDir, e.Name()))
		}
	}

	out, err = n.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, ":CNI-DN-") {
			left = append(left, "portmap chain "+strings.Fields(line)[0][1:])
		}
	}
	return left
}

// chMapKeys lists the keys of a pinned map; 4-byte keys (the maps keyed by IPv4) are shown
// as addresses.
func chMapKeys(pin string) ([]string, error) {
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open map %s: %w", pin, err)
	}
	defer m.Close()
	var keys []string
	var prev any // nil: the first key
	for {
		k, err := m.NextKeyBytes(prev)
		if err != nil {
			return nil, fmt.Errorf("iterate map %s: %w", pin, err)
		}
		if k == nil {
			break
		}
		if len(k) == 4 && !strings.HasSuffix(pin, "ep_by_ifindex") {
			keys = append(keys, netip.AddrFrom4([4]byte(k)).String())
		} else {
			keys = append(keys, fmt.Sprintf("%x", k))
		}
		prev = k
	}
	slices.Sort(keys)
	return keys, nil
}

// chAssertClean fails the test for everything chLeftovers finds.
func chAssertClean(t *testing.T, ctx context.Context, n *lab.Node, network, bridge string, keep ...netip.Addr) {
	t.Helper()
	for _, l := range chLeftovers(t, ctx, n, network, bridge, keep...) {
		t.Errorf("node %d: %s left behind", n.Index, l)
	}
}

// TestChainingTuning runs the tuning example: tuning after patchcord-cni sets its sysctl in
// every pod, and the pods still take the fast path and pass CHECK.
func TestChainingTuning(t *testing.T) {
	ctx := testCtx(t)
	c := chNewCluster(t, ctx, "05-patchcord-tuning.conflist", 1)
	n := c.nodes[0]
	x := chAddPod(t, ctx, n, "x", c.network, nil)
	y := chAddPod(t, ctx, n, "y", c.network, nil)
	for _, p := range []*chPod{x, y} {
		out, err := p.Exec(ctx, "cat", "/proc/sys/net/core/somaxconn")
		if err != nil || strings.TrimSpace(string(out)) != "1024" {
			t.Errorf("net.core.somaxconn in pod %s: %v %q, want 1024 (set by tuning)", p.name, err, out)
		}
	}
	if out, err := n.Exec(ctx, "cat", "/proc/sys/net/core/somaxconn"); err != nil || strings.TrimSpace(string(out)) == "1024" {
		t.Errorf("net.core.somaxconn on the node: %v %q: tuning must change the pod only", err, out)
	}
	before := stats(t, ctx, n)
	if err := pingErr(ctx, x, y.ip.String(), 10, "0.01"); err != nil {
		t.Fatal(err)
	}
	after := stats(t, ctx, n)
	if got := after["local_redirect"].Packets - before["local_redirect"].Packets; got < 20 {
		t.Errorf("local_redirect grew by %d for 10 pings: want at least 20 (the fast path)", got)
	}
	for _, p := range []*chPod{x, y} {
		if out, err := p.cni(ctx, "check"); err != nil {
			t.Errorf("check pod %s: %v\n%s", p.name, err, out)
		}
		p.del(t, ctx)
	}
	chAssertClean(t, ctx, n, c.network, "")
}

// TestChainingVersion asks the plugin for its versions, as a runtime does before ADD.
func TestChainingVersion(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the plugin is built by TestMain only as root")
	}
	cmd := exec.Command(filepath.Join(binDir, "patchcord-cni"))
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
