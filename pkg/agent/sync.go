package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routeProtocol marks the routes the agent owns, so that it can find and
// remove its stale ones without touching anybody else's.
const routeProtocol = netlink.RouteProtocol(161)

// synced is what the last successful sync applied to the kernel: the remote
// nodes (node map, tunnel source, route and neighbour each) by pod CIDR. A
// node set is applied as a difference against it, so one changed node
// among thousands costs a handful of map and netlink operations. It is a
// cache of the kernel's state, never the truth: nil (at start, after a
// failed sync, and every NodeResyncEvery) makes the next sync a full one,
// which reads the kernel and repairs whatever drifted.
type synced struct {
	nodes map[netip.Prefix]nodes.Node
	at    time.Time // of the last full sync
}

// syncStats is what one node sync did.
type syncStats struct {
	full             bool
	changed, removed int // nodes written, nodes deleted
}

// syncNodes makes the node map, tunnel sources, routes, neighbours and the
// masquerade sets match set. This node's own entry is skipped.
func (a *Agent) syncNodes(set []nodes.Node) (syncStats, error) {
	start := time.Now()
	want := make(map[netip.Prefix]nodes.Node, len(set))
	for _, n := range set {
		if n.NodeIP == a.cfg.NodeIP {
			continue
		}
		if n.PodCIDR.Overlaps(a.cfg.PodCIDR) {
			a.log.Error("ignoring node whose pod CIDR overlaps ours", "node", n.Name, "pod_cidr", n.PodCIDR)
			continue
		}
		n.Routing = a.resolve(n)
		want[n.PodCIDR] = n
	}
	st := syncStats{full: a.synced.nodes == nil}
	full, have := st.full, a.synced.nodes
	if full {
		var err error
		if have, err = a.kernelNodes(); err != nil {
			return st, err
		}
	}
	// New and changed nodes first, so that a node whose CIDR or address
	// changes is never absent in between. A full sync rewrites every
	// node: routes and neighbours may have drifted where the map did not.
	var errs []error
	for cidr, n := range want {
		if old, ok := have[cidr]; ok && !full && sameNode(old, n) {
			continue
		}
		st.changed++
		if err := a.putNode(n); err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", n.Name, err))
		}
	}
	for cidr, old := range have {
		if _, ok := want[cidr]; ok {
			continue
		}
		st.removed++
		// Route first: the host stops sending before the map forgets.
		errs = append(errs, a.deleteRoute(cidr), a.nodes.Delete(cidr))
		a.log.Info("removed node", "pod_cidr", cidr, "node_ip", old.NodeIP)
	}
	errs = append(errs, a.syncSources(want, have, full), a.syncNativeFlag(want))
	if full {
		errs = append(errs, a.removeStaleRoutes(want))
	}
	if a.cfg.Masquerade {
		errs = append(errs, a.syncMasquerade(set, full))
	}
	if err := errors.Join(errs...); err != nil {
		a.synced = synced{}
		return st, err
	}
	if full {
		a.synced.at = time.Now()
	}
	a.synced.nodes = want
	a.log.Info("nodes synced", "remote_nodes", len(want), "full", full, "changed", st.changed, "removed", st.removed,
		"took_ms", float64(time.Since(start).Microseconds())/1000)
	return st, nil
}

// putNode writes n's map entry and its route in the order that never
// strands a packet: from_pod sends to a native node by the route (the FIB
// lookup), to a tunnelled one by the map alone. A node turning native gets
// its route before the map says native, since the tunnel's route would
// address the packet to this node's own uplink MAC; a node turning tunnel
// gets the map first, then loses the route its native packets took.
func (a *Agent) putNode(n nodes.Node) error {
	node := bpfmaps.Node{PodCIDR: n.PodCIDR, NodeIP: n.NodeIP, VtepMAC: n.VtepMAC, Native: n.Routing == nodes.Native}
	if node.Native {
		if err := a.ensureRoute(n); err != nil {
			return err
		}
		return a.nodes.Put(node)
	}
	if err := a.nodes.Put(node); err != nil {
		return err
	}
	return a.ensureRoute(n)
}

