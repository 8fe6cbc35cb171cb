package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// gatewayIP is the pod's only neighbour: from_pod answers ARP for it with
// the host veth's MAC, so every packet the pod sends reaches from_pod
// addressed to the host.
func gatewayIP() net.IP { return datapath.PodGateway().AsSlice() }

// hostVethName is stable for a container interface, so DEL finds what ADD
// made without any state: "pc" and 13 hex digits, the kernel's 15 at most.
func hostVethName(containerID, ifname string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifname))
	return "pc" + hex.EncodeToString(sum[:])[:13]
}

// vethAlias marks the host veths primary mode makes for a network.
func vethAlias(network string) string { return "patchcord/" + network }

func add(args *skel.CmdArgs, conf *NetConf) error {
	log := logger(conf, nil).With("container", args.ContainerID, "ifname", args.IfName)
	switch {
	case conf.PrevResult != nil && conf.primary():
		return invalidConf("both ipam and a previous plugin's result are present: drop ipam to chain patchcord-cni after a plugin that creates the interface, or make patchcord-cni the first plugin")
	case conf.PrevResult != nil:
		return addChained(args, conf, log)
	case conf.primary():
		return addPrimary(args, conf, log)
	}
	return invalidConf("no ipam section and no previous plugin: add an ipam section (e.g. host-local) for primary mode, or chain patchcord-cni after ptp or bridge")
}

func openDatapath(conf *NetConf, log *slog.Logger) (*datapath.Datapath, error) {
	dp, err := datapath.Open(conf.BpffsRoot, log)
	if err != nil {
		return nil, types.NewError(types.ErrPluginNotAvailable, "cannot load the patchcord datapath", err.Error())
	}
	if _, err := dp.SetAttachMode(conf.attachMode, log); err != nil {
		dp.Close()
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "cannot use attachMode "+string(conf.attachMode), err.Error())
	}
	return dp, nil
}

func addPrimary(args *skel.CmdArgs, conf *NetConf, log *slog.Logger) (err error) {
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("cannot open network namespace %q", args.Netns), err.Error())
	}
	defer netns.Close()
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return fmt.Errorf("open host network namespace: %w", err)
	}
	defer hostNS.Close()

	// Everything made from here on is undone if a later step fails, so a
	// failed ADD leaves no lease, veth, route or map entry behind.
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	// leased, once IPAM runs, brings its lease; wait takes it once.
	var leased chan lease
	var got *lease
	wait := func() lease {
		if got == nil {
			l := <-leased
			got = &l
		}
		return *got
	}
	defer func() {
		if err != nil && leased != nil {
			// The lease goes last, whatever step failed: its address
			// is free only once nothing of this pod uses it.
			if l := wait(); l.release != nil {
				undo = append([]func(){l.release}, undo...)
			}
		}
	}()

	dp, err := openDatapath(conf, log)
	if err != nil {
		return err
	}
	defer dp.Close()
	eps := bpfmaps.NewEndpoints(&dp.Maps)
	mtu := podMTU(conf, dp, log)

	hostName := hostVethName(args.ContainerID, args.IfName)
	hostIf, podIf, delVeth, err := makeVeth(args, netns, hostNS, hostName, conf.Name, mtu, log)
	if delVeth != nil {
		undo = append(undo, delVeth)
	}
	if err != nil {
		return err
	}

	// IPAM (an exec of its plugin, ≈5 ms) runs on a goroutine beside the
	// rest, from the moment the veth is made and labelled, so that a kill
	// during IPAM leaves nothing GC cannot find; only the pod's address and
	// the host's route to it wait for the lease. With tcx it is hidden in
	// the attach's RCU wait.
	leased = make(chan lease, 1)
	go func() {
		var l lease
		// A new goroutine may run on any thread, and a caller that runs
		// ADD in-process may have its own in another namespace.
		if err := hostNS.Do(func(ns.NetNS) error { l = allocate(args, conf, log); return nil }); err != nil {
			l.err = fmt.Errorf("enter host network namespace: %w", err)
		}
		leased <- l
	}()
	if err := netns.Do(func(ns.NetNS) error { return readyPodEnd(podIf) }); err != nil {
		return fmt.Errorf("set up %s in %s: %w", args.IfName, args.Netns, err)
	}
	// The attachment is staged, recorded only by register. The host end
	// comes up only once from_pod runs: until then a veth drops whatever
	// the pod sends, so a process already in the namespace (a runtime may
	// add a network to a running container) never gets a packet past it.
	staged, err := stage(dp, hostName, conf, log)
	if err != nil {
		return err
	}
	undo = append(undo, staged.Abort)
	if err := netlink.LinkSetUp(byIndex(hostIf)); err != nil {
		return fmt.Errorf("set host veth %s up: %w", hostName, err)
	}
	l := wait()
	if l.err != nil {
		return l.err
	}
	res, podIP := l.res, l.ip
	if err := address(args, netns, podIf, hostIf, podIP); err != nil {
		return err
	}

	ep := bpfmaps.EndpointInfo{
		IP: podIP, Ifindex: hostIf.Index, Ifname: hostName,
		MAC: podIf.HardwareAddr, HostMAC: hostIf.HardwareAddr,
		Container: args.ContainerID, PodIfname: args.IfName, Netns: args.Netns,
		Network: conf.Name, HostPath: conf.hostPath(),
	}
	if err := register(dp, eps, ep, staged, log); err != nil {
		return err
	}
	undo = append(undo, func() { unregister(dp, eps, ep, log) })

	log.Info("added pod", "pod_ip", podIP, "host_ifname", hostName, "mtu", mtu)
	return types.PrintResult(primaryResult(res, args, hostIf, podIf), conf.CNIVersion)
}

