package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
)

// chanSource hands the agent whatever node sets the test sends.
type chanSource chan []nodes.Node

func (c chanSource) Run(ctx context.Context, updates chan<- []nodes.Node) error {
	for {
		select {
		case set := <-c:
			select {
			case updates <- set:
			case <-ctx.Done():
				return nil
			}
		case <-ctx.Done():
			return nil
		}
	}
}

var (
	node1 = nodes.Node{Name: "node1", NodeIP: netip.MustParseAddr("198.18.0.1"), PodCIDR: netip.MustParsePrefix("10.244.1.0/24")}
	node2 = nodes.Node{Name: "node2", NodeIP: netip.MustParseAddr("198.18.0.2"), PodCIDR: netip.MustParsePrefix("10.244.2.0/24")}
	node3 = nodes.Node{Name: "node3", NodeIP: netip.MustParseAddr("198.18.0.3"), PodCIDR: netip.MustParsePrefix("10.244.3.0/24"),
		VtepMAC: net.HardwareAddr{0x0e, 0, 0, 0, 0, 3}}
)

// mustNodeNS makes a namespace with an uplink "eth0" (a veth whose peer
// stays inside) holding node1's address.
func mustNodeNS(t *testing.T) ns.NetNS {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	err = netns.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1500}, PeerName: "eth0p"}); err != nil {
			return err
		}
		l, _ := netlink.LinkByName("eth0")
		p, _ := netlink.LinkByName("eth0p")
		netlink.LinkSetUp(p)
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(198, 18, 0, 1), Mask: net.CIDRMask(24, 32)}})
	})
	if err != nil {
		t.Fatal(err)
	}
	return netns
}

func TestAgentSyncsNodesAndRoutes(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	netns := mustNodeNS(t)
	ready := filepath.Join(t.TempDir(), "ready")
	src := make(chanSource)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cfg := Config{Uplink: "eth0", NodeIP: node1.NodeIP, PodCIDR: node1.PodCIDR, VNI: 1, VXLANPort: 4789, BpffsRoot: root, ReadyFile: ready}
	go func() {
		done <- netns.Do(func(ns.NetNS) error { return Run(ctx, cfg, src, datapathtest.Logger(t)) })
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	}()

	// The agent's own entry is listed and must be skipped.
	src <- []nodes.Node{node1, node2, node3}
	waitFor(t, func() bool { _, err := os.Stat(ready); return err == nil })

	dp, err := datapath.OpenPinned(root)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	nm := bpfmaps.NewNodes(&dp.Maps)
	wantNodes(t, nm, node2, node3)

	cfgGot, err := bpfmaps.NewConfig(&dp.Maps).Get()
	if err != nil {
		t.Fatal(err)
	}
	if cfgGot.NodeIP != node1.NodeIP || cfgGot.VNI != 1 || cfgGot.VXLANPort != 4789 || cfgGot.PodMTU() != 1450 || !cfgGot.Configured() {
		t.Errorf("node config: %+v", cfgGot)
	}

	err = netns.Do(func(ns.NetNS) error {
		for _, prog := range []string{datapath.FromUplink, datapath.ToUplink} {
			if err := dp.Attached(prog, "eth0"); err != nil {
				t.Errorf("%s: %v", prog, err)
			}
		}
		wantRoute(t, node2.PodCIDR, true)
		wantRoute(t, node3.PodCIDR, true)
		wantNeigh(t, "10.244.3.0", node3.VtepMAC.String())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A node that leaves takes its map entry, tunnel source and route along.
	src <- []nodes.Node{node1, node3}
	waitFor(t, func() bool { l, _ := nm.List(); return len(l) == 1 })
	wantNodes(t, nm, node3)
	var present uint32
	if err := dp.Maps.TunnelSrcs.Lookup(node2.NodeIP.As4(), &present); err == nil {
		t.Error("node2 is still a tunnel source after leaving")
	}
	netns.Do(func(ns.NetNS) error {
		wantRoute(t, node2.PodCIDR, false)
		wantRoute(t, node3.PodCIDR, true)
		return nil
	})
}

func TestConfigValidateNamesTheFlag(t *testing.T) {
	base := Config{Uplink: "eth0", NodeIP: node1.NodeIP, PodCIDR: node1.PodCIDR, VNI: 1, VXLANPort: 4789}
	for _, tt := range []struct {
		name string
		mod  func(*Config)
		flag string
	}{
		{"no uplink", func(c *Config) { c.Uplink = "" }, "--uplink"},
		{"ipv6 node ip", func(c *Config) { c.NodeIP = netip.MustParseAddr("fd00::1") }, "--node-ip"},
		{"no pod cidr", func(c *Config) { c.PodCIDR = netip.Prefix{} }, "--pod-cidr"},
		{"vni 0", func(c *Config) { c.VNI = 0 }, "--vni"},
		{"vni too big", func(c *Config) { c.VNI = 1 << 24 }, "--vni"},
		{"port 0", func(c *Config) { c.VXLANPort = 0 }, "--vxlan-port"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			tt.mod(&c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.flag) {
				t.Errorf("got %v, want an error naming %s", err, tt.flag)
			}
		})
	}
	if err := base.Validate(); err != nil {
		t.Errorf("valid config: %v", err)
	}
}

func wantNodes(t *testing.T, nm *bpfmaps.Nodes, want ...nodes.Node) {
	t.Helper()
	got, err := nm.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("node map: got %+v, want %d nodes", got, len(want))
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			if g.PodCIDR == w.PodCIDR && g.NodeIP == w.NodeIP && g.VtepMAC.String() == w.VtepMAC.String() {
				found = true
			}
		}
		if !found {
			t.Errorf("node map: %s (%s) missing from %+v", w.Name, w.PodCIDR, got)
		}
	}
}

