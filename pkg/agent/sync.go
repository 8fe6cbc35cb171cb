package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routeProtocol marks the routes the agent owns, so that it can find and
// remove its stale ones without touching anybody else's.
const routeProtocol = netlink.RouteProtocol(161)

// syncNodes makes the node map, tunnel sources, routes and neighbours match
// set. This node's own entry is skipped.
func (a *Agent) syncNodes(set []nodes.Node) error {
	want := make(map[netip.Prefix]nodes.Node, len(set))
	for _, n := range set {
		if n.NodeIP == a.cfg.NodeIP {
			continue
		}
		if n.PodCIDR.Overlaps(a.cfg.PodCIDR) {
			a.log.Error("ignoring node whose pod CIDR overlaps ours", "node", n.Name, "pod_cidr", n.PodCIDR)
			continue
		}
		want[n.PodCIDR] = n
	}

	have, err := a.nodes.List()
	if err != nil {
		return err
	}
	// New and changed nodes first, so that a node whose CIDR or address
	// changes is never absent in between.
	var errs []error
	sources := make(map[netip.Addr]bool, len(want))
	for _, n := range want {
		sources[n.NodeIP] = true
		if err := a.nodes.Put(bpfmaps.Node{PodCIDR: n.PodCIDR, NodeIP: n.NodeIP, VtepMAC: n.VtepMAC}); err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", n.Name, err))
			continue
		}
		if err := a.ensureRoute(n); err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", n.Name, err))
		}
	}
	for _, old := range have {
		if _, ok := want[old.PodCIDR]; ok {
			continue
		}
		// Route first: the host stops sending before the map forgets.
		errs = append(errs, a.deleteRoute(old.PodCIDR), a.nodes.Delete(old.PodCIDR))
		a.log.Info("removed node", "pod_cidr", old.PodCIDR, "node_ip", old.NodeIP)
	}
	errs = append(errs, a.nodes.PruneSources(sources))
	errs = append(errs, a.removeStaleRoutes(want))
	if a.cfg.Masquerade {
		errs = append(errs, a.syncMasquerade(set))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	a.log.Info("nodes synced", "remote_nodes", len(want))
	return nil
}

// nextHop is the pod CIDR's first address, the Flannel convention: a next
// hop that exists only as a permanent neighbour entry, so the host never
// ARPs for it and the underlay needs no L2 adjacency. to_uplink rewrites
// every header the host built for it.
func nextHop(cidr netip.Prefix) net.IP { return cidr.Masked().Addr().AsSlice() }

// ensureRoute routes the host's own traffic for a remote pod CIDR out of the
// uplink, where to_uplink encapsulates it. The route MTU leaves room for the
// VXLAN headers, so host TCP picks a fitting MSS.
func (a *Agent) ensureRoute(n nodes.Node) error {
	attrs := a.uplink.Attrs()
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

func (a *Agent) deleteRoute(cidr netip.Prefix) error {
	attrs := a.uplink.Attrs()
	err := netlink.RouteDel(&netlink.Route{LinkIndex: attrs.Index, Dst: prefixNet(cidr), Protocol: routeProtocol})
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("delete route %s: %w", cidr, err)
	}
	err = netlink.NeighDel(&netlink.Neigh{LinkIndex: attrs.Index, Family: unix.AF_INET, IP: nextHop(cidr)})
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