// primaryResult completes the IPAM result with the veth pair and the pod's
// /32 behind the link-local gateway.
func primaryResult(res *current.Result, args *skel.CmdArgs, hostIf, podIf net.Interface) *current.Result {
	res.Interfaces = []*current.Interface{
		{Name: hostIf.Name, Mac: hostIf.HardwareAddr.String()},
		{Name: args.IfName, Mac: podIf.HardwareAddr.String(), Sandbox: args.Netns},
	}
	for _, ipc := range res.IPs {
		ipc.Interface = current.Int(1)
		ipc.Address = net.IPNet{IP: ipc.Address.IP, Mask: net.CIDRMask(32, 32)}
		ipc.Gateway = gatewayIP()
	}
	res.Routes = podRoutes()
	return res
}

// lease is what allocate got from the IPAM plugin; release, set once an
// address is leased, gives it back for a later step's failure.
type lease struct {
	res     *current.Result
	ip      netip.Addr
	release func()
	err     error
}

// allocate leases the pod's address from the IPAM plugin.
func allocate(args *skel.CmdArgs, conf *NetConf, log *slog.Logger) lease {
	r, err := ipam.ExecAdd(conf.IPAM.Type, args.StdinData)
	if err != nil {
		// The IPAM plugin's own code says best whether to retry (an
		// exhausted range) or to fix the conf; a plugin that cannot even
		// be run is a conf problem.
		code := uint(types.ErrInvalidNetworkConfig)
		var te *types.Error
		if errors.As(err, &te) {
			code = te.Code
		}
		return lease{err: types.NewError(code, fmt.Sprintf("ipam plugin %q failed: check the ipam section", conf.IPAM.Type), err.Error())}
	}
	l := lease{release: func() {
		if err := ipam.ExecDel(conf.IPAM.Type, args.StdinData); err != nil {
			log.Warn("release address after failed ADD", "err", err)
		}
	}}
	if l.res, err = current.NewResultFromResult(r); err != nil {
		l.err = types.NewError(types.ErrDecodingFailure, "cannot read the ipam plugin's result", err.Error())
		return l
	}
	l.ip, l.err = singleIPv4(l.res.IPs)
	return l
}

