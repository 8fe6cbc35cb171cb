package agent

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
)

// A node change is applied alone; what drifted in the kernel behind the
// agent's back is repaired by the next full sync, which reads the kernel.
func TestSyncNodesIncremental(t *testing.T) {
	withSyncAgent(t, func(a *Agent, d *datapath.Datapath) error {
		nm := a.nodes
		set := []nodes.Node{node1, node2, node3}
		for i := range 50 {
			set = append(set, fakeNode(i))
		}
		sync := func(want syncStats) {
			t.Helper()
			got, err := a.syncNodes(set)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("sync did %+v, want %+v", got, want)
			}
		}
		sync(syncStats{full: true, changed: 52})
		sync(syncStats{}) // nothing changed: nothing written

		// node3 is renumbered: one node written, its old address no
		// longer a tunnel source, the new one is.
		old := node3.NodeIP
		set[2].NodeIP = netip.MustParseAddr("198.18.0.33")
		sync(syncStats{changed: 1})
		wantSource(t, d.Maps.TunnelSrcs, old, false)
		wantSource(t, d.Maps.TunnelSrcs, set[2].NodeIP, true)
		wantNodes(t, nm, append([]nodes.Node{node2, set[2]}, set[3:]...)...)

		// A node leaves: one node removed with its route.
		set = append(set[:1], set[2:]...)
		sync(syncStats{removed: 1})
		wantRoute(t, node2.PodCIDR, false)
		wantSource(t, d.Maps.TunnelSrcs, node2.NodeIP, false)

		// Somebody deletes one of our routes: a change of another node
		// does not see it; the next full sync puts it back.
		if err := a.deleteRoute(node3.PodCIDR); err != nil {
			return err
		}
		set[2].VtepMAC = node3.VtepMAC
		sync(syncStats{changed: 1})
		wantRoute(t, node3.PodCIDR, false)
		a.synced = synced{}
		sync(syncStats{full: true, changed: 51})
		wantRoute(t, node3.PodCIDR, true)
		return nil
	})
}

// withSyncAgent runs fn in a node namespace of its own (uplink eth0 on
// 198.18.0.0/24) with an agent as far as node syncs need one.
func withSyncAgent(t *testing.T, fn func(a *Agent, d *datapath.Datapath) error) {
	t.Helper()
	d := datapathtest.MustOpen(t)
	netns := mustNodeNS(t)
	err := netns.Do(func(ns.NetNS) error {
		uplink, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return fn(&Agent{cfg: Config{NodeIP: node1.NodeIP, PodCIDR: node1.PodCIDR}, log: datapathtest.Logger(t), uplink: uplink,
			nodes: bpfmaps.NewNodes(&d.Maps), dp: d, subnet: netip.PrefixFrom(node1.NodeIP, 24).Masked()}, d)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// fakeNode is a remote node of a large cluster.
func fakeNode(i int) nodes.Node {
	return nodes.Node{
		Name:    fmt.Sprintf("fake%d", i),
		NodeIP:  netip.AddrFrom4([4]byte{198, 18, 1, byte(i + 1)}),
		PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 245, byte(i), 0}), 24),
	}
}

func wantSource(t *testing.T, srcs *ebpf.Map, ip netip.Addr, present bool) {
	t.Helper()
	var v uint32
	if got := srcs.Lookup(ip.As4(), &v) == nil; got != present {
		t.Errorf("tunnel source %s present: %v, want %v", ip, got, present)
	}
}

// A node turning native gets its route before the map says native: the
// route is what from_pod's FIB lookup sends it by, and the map must never
// point there first. So a native node whose route cannot be made (beyond
// the uplink's subnet) is not in the map at all, while the tunnel node
// beside it is.
func TestSyncNodesNativeRouteFirst(t *testing.T) {
	withSyncAgent(t, func(a *Agent, _ *datapath.Datapath) error {
		far := node3
		far.NodeIP, far.VtepMAC, far.Routing = netip.MustParseAddr("203.0.113.5"), nil, nodes.Native
		if _, err := a.syncNodes([]nodes.Node{node1, node2, far}); err == nil {
			t.Error("sync with a native node beyond the subnet succeeded")
		}
		wantNodes(t, a.nodes, node2)
		wantRoute(t, far.PodCIDR, false)
		return nil
	})
}
