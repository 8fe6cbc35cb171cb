// The checks of what a CNI ADD left behind: its result, the pod's side and
// the node's side.
package cni_test

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"fmt"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
)

// assertPodUp checks a primary-mode ADD's result and everything it set up,
// in the pod's namespace, the node's and the datapath.
func (n *node) assertPodUp(tb testing.TB, p *pod, res *current.Result, mtu int) podState {
	tb.Helper()
	st := assertResult(tb, p, res)
	assertPodSide(tb, p, st, mtu)
	n.assertHostSide(tb, p, &st, mtu)
	return st
}

// assertResult checks ADD's result: two interfaces, one /32 in the pod
// subnet, the link-local gateway and its two routes.
func assertResult(tb testing.TB, p *pod, res *current.Result) podState {
	tb.Helper()
	var st podState

	if len(res.Interfaces) != 2 {
		tb.Fatalf("result has %d interfaces, want host veth and pod eth0: %+v", len(res.Interfaces), res.Interfaces)
	}
	host, podIf := res.Interfaces[0], res.Interfaces[1]
	if !hostVethRE.MatchString(host.Name) || len(host.Name) > 15 {
		tb.Errorf("host veth name %q: want pc + 13 hex digits", host.Name)
	}
	if host.Mac == "" || host.Sandbox != "" {
		tb.Errorf("host interface %+v: want a MAC and no sandbox", host)
	}
	if podIf.Name != podIfname || podIf.Mac == "" || podIf.Sandbox != p.ns.Path() {
		tb.Errorf("pod interface %+v: want %s with a MAC in sandbox %s", podIf, podIfname, p.ns.Path())
	}
	st.hostIfname, st.hostMAC, st.podMAC = host.Name, host.Mac, podIf.Mac
	if len(res.IPs) != 1 {
		tb.Fatalf("result has %d IPs, want 1: %+v", len(res.IPs), res.IPs)
	}
	ipc := res.IPs[0]
	ip, ok := netip.AddrFromSlice(ipc.Address.IP)
	ip = ip.Unmap()
	if ones, bits := ipc.Address.Mask.Size(); !ok || !podPrefix.Contains(ip) || ones != 32 || bits != 32 {
		tb.Fatalf("result address %s: want a /32 in %s", ipc.Address.String(), podSubnet)
	}
	st.ip = ip
	if !ipc.Gateway.Equal(gatewayIP) {
		tb.Errorf("result gateway %s, want %s", ipc.Gateway, gatewayIP)
	}
	if ipc.Interface == nil || *ipc.Interface != 1 {
		tb.Errorf("result IP interface %v, want 1 (eth0)", ipc.Interface)
	}
	var gwRoute, defRoute bool
	for _, r := range res.Routes {
		ones, _ := r.Dst.Mask.Size()
		switch {
		case r.Dst.IP.Equal(gatewayIP) && ones == 32:
			gwRoute = r.GW == nil && r.Scope != nil && *r.Scope == int(netlink.SCOPE_LINK)
		case r.Dst.IP.Equal(net.IPv4zero) && ones == 0:
			defRoute = r.GW.Equal(gatewayIP)
		}
	}
	if !gwRoute || !defRoute || len(res.Routes) != 2 {
		tb.Errorf("result routes %v: want %s/32 scope link and 0.0.0.0/0 via %s", res.Routes, gatewayIP, gatewayIP)
	}
	return st
}