func wantRoute(t *testing.T, cidr netip.Prefix, present bool) {
	t.Helper()
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() == cidr.String() {
			if !present {
				t.Errorf("route to %s still present", cidr)
			}
			if r.MTU != 1450 || r.Gw.String() != cidr.Addr().String() {
				t.Errorf("route to %s: %+v, want via %s mtu 1450", cidr, r, cidr.Addr())
			}
			return
		}
	}
	if present {
		t.Errorf("no route to %s", cidr)
	}
}

func wantNeigh(t *testing.T, ip, mac string) {
	t.Helper()
	l, _ := netlink.LinkByName("eth0")
	neighs, err := netlink.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.IP.String() == ip {
			if n.HardwareAddr.String() != mac || n.State != netlink.NUD_PERMANENT {
				t.Errorf("neighbour %s: %s state %d, want permanent %s", ip, n.HardwareAddr, n.State, mac)
			}
			return
		}
	}
	t.Errorf("no neighbour %s", ip)
}

// waitFor polls a condition the agent signals by its effects.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A restarted agent repairs what happened while it was away: an endpoint
// whose veth is gone is removed, a missing attachment restored, and a link
// left without an endpoint detached, and IPv6 turned off on a host veth
// that has it.
func TestAgentReconcilesOnStart(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	netns := mustNodeNS(t)
	log := datapathtest.Logger(t)
	dp, err := datapath.Open(root, log)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	eps := bpfmaps.NewEndpoints(&dp.Maps)
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	live := bpfmaps.EndpointInfo{IP: netip.MustParseAddr("10.244.1.2"), Ifname: "pclive", MAC: mac, HostMAC: mac}
	gone := bpfmaps.EndpointInfo{IP: netip.MustParseAddr("10.244.1.3"), Ifindex: 999, Ifname: "pcgone", MAC: mac, HostMAC: mac}
	err = netns.Do(func(ns.NetNS) error {
		for _, name := range []string{"pclive", "pcorphan"} {
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
				return err
			}
		}
		l, _ := netlink.LinkByName("pclive")
		live.Ifindex = l.Attrs().Index
		// As a release before IPv6 was turned off on host veths left it.
		if ipv6off.Check("pclive") == nil {
			return errors.New("a new veth has IPv6 off already: the test cannot see the repair")
		}
		// The live endpoint lost its attachment; the orphan veth has
		// one but no endpoint.
		if err := eps.Put(live); err != nil {
			return err
		}
		if err := eps.Put(gone); err != nil {
			return err
		}
		return dp.Attach(datapath.FromPod, "pcorphan", log)
	})
	if err != nil {
		t.Fatal(err)
	}

	ready := filepath.Join(t.TempDir(), "ready")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cfg := Config{Uplink: "eth0", NodeIP: node1.NodeIP, PodCIDR: node1.PodCIDR, VNI: 1, VXLANPort: 4789, BpffsRoot: root, ReadyFile: ready}
	src := make(chanSource)
	go func() {
		done <- netns.Do(func(ns.NetNS) error { return Run(ctx, cfg, src, log) })
	}()
	src <- []nodes.Node{node1}
	waitFor(t, func() bool { _, err := os.Stat(ready); return err == nil })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if _, err := eps.Get(gone.IP); !errors.Is(err, bpfmaps.ErrNotFound) {
		t.Errorf("endpoint of a deleted veth: got %v, want it removed", err)
	}
	if _, err := eps.Get(live.IP); err != nil {
		t.Errorf("live endpoint: %v", err)
	}
	netns.Do(func(ns.NetNS) error {
		if err := dp.Attached(datapath.FromPod, "pclive"); err != nil {
			t.Errorf("live endpoint's attachment not restored: %v", err)
		}
		if err := dp.Attached(datapath.FromPod, "pcorphan"); err == nil {
			t.Error("attachment without endpoint still in place")
		}
		if err := ipv6off.Check("pclive"); err != nil {
			t.Errorf("live endpoint's host veth: %v", err)
		}
		return nil
	})
}

// A running agent puts back the node's own attachments: from_uplink
// detached by hand, and the GRO device deleted along with from_tunnel.
func TestAgentRestoresNodeHooks(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	netns := mustNodeNS(t)
	log := datapathtest.Logger(t)
	ready := filepath.Join(t.TempDir(), "ready")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	cfg := Config{Uplink: "eth0", NodeIP: node1.NodeIP, PodCIDR: node1.PodCIDR, VNI: 1, VXLANPort: 4789,
		BpffsRoot: root, ReadyFile: ready, ReconcileEvery: 50 * time.Millisecond}
	src := make(chanSource)
	go func() {
		done <- netns.Do(func(ns.NetNS) error { return Run(ctx, cfg, src, log) })
	}()
	src <- []nodes.Node{node1}
	waitFor(t, func() bool { _, err := os.Stat(ready); return err == nil })

	dp, err := datapath.OpenPinned(root)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	attached := func(prog, ifname string) bool {
		var err error
		netns.Do(func(ns.NetNS) error { err = dp.Attached(prog, ifname); return nil })
		return err == nil
	}
	if !attached(datapath.FromUplink, "eth0") || !attached(datapath.FromTunnel, GRODevice) {
		t.Fatal("the agent did not attach from_uplink and from_tunnel at start")
	}
	err = netns.Do(func(ns.NetNS) error {
		if err := dp.Detach(datapath.FromUplink, "eth0"); err != nil {
			return err
		}
		l, err := netlink.LinkByName(GRODevice)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return attached(datapath.FromUplink, "eth0") && attached(datapath.FromTunnel, GRODevice) })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
