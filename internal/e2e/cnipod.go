// Pods wired by cnitool with a runtime config, the example conflists fitted to a
// lab node, clusters of them, and the GC verb as a runtime sends it.
package e2e

import (
	"context"
	"encoding/json"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// Example reads examples/<file> and fits it to node n: every patchcord-cni section gets
// the node's bpffsRoot, every ipam section the node's pod CIDR and IPAM dir; everything
// else stays as users copy it. It returns the network name and the conflist.
func Example(t *testing.T, n *lab.Node, file string) (string, []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(RepoDir(), "examples", file))
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

// CNIPod is a pod namespace wired by cnitool with a runtime config (CAP_ARGS, which
// lab.Node.AddPod does not pass): port mappings, bandwidth.
type CNIPod struct {
	Node                *lab.Node
	Name, NetNS, NSPath string
	Network             string
	CapArgs             string // JSON, "" for none
	CNIPath, Tool       string // CNI_PATH, cnitool
	IP                  netip.Addr
	MAC                 string
	removeNS            func()
}

// chCNIPath is CNI_PATH for cnitool: this run's patchcord-cni, then the reference plugins.
func chCNIPath(t *testing.T) string {
	return strings.Join(append([]string{BinDir()}, CNIPath(t)...), ":")
}

// NewCNIPod makes the pod's namespace ("<node netns>-<name>", so that lab.Sweep knows it),
// which goes away with the test.
func NewCNIPod(t *testing.T, n *lab.Node, name, network string, capArgs any) *CNIPod {
	t.Helper()
	p := &CNIPod{Node: n, Name: name, NetNS: n.NetNS + "-" + name, Network: network, CNIPath: strings.Join(CNIPathWithPlugin(t), ":"), Tool: CNITool(t)}
	p.NSPath = filepath.Join("/var/run/netns", p.NetNS)
	if capArgs != nil {
		b, err := json.Marshal(capArgs)
		if err != nil {
			t.Fatal(err)
		}
		p.CapArgs = string(b)
	}
	if out, err := exec.Command("ip", "netns", "add", p.NetNS).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", p.NetNS, err, out)
	}
	p.removeNS = func() {
		if out, err := exec.Command("ip", "netns", "del", p.NetNS).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
			t.Logf("ip netns del %s: %v: %s", p.NetNS, err, out)
		}
	}
	t.Cleanup(p.removeNS)
	if out, err := exec.Command("ip", "-n", p.NetNS, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", p.NetNS, err, out)
	}
	return p
}

// AddCNIPod makes the pod and runs ADD, failing the test if ADD fails.
func AddCNIPod(t *testing.T, ctx context.Context, n *lab.Node, name, network string, capArgs any) *CNIPod {
	t.Helper()
	p := NewCNIPod(t, n, name, network, capArgs)
	if out, err := p.CNI(ctx, "add"); err != nil {
		t.Fatalf("add pod %s: %v\n%s", name, err, out)
	}
	p.ReadAddr(t, ctx)
	return p
}

// readAddr takes the pod's IPv4 address and MAC from its eth0.
func (p *CNIPod) ReadAddr(t *testing.T, ctx context.Context) {
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
		t.Fatalf("eth0 of pod %s: %v\n%s", p.Name, err, out)
	}
	for _, a := range links[0].AddrInfo {
		if a.Family == "inet" {
			if p.IP, err = netip.ParseAddr(a.Local); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !p.IP.IsValid() {
		t.Fatalf("eth0 of pod %s has no IPv4 address:\n%s", p.Name, out)
	}
	p.MAC = links[0].Address
}

// cni runs `cnitool <verb> <network> <netns>` in the node's namespace with the pod's
// runtime config, and returns its output (stdout and stderr).
func (p *CNIPod) CNI(ctx context.Context, verb string) ([]byte, error) {
	args := []string{"-i", "PATH=" + os.Getenv("PATH"), "CNI_PATH=" + p.CNIPath, "NETCONFPATH=" + p.Node.ConfDir, "CNI_IFNAME=eth0"}
	if p.CapArgs != "" {
		args = append(args, "CAP_ARGS="+p.CapArgs)
	}
	args = append(args, p.Tool, verb, p.Network, p.NSPath)
	return p.Node.Exec(ctx, "env", args...)
}

// del runs DEL and then removes the namespace.
func (p *CNIPod) Del(t *testing.T, ctx context.Context) {
	t.Helper()
	if out, err := p.CNI(ctx, "del"); err != nil {
		t.Fatalf("del pod %s: %v\n%s", p.Name, err, out)
	}
	p.removeNS()
}

// Exec runs a command in the pod's namespace.
func (p *CNIPod) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return p.Node.Exec(ctx, "nsenter", append([]string{"--net=" + p.NSPath, "--", name}, args...)...)
}

