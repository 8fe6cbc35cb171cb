// Helpers for the in-process tests of the CNI verbs: a "node" (a fresh
// network namespace, a private bpffs and a host-local data directory), pods
// (a namespace each), verb runners in the style of containernetworking's
// pkg/testutils, and the checks that a pod is fully set up or fully gone.
package cni_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/cni"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	netName   = "pcnet"
	podSubnet = "10.244.1.0/24"
	podIfname = "eth0"
	// pluginEnv makes the test binary act as the patchcord-cni binary (see
	// TestMain): parallel verbs need a process each, as CNI_* and stdout are
	// per process.
	pluginEnv = "PATCHCORD_CNI_TEST_AS_PLUGIN"
)

// versions are the CNI versions the plugin supports; the main flow runs once
// per version.
var versions = []string{"0.4.0", "1.0.0", "1.1.0"}

var (
	gatewayIP   = net.IPv4(169, 254, 1, 1)
	hostVethRE  = regexp.MustCompile(`^pc[0-9a-f]{13}$`)
	podPrefix   = netip.MustParsePrefix(podSubnet)
	errNoResult = errors.New("no result")
)

func TestMain(m *testing.M) {
	if os.Getenv(pluginEnv) != "" {
		// Re-executed by runPlugin: be cmd/patchcord-cni.
		runtime.LockOSThread()
		skel.PluginMainFuncs(skel.CNIFuncs{
			Add: cni.Add, Del: cni.Del, Check: cni.Check, GC: cni.GC, Status: cni.Status,
		}, version.PluginSupports(versions...), "patchcord-cni (test binary)")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mustCNIPath returns the directory holding the reference plugins
// (host-local, ptp).
func mustCNIPath(tb testing.TB) string {
	tb.Helper()
	return datapathtest.CNIPlugins(tb, "host-local", "ptp")
}

// testNS is a namespace from testutils.NewNS that may be deleted early.
type testNS struct {
	ns.NetNS
	once sync.Once
}

func mustNS(tb testing.TB) *testNS {
	tb.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		tb.Fatalf("create network namespace: %v", err)
	}
	t := &testNS{NetNS: n}
	tb.Cleanup(func() { t.Delete(tb) })
	return t
}

// Delete unmounts and closes the namespace; later calls do nothing.
func (n *testNS) Delete(tb testing.TB) {
	n.once.Do(func() {
		// Close first: an open handle keeps the bind mount busy.
		if err := n.Close(); err != nil {
			tb.Errorf("close namespace: %v", err)
		}
		if err := testutils.UnmountNS(n.NetNS); err != nil {
			tb.Errorf("unmount namespace: %v", err)
		}
	})
}

// node is one emulated node: its own network namespace, bpffs root and
// host-local data directory.
type node struct {
	cniPath string
	hostNS  *testNS
	root    string
	dataDir string
}

func newNode(t *testing.T) *node {
	t.Helper()
	datapathtest.RequireRoot(t)
	n := &node{cniPath: mustCNIPath(t), hostNS: mustNS(t), root: datapathtest.MustBPFFS(t), dataDir: t.TempDir()}
	t.Setenv("CNI_PATH", n.cniPath)
	return n
}

type confOpt func(map[string]any)

// with sets a key of the plugin conf; a nil value removes it.
func with(key string, v any) confOpt {
	return func(c map[string]any) {
		if v == nil {
			delete(c, key)
			return
		}
		c[key] = v
	}
}

func withPrev(raw []byte) confOpt { return with("prevResult", json.RawMessage(raw)) }

func (n *node) ipam() map[string]any {
	return map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": podSubnet}}},
		"dataDir": n.dataDir,
	}
}

