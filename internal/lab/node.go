// Emulated nodes: one namespace each, an uplink into the fabric, and everything a real
// node keeps for itself (bpffs, CNI config dir, IPAM state) in the lab's directory.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Node is an emulated Kubernetes node (lab address plan: node N has 198.18.0.N/24 on its
// uplink eth0 and pod CIDR 10.244.N.0/24).
type Node struct {
	Lab   *Lab
	Index int
	// NetNS is the namespace name, NSPath its path for nsenter, cnitool and ns.GetNS.
	NetNS, NSPath string
	// IP is the uplink address, PodCIDR the range host-local hands out on this node.
	IP      netip.Addr
	PodCIDR netip.Prefix
	// BpffsRoot is the patchcord pin root (the plugin and agent create it) inside this
	// node's own bpffs, which is mounted at its parent.
	BpffsRoot string
	// ConfDir holds the conflists (NETCONFPATH), IPAMDir host-local's dataDir.
	ConfDir, IPAMDir string
}

// AddNode creates node i (1..254): its namespace "<Prefix>-n<i>" with lo up and
// ip_forward=1, the uplink eth0 into the fabric (created with the first node), the bpffs
// mount and the conf and IPAM directories. On error nothing of the node remains.
func (l *Lab) AddNode(i int) (_ *Node, err error) {
	if err := l.reserve(i); err != nil {
		return nil, err
	}
	n := l.newNode(i)
	var created []func() error // undo steps, run in reverse on error
	defer func() {
		if err == nil {
			return
		}
		for _, undo := range slices.Backward(created) {
			if uerr := undo(); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
		l.mu.Lock()
		delete(l.nodes, i)
		l.mu.Unlock()
		err = fmt.Errorf("add node %d: %w", i, err)
	}()
	if err := l.buildNode(n, &created); err != nil {
		return nil, err
	}

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, ErrClosed
	}
	l.nodes[i] = n
	l.mu.Unlock()
	l.log.Info("node added", "node", i, "netns", n.NetNS, "ip", n.IP, "bpffs", filepath.Dir(n.BpffsRoot))
	return n, nil
}

// reserve claims node index i with a placeholder, which holds it while the
// lock is dropped for the slow work.
func (l *Lab) reserve(i int) error {
	if i < 1 || i > 254 {
		return fmt.Errorf("add node %d: index out of 1..254", i)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("add node %d: %w", i, ErrClosed)
	}
	if _, ok := l.nodes[i]; ok {
		return fmt.Errorf("add node %d: exists", i)
	}
	l.nodes[i] = nil
	return nil
}

// newNode is node i of the lab plan: names, addresses and directories.
func (l *Lab) newNode(i int) *Node {
	dir := filepath.Join(l.Dir, fmt.Sprintf("n%d", i))
	n := &Node{
		Lab:       l,
		Index:     i,
		NetNS:     fmt.Sprintf("%s-n%d", l.Prefix, i),
		IP:        netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}),
		PodCIDR:   netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
		BpffsRoot: filepath.Join(dir, "bpffs", "patchcord"),
		ConfDir:   filepath.Join(dir, "net.d"),
		IPAMDir:   filepath.Join(dir, "ipam"),
	}
	n.NSPath = filepath.Join(netnsDir, n.NetNS)
	return n
}

// buildNode makes n's namespace, uplink, directories and bpffs, appending
// to created how to undo each step as soon as it may have happened.
func (l *Lab) buildNode(n *Node, created *[]func() error) error {
	if err := l.ensureFabric(); err != nil {
		return err
	}
	if _, err := l.addNetns(n.NetNS); err != nil {
		return err
	}
	*created = append(*created, func() error { return l.removeNetns(n.NetNS) })
	// The namespace takes the veth with it only when the kernel gets round to destroying
	// it; a retried AddNode(i) would find the old port still on br0.
	port := fmt.Sprintf("n%d", n.Index)
	*created = append(*created, func() error { return deleteLink(l.fabricPath(), port) })
	addr := netip.PrefixFrom(n.IP, 24)
	if err := setupUplink(l.fabricPath(), n.NSPath, port, addr); err != nil {
		return err
	}
	if err := setSysctls(n.NSPath, map[string]string{"net/ipv4/ip_forward": "1"}, false); err != nil {
		return err
	}
	for _, d := range []string{filepath.Join(l.Dir, fmt.Sprintf("n%d", n.Index)), n.ConfDir, n.IPAMDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("make node dir: %w", err)
		}
	}
	mnt := filepath.Dir(n.BpffsRoot)
	*created = append(*created, func() error { return l.unmountBpffs(mnt) })
	return l.mountBpffs(mnt)
}

// ensureFabric creates the fabric namespace and its bridge once; concurrent AddNode calls
// wait on fabricMu for the first to finish, and retry if it failed.
func (l *Lab) ensureFabric() error {
	l.fabricMu.Lock()
	defer l.fabricMu.Unlock()
	l.mu.Lock()
	done := l.fabric != ""
	l.mu.Unlock()
	if done {
		return nil
	}
	name := l.Prefix + "-fabric"
	path, err := l.addNetns(name)
	if err != nil {
		return fmt.Errorf("make fabric: %w", err)
	}
	if err := setupFabric(path); err != nil {
		return fmt.Errorf("make fabric: %w", errors.Join(err, l.removeNetns(name)))
	}
	l.mu.Lock()
	l.fabric = name
	l.mu.Unlock()
	return nil
}

func (l *Lab) fabricPath() string {
	return filepath.Join(netnsDir, l.FabricNS())
}