// makeVeth makes the veth pair from inside the pod's namespace, both ends
// down, and labels the host end for network at once, so that whatever a
// killed ADD leaves from here on, DEL finds by name and GC by label.
// delVeth, non-nil once the pair exists (even when err is set), deletes it
// again.
func makeVeth(args *skel.CmdArgs, netns, hostNS ns.NetNS, hostName, network string, mtu int, log *slog.Logger) (hostIf, podIf net.Interface, delVeth func(), err error) {
	err = netns.Do(func(ns.NetNS) error {
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU = args.IfName, mtu
		err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: hostName, PeerNamespace: netlink.NsFd(int(hostNS.Fd()))})
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%s in the pod or %s on the node already exists: %w", args.IfName, hostName, err)
		}
		if err != nil {
			return fmt.Errorf("create veth pair: %w", err)
		}
		delVeth = func() {
			if err := ip.DelLinkByName(hostName); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
				log.Warn("delete veth after failed ADD", "ifname", hostName, "err", err)
			}
		}
		err = hostNS.Do(func(ns.NetNS) error {
			hostLink, err := netlink.LinkByName(hostName)
			if err != nil {
				return fmt.Errorf("find %s: %w", hostName, err)
			}
			hostIf = iface(hostLink)
			return labelHostVeth(hostLink, network)
		})
		if err != nil {
			return err
		}
		podLink, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return fmt.Errorf("find %s: %w", args.IfName, err)
		}
		podIf = iface(podLink)
		return nil
	})
	if err != nil {
		return hostIf, podIf, delVeth, fmt.Errorf("set up veth %s in %s: %w", args.IfName, args.Netns, err)
	}
	return hostIf, podIf, delVeth, nil
}

// readyPodEnd turns IPv6 off on the pod's end, then brings it up with its
// routes; its address comes with the lease (address). Runs inside the pod's
// namespace.
func readyPodEnd(pod net.Interface) error {
	// Before the link is up, so that the pod never sends the router
	// solicitations and MLD reports from_pod would drop as drop_ipv6.
	if err := ipv6off.Disable(pod.Name); err != nil {
		return err
	}
	return podLinkUp(byIndex(pod))
}

// byIndex is a handle on an interface netlink finds by its index, for calls
// that would otherwise look it up by name again.
func byIndex(i net.Interface) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: i.Index, Name: i.Name}}
}

// iface is l as the net package has it; net.InterfaceByName would list every
// link of the node to find one.
func iface(l netlink.Link) net.Interface {
	a := l.Attrs()
	return net.Interface{Index: a.Index, MTU: a.MTU, Name: a.Name, HardwareAddr: a.HardwareAddr, Flags: a.Flags}
}

// labelHostVeth readies the host end before it carries anything: no IPv6,
// and the alias that tells GC which network's veth this is, even when an
// ADD died before registering it anywhere.
func labelHostVeth(hostLink netlink.Link, network string) error {
	name := hostLink.Attrs().Name
	if err := ipv6off.Disable(name); err != nil {
		return err
	}
	if err := netlink.LinkSetAlias(hostLink, vethAlias(network)); err != nil {
		return fmt.Errorf("label host veth %s: %w", name, err)
	}
	return nil
}

// address gives the pod its address, and the host its route to the pod.
func address(args *skel.CmdArgs, netns ns.NetNS, podIf, hostIf net.Interface, podIP netip.Addr) error {
	err := netns.Do(func(ns.NetNS) error {
		return netlink.AddrAdd(byIndex(podIf), &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(podIP, 32))})
	})
	if err != nil {
		return fmt.Errorf("add %s/32 to %s in %s: %w", podIP, args.IfName, args.Netns, err)
	}
	return routeToPod(hostIf.Index, hostIf.Name, podIP)
}

// routeToPod is the host's way to the pod (kubelet probes, node traffic):
// the ordinary stack along a /32 through the host veth.
func routeToPod(hostIndex int, hostName string, podIP netip.Addr) error {
	if err := netlink.RouteReplace(&netlink.Route{
		LinkIndex: hostIndex,
		Dst:       prefixNet(netip.PrefixFrom(podIP, 32)),
		Scope:     netlink.SCOPE_LINK,
	}); err != nil {
		return fmt.Errorf("add host route to %s via %s: %w", podIP, hostName, err)
	}
	if err := ip.EnableIP4Forward(); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return nil
}

// prevPodIP reads prevResult and the pod's one IPv4 address in it.
func prevPodIP(conf *NetConf) (*current.Result, netip.Addr, error) {
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, netip.Addr{}, types.NewError(types.ErrDecodingFailure, "cannot read prevResult", err.Error())
	}
	podIP, err := singleIPv4(prev.IPs)
	return prev, podIP, err
}