// resyncDue reports whether a full sync is due: the last one failed, or
// the last full one is NodeResyncEvery old.
func (a *Agent) resyncDue() bool {
	return a.synced.nodes == nil || time.Since(a.synced.at) >= a.cfg.NodeResyncEvery
}

// kernelNodes is the node map as the kernel holds it, for a full sync.
func (a *Agent) kernelNodes() (map[netip.Prefix]nodes.Node, error) {
	list, err := a.nodes.List()
	if err != nil {
		return nil, err
	}
	have := make(map[netip.Prefix]nodes.Node, len(list))
	for _, n := range list {
		have[n.PodCIDR] = nodes.Node{PodCIDR: n.PodCIDR, NodeIP: n.NodeIP, VtepMAC: n.VtepMAC, Routing: routingOf(n.Native)}
	}
	return have, nil
}

// sameNode reports whether the datapath holds the same for a and b (the
// name is not in the kernel), both with their routing resolved.
func sameNode(a, b nodes.Node) bool {
	return a.PodCIDR == b.PodCIDR && a.NodeIP == b.NodeIP && bytes.Equal(a.VtepMAC, b.VtepMAC) && a.Routing == b.Routing && a.Via == b.Via
}

// routing is the agent's own routing mode, the nodes' default.
func (a *Agent) routing() nodes.Routing {
	if a.cfg.Routing == nodes.RoutingDefault {
		return nodes.Tunnel
	}
	return a.cfg.Routing
}

// resolve decides how n's pods are reached: nodes.Tunnel or nodes.Native.
// A Flannel node (it has a VTEP MAC) takes VXLAN only, whatever it is set to.
func (a *Agent) resolve(n nodes.Node) nodes.Routing {
	mode := n.Routing
	if mode == nodes.RoutingDefault {
		mode = a.routing()
	}
	if len(n.VtepMAC) != 0 {
		return nodes.Tunnel
	}
	if mode == nodes.Auto {
		return routingOf(a.subnet.Contains(n.NodeIP))
	}
	return mode
}

func routingOf(native bool) nodes.Routing {
	if native {
		return nodes.Native
	}
	return nodes.Tunnel
}

// syncNativeFlag tells from_uplink whether to look for routed packets to
// local pods: only while some node is native, so that a tunnel-only node's
// own traffic costs no lookup.
func (a *Agent) syncNativeFlag(want map[netip.Prefix]nodes.Node) error {
	native := false
	for _, n := range want {
		if n.Routing == nodes.Native {
			native = true
			break
		}
	}
	return bpfmaps.NewConfig(&a.dp.Maps).SetNative(native)
}

// syncSources removes the tunnel sources no wanted node has any more: a
// node gone, or a renumbered node's old address, from which VXLAN must no
// longer be taken. A full sync prunes the whole map; otherwise only the
// addresses of the nodes that changed or went are looked at.
func (a *Agent) syncSources(want, have map[netip.Prefix]nodes.Node, full bool) error {
	keep := make(map[netip.Addr]bool, len(want))
	for _, n := range want {
		keep[n.NodeIP] = true
	}
	if full {
		return a.nodes.PruneSources(keep)
	}
	var errs []error
	for cidr, old := range have {
		if n, ok := want[cidr]; (!ok || n.NodeIP != old.NodeIP) && !keep[old.NodeIP] {
			errs = append(errs, a.nodes.DeleteSource(old.NodeIP))
		}
	}
	return errors.Join(errs...)
}

// nextHop is the pod CIDR's first address, the Flannel convention: a next
// hop that exists only as a permanent neighbour entry, so the host never
// ARPs for it and the underlay needs no L2 adjacency. to_uplink rewrites
// every header the host built for it.
func nextHop(cidr netip.Prefix) net.IP { return cidr.Masked().Addr().AsSlice() }