// assertPodSide checks eth0 in the pod: up, its MTU and MAC, only the
// pod's address, the gateway routes, no IPv6.
func assertPodSide(tb testing.TB, p *pod, st podState, mtu int) {
	tb.Helper()
	ip := st.ip
	err := p.ns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(podIfname)
		if err != nil {
			return err
		}
		a := l.Attrs()
		if a.Flags&net.FlagUp == 0 {
			tb.Errorf("pod %s is down", podIfname)
		}
		if a.MTU != mtu {
			tb.Errorf("pod %s MTU %d, want %d", podIfname, a.MTU, mtu)
		}
		if a.HardwareAddr.String() != st.podMAC {
			tb.Errorf("pod %s MAC %s, result says %s", podIfname, a.HardwareAddr, st.podMAC)
		}
		assertNoIPv6(tb, podIfname)
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != netip.PrefixFrom(ip, 32).String() {
			tb.Errorf("pod %s addresses %v, want only %s/32", podIfname, addrs, ip)
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		var gw, def bool
		for _, r := range routes {
			switch {
			case r.Dst != nil && r.Dst.String() == "169.254.1.1/32":
				gw = r.Scope == netlink.SCOPE_LINK
			case r.Dst == nil || r.Dst.String() == "0.0.0.0/0":
				def = r.Gw.Equal(gatewayIP)
			}
		}
		if !gw || !def {
			tb.Errorf("pod routes %v: want 169.254.1.1/32 scope link and default via 169.254.1.1", routes)
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("inspect pod namespace: %v", err)
	}
}

// assertHostSide checks the host veth, the node's route to the pod,
// forwarding, and the endpoint entry; it fills in the host ifindex.
func (n *node) assertHostSide(tb testing.TB, p *pod, st *podState, mtu int) {
	tb.Helper()
	ip := st.ip
	err := n.hostNS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(st.hostIfname)
		if err != nil {
			return err
		}
		if _, ok := l.(*netlink.Veth); !ok {
			tb.Errorf("host interface %s is a %s, want a veth", st.hostIfname, l.Type())
		}
		st.hostIfindex = l.Attrs().Index
		if l.Attrs().HardwareAddr.String() != st.hostMAC {
			tb.Errorf("host veth MAC %s, result says %s", l.Attrs().HardwareAddr, st.hostMAC)
		}
		if l.Attrs().MTU != mtu {
			tb.Errorf("host veth MTU %d, want %d", l.Attrs().MTU, mtu)
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if !slices.ContainsFunc(routes, func(r netlink.Route) bool {
			return r.Dst != nil && r.Dst.String() == netip.PrefixFrom(ip, 32).String() && r.Scope == netlink.SCOPE_LINK
		}) {
			tb.Errorf("node routes on %s %v: want %s/32 scope link", st.hostIfname, routes, ip)
		}
		fwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(fwd)) != "1" {
			tb.Errorf("node ip_forward = %s, want 1", fwd)
		}
		return n.assertEndpoint(tb, p, *st)
	})
	if err != nil {
		tb.Fatalf("inspect node namespace: %v", err)
	}
}

// assertEndpoint checks the endpoint maps and the attachment for a pod; call
// it in the node's namespace.
func (n *node) assertEndpoint(tb testing.TB, p *pod, st podState) error {
	tb.Helper()
	dp, err := datapath.OpenPinned(n.root)
	if err != nil {
		return err
	}
	defer dp.Close()
	ep, err := bpfmaps.NewEndpoints(&dp.Maps).Get(st.ip)
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", st.ip, err)
	}
	want := bpfmaps.EndpointInfo{
		IP: st.ip, Ifindex: st.hostIfindex, Ifname: st.hostIfname,
		MAC: mustMAC(tb, st.podMAC), HostMAC: mustMAC(tb, st.hostMAC),
		Container: p.id, PodIfname: podIfname, Netns: p.ns.Path(), Network: netName,
	}
	if fmt.Sprint(ep) != fmt.Sprint(want) {
		tb.Errorf("endpoint\n got %+v\nwant %+v", ep, want)
	}
	var byIfindex datapath.Endpoint
	if err := dp.Maps.EpByIfindex.Lookup(uint32(st.hostIfindex), &byIfindex); err != nil {
		tb.Errorf("ep_by_ifindex[%d]: %v", st.hostIfindex, err)
	} else if byIfindex.Ip != mapKey(st.ip) {
		tb.Errorf("ep_by_ifindex[%d] is for another IP", st.hostIfindex)
	}
	if err := dp.Attached(datapath.FromPod, st.hostIfname); err != nil {
		tb.Errorf("from_pod on %s: %v", st.hostIfname, err)
	}
	assertNoIPv6(tb, st.hostIfname)
	return nil
}

// assertNoIPv6 checks that ifname (the host veth, or the pod's eth0) cannot
// speak IPv6; call it in the interface's namespace.
func assertNoIPv6(tb testing.TB, ifname string) {
	tb.Helper()
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/" + ifname + "/disable_ipv6")
	if err != nil {
		tb.Errorf("read disable_ipv6 of %s: %v", ifname, err)
	} else if strings.TrimSpace(string(b)) != "1" {
		tb.Errorf("%s has disable_ipv6=%s, want 1", ifname, strings.TrimSpace(string(b)))
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		tb.Errorf("link %s: %v", ifname, err)
		return
	}
	if addrs, err := netlink.AddrList(l, netlink.FAMILY_V6); err != nil || len(addrs) != 0 {
		tb.Errorf("%s IPv6 addresses %v (%v), want none", ifname, addrs, err)
	}
}