func addChained(args *skel.CmdArgs, conf *NetConf, log *slog.Logger) error {
	prev, podIP, err := prevPodIP(conf)
	if err != nil {
		return err
	}
	hostLink, podIf, err := chainedInterfaces(prev, args)
	if err != nil {
		return err
	}
	// A bridge port too: only the port loses IPv6, not the bridge.
	if err := ipv6off.Disable(hostLink.Attrs().Name); err != nil {
		return err
	}
	if err := ns.WithNetNSPath(args.Netns, func(ns.NetNS) error { return ipv6off.Disable(args.IfName) }); err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("cannot turn off IPv6 on %s in %s", args.IfName, args.Netns), err.Error())
	}
	podMAC, err := net.ParseMAC(podIf.Mac)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("prevResult has no valid MAC for %s", podIf.Name), err.Error())
	}

	dp, err := openDatapath(conf, log)
	if err != nil {
		return err
	}
	defer dp.Close()
	ep := bpfmaps.EndpointInfo{
		IP: podIP, Ifindex: hostLink.Attrs().Index, Ifname: hostLink.Attrs().Name,
		MAC: podMAC, HostMAC: hostLink.Attrs().HardwareAddr,
		Container: args.ContainerID, PodIfname: args.IfName, Netns: args.Netns,
		Network: conf.Name, HostPath: conf.hostPath(),
	}
	staged, err := stage(dp, ep.Ifname, conf, log)
	if err != nil {
		return err
	}
	defer staged.Abort()
	if err := register(dp, bpfmaps.NewEndpoints(&dp.Maps), ep, staged, log); err != nil {
		return err
	}
	log.Info("registered chained pod", "pod_ip", podIP, "host_ifname", hostLink.Attrs().Name)
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// stage attaches from_pod to the host veth, to be recorded by register.
func stage(dp *datapath.Datapath, ifname string, conf *NetConf, log *slog.Logger) (*datapath.Staged, error) {
	st := dp.Stage
	if conf.shapedEgress() {
		st = dp.StageYielding
	}
	s, err := st(datapath.FromPod, ifname, log)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, fmt.Sprintf("cannot attach from_pod to %s", ifname), err.Error())
	}
	return s, nil
}

// register puts the endpoint in the maps and records its staged from_pod
// attachment, undoing the first if the second fails. It holds the endpoint
// lock, so the agent's reconcile never sees the endpoint without its link
// or the other way round; the slow attach itself was done before.
func register(dp *datapath.Datapath, eps *bpfmaps.Endpoints, ep bpfmaps.EndpointInfo, staged *datapath.Staged, log *slog.Logger) error {
	unlock, err := dp.LockEndpoints()
	if err != nil {
		return types.NewError(types.ErrInternal, "cannot lock the endpoint maps", err.Error())
	}
	defer unlock()
	if old, err := eps.Get(ep.IP); err == nil && old.Container != ep.Container {
		// IPAM just handed out this address, so the old owner is gone
		// without a DEL; GC would remove it too.
		log.Warn("replacing stale endpoint", "pod_ip", ep.IP, "old_container", old.Container)
	}
	if err := eps.Put(ep); err != nil {
		code := types.ErrInternal
		msg := "cannot register endpoint"
		if errors.Is(err, bpfmaps.ErrFull) {
			code = types.ErrTryAgainLater
			msg = "endpoint map is full: remove pods, or delete stale entries (patchcord bpf endpoint list)"
		}
		return types.NewError(code, msg, err.Error())
	}
	if err := staged.Commit(); err != nil {
		eps.DeleteIfOwned(ep.IP, ep.Ifindex)
		return types.NewError(types.ErrInternal, fmt.Sprintf("cannot attach from_pod to %s", ep.Ifname), err.Error())
	}
	return nil
}

func unregister(dp *datapath.Datapath, eps *bpfmaps.Endpoints, ep bpfmaps.EndpointInfo, log *slog.Logger) {
	unlock, err := dp.LockEndpoints()
	if err != nil {
		log.Warn("unregister endpoint", "pod_ip", ep.IP, "err", err)
		return
	}
	defer unlock()
	// Detach first: a veth without an endpoint would drop everything.
	if err := dp.Detach(datapath.FromPod, ep.Ifname); err != nil {
		log.Warn("detach from_pod", "ifname", ep.Ifname, "err", err)
	}
	if err := eps.DeleteIfOwned(ep.IP, ep.Ifindex); err != nil {
		log.Warn("delete endpoint", "pod_ip", ep.IP, "err", err)
	}
}