// ensureRoute routes the host's own traffic for a remote pod CIDR out of the
// uplink, where to_uplink encapsulates it. The route MTU leaves room for the
// VXLAN headers, so host TCP picks a fitting MSS. A native node's pod CIDR
// is routed via the node itself, as Flannel's host-gw does: the route the
// host stack and from_pod's FIB lookup both take.
func (a *Agent) ensureRoute(n nodes.Node) error {
	attrs := a.uplink.Attrs()
	if n.Routing == nodes.Native {
		return a.ensureNativeRoute(n)
	}
	lladdr := n.VtepMAC
	if len(lladdr) == 0 {
		lladdr = attrs.HardwareAddr
	}
	if err := netlink.NeighSet(&netlink.Neigh{
		LinkIndex:    attrs.Index,
		Family:       unix.AF_INET,
		State:        netlink.NUD_PERMANENT,
		IP:           nextHop(n.PodCIDR),
		HardwareAddr: lladdr,
	}); err != nil {
		return fmt.Errorf("add neighbour %s on %s: %w", nextHop(n.PodCIDR), attrs.Name, err)
	}
	if err := netlink.RouteReplace(&netlink.Route{
		LinkIndex: attrs.Index,
		Dst:       prefixNet(n.PodCIDR),
		Gw:        nextHop(n.PodCIDR),
		Flags:     int(netlink.FLAG_ONLINK),
		MTU:       attrs.MTU - datapath.VXLANOverhead,
		Protocol:  routeProtocol,
	}); err != nil {
		return fmt.Errorf("add route %s via %s: %w", n.PodCIDR, attrs.Name, err)
	}
	return nil
}

func (a *Agent) ensureNativeRoute(n nodes.Node) error {
	attrs := a.uplink.Attrs()
	via := n.NodeIP
	if n.Via.IsValid() {
		via = n.Via
	}
	if !a.subnet.Contains(via) {
		return fmt.Errorf("native routing to %s: not on %s's subnet %s; route its pod CIDR %s by BGP or use tunnel",
			via, attrs.Name, a.subnet, n.PodCIDR)
	}
	if err := netlink.RouteReplace(&netlink.Route{
		LinkIndex: attrs.Index,
		Dst:       prefixNet(n.PodCIDR),
		Gw:        via.AsSlice(),
		Protocol:  routeProtocol,
	}); err != nil {
		return fmt.Errorf("add route %s via %s: %w", n.PodCIDR, via, err)
	}
	// The tunnel's next hop, if the node was a tunnel one until now.
	return a.deleteNextHop(n.PodCIDR)
}

func (a *Agent) deleteRoute(cidr netip.Prefix) error {
	attrs := a.uplink.Attrs()
	err := netlink.RouteDel(&netlink.Route{LinkIndex: attrs.Index, Dst: prefixNet(cidr), Protocol: routeProtocol})
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("delete route %s: %w", cidr, err)
	}
	return a.deleteNextHop(cidr)
}

// deleteNextHop removes the permanent neighbour entry of a tunnel route.
func (a *Agent) deleteNextHop(cidr netip.Prefix) error {
	err := netlink.NeighDel(&netlink.Neigh{LinkIndex: a.uplink.Attrs().Index, Family: unix.AF_INET, IP: nextHop(cidr)})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete neighbour %s: %w", nextHop(cidr), err)
	}
	return nil
}

// removeStaleRoutes deletes routes of ours that no node wants, such as those
// left by a node removed while the agent was down.
func (a *Agent) removeStaleRoutes(want map[netip.Prefix]nodes.Node) error {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	var errs []error
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		cidr, ok := netipPrefix(r.Dst)
		if !ok {
			continue
		}
		if _, wanted := want[cidr]; !wanted {
			errs = append(errs, a.deleteRoute(cidr))
		}
	}
	return errors.Join(errs...)
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}