// Start runs a background command in the pod's namespace.
func (p *CNIPod) Start(ctx context.Context, name string, args ...string) (*lab.Process, error) {
	return p.Node.Start(ctx, "nsenter", append([]string{"--net=" + p.NSPath, "--", name}, args...)...)
}

// Cluster is a lab of nodes that run agents and have one example conflist installed.
type Cluster struct {
	Lab     *lab.Lab
	Nodes   []*lab.Node
	Network string
}

func NewCluster(t *testing.T, ctx context.Context, example string, count int) *Cluster {
	t.Helper()
	c := &Cluster{Lab: NewLab(t)}
	var entries []nodes.Entry
	for i := 1; i <= count; i++ {
		n, err := c.Lab.AddNode(i)
		if err != nil {
			t.Fatal(err)
		}
		c.Nodes = append(c.Nodes, n)
		entries = append(entries, EntryOf(n))
		var conf []byte
		c.Network, conf = Example(t, n, example)
		if err := n.WriteConflist(c.Network, conf); err != nil {
			t.Fatal(err)
		}
	}
	if count > 1 {
		nodes := filepath.Join(c.Lab.Dir, "nodes.json")
		WriteNodes(t, nodes, entries...)
		for _, n := range c.Nodes {
			StartAgent(t, ctx, n, nodes)
			AssertUplinkBackend(t, ctx, n)
		}
	}
	return c
}

// GC runs the GC verb of every plugin of a conflist in the node's namespace, as a
// runtime does (libcni's GCNetworkList without its cache walk), with the given valid
// attachments (container ID, interface). cnitool gc is no use here: it DELs every cached
// attachment of the network on the machine, other tests' too.
func GC(t *testing.T, ctx context.Context, n *lab.Node, conflist []byte, valid [][2]string) {
	t.Helper()
	var list struct {
		Name    string           `json:"name"`
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(conflist, &list); err != nil {
		t.Fatal(err)
	}
	attachments := []map[string]string{}
	for _, v := range valid {
		attachments = append(attachments, map[string]string{"containerID": v[0], "ifname": v[1]})
	}
	for _, p := range list.Plugins {
		conf := maps.Clone(p)
		// GC is a CNI 1.1 verb; a runtime sends it with 1.1.0 whatever the list says.
		conf["name"], conf["cniVersion"], conf["cni.dev/valid-attachments"] = list.Name, "1.1.0", attachments
		b, err := json.Marshal(conf)
		if err != nil {
			t.Fatal(err)
		}
		typ, _ := p["type"].(string)
		plugin := filepath.Join(CNIPath(t)[0], typ)
		if typ == "patchcord-cni" {
			plugin = filepath.Join(BinDir(), typ)
		}
		out, err := n.Exec(ctx, "sh", "-c", `printf %s "$1" | env -i PATH="$PATH" CNI_COMMAND=GC CNI_PATH="$3" "$2"`,
			"sh", string(b), plugin, strings.Join(CNIPathWithPlugin(t), ":"))
		if err != nil {
			t.Errorf("GC of %s: %v\n%s", typ, err, out)
		}
	}
}

// RemoveNS removes the pod's namespace without a DEL, as when a node
// reboots.
func (p *CNIPod) RemoveNS() { p.removeNS() }

// Ref is what AssertRegistered checks of the pod, its MAC included.
func (p *CNIPod) Ref() PodRef { return PodRef{Name: p.Name, IP: p.IP, NSPath: p.NSPath, MAC: p.MAC} }