// Exec runs a command in the node's namespace and returns its combined output; the error
// includes that output.
func (n *Node) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return n.Lab.exec(ctx, n.NetNS, name, args...)
}

// Start runs a command in the background in the node's namespace (an agent, an iperf3
// server). Its output goes to a log file in the lab directory; it is stopped when ctx ends
// or the lab closes.
func (n *Node) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return n.Lab.start(ctx, n.NetNS, name, args...)
}

// CLI runs the patchcord CLI against this node's pin root, in the node's namespace.
func (n *Node) CLI(ctx context.Context, args ...string) ([]byte, error) {
	if n.Lab.opts.BinDir == "" {
		return nil, errors.New("run patchcord: lab has no BinDir")
	}
	return n.Exec(ctx, n.Lab.Bin("patchcord"), append([]string{"--bpffs-root", n.BpffsRoot}, args...)...)
}

// WaitListening returns once something listens on TCP port in the node's namespace,
// e.g. an iperf3 server started with Start.
func (n *Node) WaitListening(ctx context.Context, port int) error {
	return n.Lab.waitListening(ctx, n.NetNS, port, nil)
}

// WriteConflist writes <ConfDir>/<name>.conflist, where cnitool looks up networks by the
// "name" inside, not by file name.
func (n *Node) WriteConflist(name string, conf []byte) error {
	if name == "" || strings.ContainsRune(name, '/') {
		return fmt.Errorf("write conflist %q: bad name", name)
	}
	if !json.Valid(conf) {
		return fmt.Errorf("write conflist %s: not JSON", name)
	}
	conf, err := forceAttachMode(conf)
	if err != nil {
		return fmt.Errorf("write conflist %s: %w", name, err)
	}
	if err := os.WriteFile(filepath.Join(n.ConfDir, name+".conflist"), conf, 0o644); err != nil {
		return fmt.Errorf("write conflist %s: %w", name, err)
	}
	return nil
}

// AttachModeEnv, when set (to tcx or tc), forces patchcord's attach mode
// on every lab node: in each conflist WriteConflist writes and in the
// agent's flags (e2e.AgentArgs), so that `make test` runs the lab suites
// once more with the tc backend on a kernel that has tcx.
const AttachModeEnv = "PATCHCORD_TEST_ATTACH_MODE"

// forceAttachMode sets attachMode on conf's patchcord-cni plugins when
// AttachModeEnv asks for one.
func forceAttachMode(conf []byte) ([]byte, error) {
	mode := os.Getenv(AttachModeEnv)
	if mode == "" {
		return conf, nil
	}
	return WithAttachMode(conf, mode)
}

// WithAttachMode sets attachMode on the conflist's patchcord-cni plugins.
func WithAttachMode(conf []byte, mode string) ([]byte, error) {
	var list map[string]any
	if err := json.Unmarshal(conf, &list); err != nil {
		return nil, err
	}
	plugins, _ := list["plugins"].([]any)
	for _, p := range plugins {
		if plugin, ok := p.(map[string]any); ok && plugin["type"] == "patchcord-cni" {
			plugin["attachMode"] = mode
		}
	}
	return json.Marshal(list)
}

type ipamConf struct {
	Type    string        `json:"type"`
	Ranges  [][]ipamRange `json:"ranges"`
	Routes  []ipamRoute   `json:"routes,omitempty"`
	DataDir string        `json:"dataDir"`
}

type ipamRoute struct {
	Dst string `json:"dst"`
}

type ipamRange struct {
	Subnet string `json:"subnet"`
}

func (n *Node) ipam() *ipamConf {
	return &ipamConf{Type: "host-local", Ranges: [][]ipamRange{{{Subnet: n.PodCIDR.String()}}}, DataDir: n.IPAMDir}
}

// ptpIPAM adds the default route: ptp installs only the routes IPAM returns,
// and without it a pod reaches nothing beyond its subnet.
func (n *Node) ptpIPAM() *ipamConf {
	c := n.ipam()
	c.Routes = []ipamRoute{{Dst: "0.0.0.0/0"}}
	return c
}

func conflist(name string, plugins ...any) []byte {
	b, err := json.Marshal(struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
		Plugins    []any  `json:"plugins"`
	}{"1.1.0", name, plugins})
	if err != nil {
		panic(err) // only fixed types above: cannot fail
	}
	return b
}

// PrimaryConflist is network "patchcord": patchcord-cni creates the veth itself, with
// host-local IPAM over the node's pod CIDR.
func (n *Node) PrimaryConflist() []byte {
	return conflist("patchcord", struct {
		Type      string    `json:"type"`
		BpffsRoot string    `json:"bpffsRoot"`
		IPAM      *ipamConf `json:"ipam"`
	}{"patchcord-cni", n.BpffsRoot, n.ipam()})
}

// ChainedPTPConflist is network "patchcord-ptp": ptp creates the veth and addresses
// (MTU 1450, no masquerade), patchcord-cni takes over from its prevResult.
func (n *Node) ChainedPTPConflist() []byte {
	return conflist("patchcord-ptp",
		struct {
			Type   string    `json:"type"`
			IPMasq bool      `json:"ipMasq"`
			MTU    int       `json:"mtu"`
			IPAM   *ipamConf `json:"ipam"`
		}{"ptp", false, 1450, n.ptpIPAM()},
		struct {
			Type      string `json:"type"`
			BpffsRoot string `json:"bpffsRoot"`
		}{"patchcord-cni", n.BpffsRoot},
	)
}