// conf is a primary-mode conf for this node; opts change it.
func (n *node) conf(tb testing.TB, ver string, opts ...confOpt) []byte {
	tb.Helper()
	c := map[string]any{
		"cniVersion": ver,
		"name":       netName,
		"type":       "patchcord-cni",
		"bpffsRoot":  n.root,
		"ipam":       n.ipam(),
	}
	for _, o := range opts {
		o(c)
	}
	b, err := json.Marshal(c)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

type pod struct {
	ns *testNS
	id string
}

func newPod(tb testing.TB) *pod {
	tb.Helper()
	b := make([]byte, 16)
	rand.Read(b)
	return &pod{ns: mustNS(tb), id: "ctr-" + hex.EncodeToString(b)}
}

func (p *pod) args(conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: p.id, Netns: p.ns.Path(), IfName: podIfname, StdinData: conf}
}

// The verbs run in-process inside the node's namespace. testutils sets
// CNI_PATH to $PATH; the plugin must find host-local in the node's CNI path.

func (n *node) add(args *skel.CmdArgs) (res *current.Result, raw []byte, err error) {
	err = n.hostNS.Do(func(ns.NetNS) error {
		r, out, err := testutils.CmdAddWithArgs(args, func() error {
			os.Setenv("CNI_PATH", n.cniPath)
			return cni.Add(args)
		})
		if err != nil {
			return err
		}
		if r == nil {
			return errNoResult
		}
		res, err = current.NewResultFromResult(r)
		raw = out
		return err
	})
	return res, raw, err
}

func (n *node) mustAdd(tb testing.TB, args *skel.CmdArgs) (*current.Result, []byte) {
	tb.Helper()
	res, raw, err := n.add(args)
	if err != nil {
		tb.Fatalf("ADD %s: %v", args.ContainerID, err)
	}
	return res, raw
}

func (n *node) check(args *skel.CmdArgs) error {
	return n.hostNS.Do(func(ns.NetNS) error {
		return testutils.CmdCheckWithArgs(args, func() error {
			os.Setenv("CNI_PATH", n.cniPath)
			return cni.Check(args)
		})
	})
}

func (n *node) del(args *skel.CmdArgs) error {
	return n.hostNS.Do(func(ns.NetNS) error {
		return testutils.CmdDelWithArgs(args, func() error {
			os.Setenv("CNI_PATH", n.cniPath)
			return cni.Del(args)
		})
	})
}

func (n *node) mustDel(tb testing.TB, args *skel.CmdArgs) {
	tb.Helper()
	if err := n.del(args); err != nil {
		tb.Fatalf("DEL %s: %v", args.ContainerID, err)
	}
}

func (n *node) status(conf []byte) error {
	return n.hostNS.Do(func(ns.NetNS) error {
		return testutils.CmdStatus(func() error {
			os.Setenv("CNI_PATH", n.cniPath)
			return cni.Status(&skel.CmdArgs{StdinData: conf})
		})
	})
}

// gc runs GC as pkg/testutils runs the other verbs (it has no CmdGC).
func (n *node) gc(conf []byte) error {
	return n.hostNS.Do(func(ns.NetNS) error {
		os.Setenv("CNI_COMMAND", "GC")
		os.Setenv("CNI_PATH", n.cniPath)
		defer os.Unsetenv("CNI_COMMAND")
		return cni.GC(&skel.CmdArgs{StdinData: conf})
	})
}

// runPlugin runs a verb in a child process, the test binary acting as the
// plugin (pluginEnv must be set), from the node's namespace: what a runtime
// does, and the only way to run verbs in parallel, since CNI_* variables and
// stdout belong to the process.
func (n *node) runPlugin(command string, args *skel.CmdArgs) (types.Result, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return n.invoke(exe, command, args)
}

// invoke runs the plugin binary at path from the node's namespace.
func (n *node) invoke(path, command string, args *skel.CmdArgs) (types.Result, error) {
	iargs := &invoke.Args{Command: command, ContainerID: args.ContainerID, NetNS: args.Netns, IfName: args.IfName, Path: n.cniPath}
	var res types.Result
	err := n.hostNS.Do(func(ns.NetNS) error {
		// The child inherits the namespace of this locked thread.
		var err error
		if command == "ADD" {
			res, err = invoke.ExecPluginWithResult(context.Background(), path, args.StdinData, iargs, nil)
			return err
		}
		return invoke.ExecPluginWithoutResult(context.Background(), path, args.StdinData, iargs, nil)
	})
	return res, err
}

