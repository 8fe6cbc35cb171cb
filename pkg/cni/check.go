package cni

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
)

func check(args *skel.CmdArgs, conf *NetConf) error {
	if conf.PrevResult == nil {
		return invalidConf("CHECK needs prevResult: the runtime passes the ADD result")
	}
	prev, podIP, err := prevPodIP(conf)
	if err != nil {
		return err
	}

	ep, err := checkHost(args, conf, podIP)
	if err != nil {
		return err
	}
	err = ns.WithNetNSPath(args.Netns, func(ns.NetNS) error { return checkPod(args, conf, prev, ep, podIP) })
	if err != nil {
		var nsErr ns.NSPathNotExistErr
		if errors.As(err, &nsErr) {
			return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("network namespace %s is gone", args.Netns), err.Error())
		}
		return types.NewError(types.ErrInternal, "pod interface check failed", err.Error())
	}
	return nil
}

// checkHost checks the datapath's side of the pod at podIP: its endpoint,
// host veth and from_pod attachment.
func checkHost(args *skel.CmdArgs, conf *NetConf, podIP netip.Addr) (bpfmaps.EndpointInfo, error) {
	dp, err := datapath.OpenPinned(conf.BpffsRoot)
	if err != nil {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrPluginNotAvailable, "patchcord datapath is not loaded", err.Error())
	}
	defer dp.Close()
	ep, err := bpfmaps.NewEndpoints(&dp.Maps).Get(podIP)
	if errors.Is(err, bpfmaps.ErrNotFound) {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrUnknownContainer, fmt.Sprintf("pod %s is not registered in the datapath: delete and re-add the pod", podIP), "")
	}
	if err != nil {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrInternal, "cannot read the endpoint map", err.Error())
	}
	if ep.Container != args.ContainerID || ep.PodIfname != args.IfName {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrUnknownContainer, fmt.Sprintf("pod address %s is registered to container %s/%s, not this one", podIP, ep.Container, ep.PodIfname), "")
	}
	host, err := netlink.LinkByName(ep.Ifname)
	if err != nil {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrInternal, fmt.Sprintf("host veth %s of pod %s is gone", ep.Ifname, podIP), err.Error())
	}
	if host.Attrs().Index != ep.Ifindex || host.Attrs().HardwareAddr.String() != ep.HostMAC.String() {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrInternal, fmt.Sprintf("host veth %s was recreated since the pod was registered (ifindex %d, registered %d)", ep.Ifname, host.Attrs().Index, ep.Ifindex), "")
	}
	if err := ipv6off.Check(ep.Ifname); err != nil {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrInternal, "host veth speaks IPv6: delete and re-add the pod", err.Error())
	}
	if err := dp.Attached(datapath.FromPod, ep.Ifname); err != nil {
		return bpfmaps.EndpointInfo{}, types.NewError(types.ErrInternal, "from_pod is not attached as it should be: restart the agent to repair attachments", err.Error())
	}
	return ep, nil
}

// checkPod checks the pod's interface, from inside its namespace.
func checkPod(args *skel.CmdArgs, conf *NetConf, prev *current.Result, ep bpfmaps.EndpointInfo, podIP netip.Addr) error {
	link, err := netlink.LinkByName(args.IfName)
	if err != nil {
		return fmt.Errorf("pod interface %s: %w", args.IfName, err)
	}
	if err := ipv6off.Check(args.IfName); err != nil {
		return err
	}
	if link.Attrs().HardwareAddr.String() != ep.MAC.String() {
		return fmt.Errorf("pod interface %s has MAC %s, registered %s: anti-spoofing drops its traffic", args.IfName, link.Attrs().HardwareAddr, ep.MAC)
	}
	// ip.ValidateExpectedInterfaceIPs wants a subnet route per address;
	// a /32 pod has none, so only the address itself is checked.
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", args.IfName, err)
	}
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.Equal(podIP.AsSlice()) }) {
		return fmt.Errorf("pod interface %s lacks its address %s", args.IfName, podIP)
	}
	if conf.primary() {
		return ip.ValidateExpectedRoute(prev.Routes)
	}
	return nil
}