// podLinkUp brings the pod's interface up and routes everything through
// the link-local gateway.
func podLinkUp(link netlink.Link) error {
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", link.Attrs().Name, err)
	}
	for _, r := range []netlink.Route{
		{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: gatewayIP(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK},
		{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: gatewayIP()},
	} {
		if err := netlink.RouteAdd(&r); err != nil {
			return fmt.Errorf("add route %s in pod: %w", r.Dst, err)
		}
	}
	return nil
}

func podRoutes() []*types.Route {
	scopeLink := int(netlink.SCOPE_LINK)
	return []*types.Route{
		{Dst: net.IPNet{IP: gatewayIP(), Mask: net.CIDRMask(32, 32)}, Scope: &scopeLink},
		{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, GW: gatewayIP()},
	}
}

func singleIPv4(ips []*current.IPConfig) (netip.Addr, error) {
	var found []netip.Addr
	for _, c := range ips {
		a, ok := netip.AddrFromSlice(c.Address.IP)
		if !ok {
			continue
		}
		if a = a.Unmap(); !a.Is4() {
			// Written to the pod as a /32 with the IPv4 gateway, it
			// would make an invalid result; better a clear refusal.
			ones, _ := c.Address.Mask.Size()
			return netip.Addr{}, invalidConf("IPv6 address %s from range %s: patchcord does not carry IPv6 yet; remove the IPv6 range from the ipam section",
				a, netip.PrefixFrom(a, ones).Masked())
		}
		found = append(found, a)
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return netip.Addr{}, invalidConf("no IPv4 address to register: patchcord needs exactly one IPv4 address per pod interface (check the ipam ranges)")
	}
	return netip.Addr{}, invalidConf("%d IPv4 addresses %v: patchcord needs exactly one per pod interface (check the ipam ranges)", len(found), found)
}

// chainedInterfaces finds, in a previous plugin's result, the pod interface
// for this ADD and the host-side veth the plugin made for it: ptp lists
// [veth, pod], bridge lists [bridge, veth, pod], so the host side is the
// first host interface that is a veth.
func chainedInterfaces(prev *current.Result, args *skel.CmdArgs) (host netlink.Link, pod *current.Interface, err error) {
	var hostNames []string
	for _, i := range prev.Interfaces {
		switch {
		case i.Sandbox != "" && i.Name == args.IfName:
			pod = i
		case i.Sandbox == "":
			hostNames = append(hostNames, i.Name)
		}
	}
	if pod == nil {
		return nil, nil, invalidConf("prevResult lacks the pod interface %q: chain patchcord-cni after a plugin that creates a veth (ptp, bridge)", args.IfName)
	}
	var why []string
	for _, name := range hostNames {
		link, err := netlink.LinkByName(name)
		if err != nil {
			why = append(why, fmt.Sprintf("%s not found", name))
			continue
		}
		if _, ok := link.(*netlink.Veth); ok {
			return link, pod, nil
		}
		why = append(why, fmt.Sprintf("%s is a %s, not a veth", name, link.Type()))
	}
	return nil, nil, invalidConf("prevResult names no host-side veth (%s): chain patchcord-cni after a plugin that creates a veth (ptp, bridge)", strings.Join(why, "; "))
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// podMTU is the configured MTU, else the agent's (the uplink's, less VXLAN
// unless every node is native), else the default-route device's minus
// VXLAN, else 1450.
func podMTU(conf *NetConf, dp *datapath.Datapath, log *slog.Logger) int {
	if conf.MTU != 0 {
		return conf.MTU
	}
	if cfg, err := bpfmaps.NewConfig(&dp.Maps).Get(); err == nil && cfg.PodMTU() != 0 {
		return cfg.PodMTU()
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		log.Warn("list routes to derive the MTU", "err", err)
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			return l.Attrs().MTU - datapath.VXLANOverhead
		}
	}
	return 1500 - datapath.VXLANOverhead
}