// execPlugin runs a reference plugin (ptp) from the node's namespace.
func (n *node) execPlugin(plugin, command string, args *skel.CmdArgs) (types.Result, error) {
	path, err := invoke.FindInPath(plugin, []string{n.cniPath})
	if err != nil {
		return nil, err
	}
	return n.invoke(path, command, args)
}

// assertCNIError checks that err is a CNI error with code whose text has
// phrase in it: what the user is told to fix.
func assertCNIError(tb testing.TB, err error, code uint, phrase string) {
	tb.Helper()
	if err == nil {
		tb.Fatalf("got success, want CNI error %d mentioning %q", code, phrase)
	}
	var e *types.Error
	if !errors.As(err, &e) {
		tb.Fatalf("got %T %q, want a *types.Error with code %d", err, err, code)
	}
	if e.Code != code {
		tb.Errorf("error code %d (%q), want %d", e.Code, e.Error(), code)
	}
	if !strings.Contains(e.Error(), phrase) {
		tb.Errorf("error %q does not say %q", e.Error(), phrase)
	}
}

func (n *node) openPinned(tb testing.TB) *datapath.Datapath {
	tb.Helper()
	dp, err := datapath.OpenPinned(n.root)
	if err != nil {
		tb.Fatalf("open pinned datapath: %v", err)
	}
	tb.Cleanup(func() { dp.Close() })
	return dp
}

// podState is what ADD made for one pod, as the tests found it.
type podState struct {
	ip          netip.Addr
	hostIfname  string
	hostIfindex int
	hostMAC     string
	podMAC      string
}

func mustMAC(tb testing.TB, s string) net.HardwareAddr {
	tb.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		tb.Fatalf("MAC %q: %v", s, err)
	}
	return m
}

// mapKey is an IPv4 address as the maps key it (see pkg/bpfmaps).
func mapKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// assertPodGone checks that nothing of one pod is left: its veth (both
// ends), node route, endpoint entries, link pin and lease.
func (n *node) assertPodGone(tb testing.TB, p *pod, st podState) {
	tb.Helper()
	err := n.hostNS.Do(func(ns.NetNS) error {
		if _, err := netlink.LinkByName(st.hostIfname); err == nil {
			tb.Errorf("host veth %s is still there", st.hostIfname)
		}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: prefixNet(netip.PrefixFrom(st.ip, 32))}, netlink.RT_FILTER_DST)
		if err != nil {
			return err
		}
		if len(routes) != 0 {
			tb.Errorf("node route to %s is still there: %v", st.ip, routes)
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("inspect node namespace: %v", err)
	}
	if _, err := os.Stat(p.ns.Path()); err == nil {
		err = p.ns.Do(func(ns.NetNS) error {
			if _, err := netlink.LinkByName(podIfname); err == nil {
				tb.Errorf("pod %s is still there", podIfname)
			}
			return nil
		})
		if err != nil {
			tb.Fatalf("inspect pod namespace: %v", err)
		}
	}
	if dp, err := datapath.OpenPinned(n.root); err == nil {
		defer dp.Close()
		eps := bpfmaps.NewEndpoints(&dp.Maps)
		if ep, err := eps.Get(st.ip); !errors.Is(err, bpfmaps.ErrNotFound) {
			tb.Errorf("endpoints[%s]: got %+v, %v; want not found", st.ip, ep, err)
		}
		var v datapath.Endpoint
		if err := dp.Maps.EpByIfindex.Lookup(uint32(st.hostIfindex), &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
			tb.Errorf("ep_by_ifindex[%d]: got %v, want not found", st.hostIfindex, err)
		}
		var meta datapath.EndpointMeta
		if err := dp.Maps.EpMeta.Lookup(mapKey(st.ip), &meta); !errors.Is(err, ebpf.ErrKeyNotExist) {
			tb.Errorf("ep_meta[%s]: got %v, want not found", st.ip, err)
		}
	} else if !errors.Is(err, datapath.ErrNotLoaded) {
		tb.Errorf("open pinned datapath: %v", err)
	}
	if slices.Contains(n.linkPins(tb), st.hostIfname) {
		tb.Errorf("link pin %s is still there", filepath.Join(n.root, "links", datapath.FromPod, st.hostIfname))
	}
	if slices.Contains(n.leases(tb), st.ip) {
		tb.Errorf("host-local lease of %s is still there", st.ip)
	}
}

// assertClean checks that the node holds nothing of any pod: no veth, no
// link pin, no endpoint entry, no lease.
func (n *node) assertClean(tb testing.TB) {
	tb.Helper()
	if v := n.veths(tb); len(v) != 0 {
		tb.Errorf("veths left on the node: %v", v)
	}
	if p := n.linkPins(tb); len(p) != 0 {
		tb.Errorf("link pins left: %v", p)
	}
	if l := n.leases(tb); len(l) != 0 {
		tb.Errorf("leases left: %v", l)
	}
	dp, err := datapath.OpenPinned(n.root)
	if errors.Is(err, datapath.ErrNotLoaded) {
		return
	}
	if err != nil {
		tb.Fatalf("open pinned datapath: %v", err)
	}
	defer dp.Close()
	for name, m := range map[string]*ebpf.Map{"endpoints": dp.Maps.Endpoints, "ep_by_ifindex": dp.Maps.EpByIfindex, "ep_meta": dp.Maps.EpMeta} {
		if c := countKeys(tb, m); c != 0 {
			tb.Errorf("%s holds %d entries, want none", name, c)
		}
	}
}

// veths lists the veths in the node's namespace.
func (n *node) veths(tb testing.TB) []string {
	tb.Helper()
	var out []string
	err := n.hostNS.Do(func(ns.NetNS) error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Type() == "veth" {
				out = append(out, l.Attrs().Name)
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("list node links: %v", err)
	}
	slices.Sort(out)
	return out
}

// linkPins lists the interfaces with a pinned from_pod link.
func (n *node) linkPins(tb testing.TB) []string {
	tb.Helper()
	entries, err := os.ReadDir(filepath.Join(n.root, "links", datapath.FromPod))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		tb.Fatalf("list link pins: %v", err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// leases lists the addresses host-local has handed out.
func (n *node) leases(tb testing.TB) []netip.Addr {
	tb.Helper()
	entries, err := os.ReadDir(filepath.Join(n.dataDir, netName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		tb.Fatalf("list leases: %v", err)
	}
	var out []netip.Addr
	for _, e := range entries {
		if a, err := netip.ParseAddr(e.Name()); err == nil {
			out = append(out, a)
		}
	}
	return out
}

func countKeys(tb testing.TB, m *ebpf.Map) int {
	tb.Helper()
	var key uint32
	c := 0
	for err := m.NextKey(nil, &key); ; err = m.NextKey(key, &key) {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return c
		}
		if err != nil {
			tb.Fatalf("iterate map: %v", err)
		}
		c++
	}
}

// waitLinkGone waits until the node has no link named name: the kernel tears
// down a deleted namespace's veths asynchronously.
func (n *node) waitLinkGone(tb testing.TB, name string) {
	tb.Helper()
	h, err := netns.GetFromPath(n.hostNS.Path())
	if err != nil {
		tb.Fatal(err)
	}
	defer h.Close()
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &h}); err != nil {
		tb.Fatalf("subscribe to link updates: %v", err)
	}
	// Subscribed first, so a deletion between this look and the wait is seen.
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		tb.Fatal(err)
	}
	defer nh.Close()
	if _, err := nh.LinkByName(name); err != nil {
		return
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case u, ok := <-updates:
			if !ok {
				tb.Fatalf("link updates closed while waiting for %s to go", name)
			}
			if u.Header.Type == unix.RTM_DELLINK && u.Attrs().Name == name {
				return
			}
		case <-timeout:
			tb.Fatalf("%s still exists 10s after its pod's namespace was deleted", name)
		}
	}
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
