package cni

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
)

func del(args *skel.CmdArgs, conf *NetConf) error {
	log := logger(conf, nil).With("container", args.ContainerID, "ifname", args.IfName)
	if !conf.primary() {
		if err := withPinned(conf, func(dp *datapath.Datapath) error {
			return forget(dp, args.ContainerID, args.IfName, "", log)
		}); err != nil {
			return types.NewError(types.ErrTryAgainLater, "DEL did not complete; the runtime will retry", err.Error())
		}
		return nil
	}

	// The address is released beside the rest: an exec of the IPAM
	// plugin, ≈5 ms. A pod that gets it meanwhile is safe from this DEL,
	// which removes endpoints by (IP, ifindex).
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return fmt.Errorf("open host network namespace: %w", err)
	}
	defer hostNS.Close()
	released := make(chan error, 1)
	go func() {
		// A new goroutine may run on any thread, and a caller that runs
		// DEL in-process may have its own in another namespace.
		released <- hostNS.Do(func(ns.NetNS) error { return ipam.ExecDel(conf.IPAM.Type, args.StdinData) })
	}()

	// The veth goes first: deleting it takes from_pod's attachment, the
	// pod end and the host route along, and a tcx link with it, in the
	// one RCU grace period the deletion waits out anyway. Detaching first
	// would wait out a second one (≈17 ms), and under the endpoint lock.
	// Until forget, traffic for the pod finds a veth that is gone and is
	// dropped.
	var errs []error
	hostIfname := hostVethName(args.ContainerID, args.IfName)
	if err := ip.DelLinkByName(hostIfname); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
		// The pod stays policed as itself until the retry.
		errs = append(errs, fmt.Errorf("delete host veth: %w", err))
	} else {
		errs = append(errs, withPinned(conf, func(dp *datapath.Datapath) error {
			// The veth name needs no map: the record goes even if the
			// entries that name it are gone.
			return forget(dp, args.ContainerID, args.IfName, hostIfname, log)
		}))
	}
	if err := <-released; err != nil {
		errs = append(errs, fmt.Errorf("release address with ipam plugin %q: %w", conf.IPAM.Type, err))
	}
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrTryAgainLater, "DEL did not complete; the runtime will retry", err.Error())
	}
	return nil
}

// forget detaches and unregisters the endpoint a container interface owns,
// and detaches from_pod from hostIfname too when it is set. It holds the
// endpoint lock: the owner is looked up again under it, and the endpoint
// goes only if it is still that veth's, never a newer pod's with the same IP.
func forget(dp *datapath.Datapath, containerID, ifname, hostIfname string, log *slog.Logger) error {
	unlock, err := dp.LockEndpoints()
	if err != nil {
		return err
	}
	defer unlock()
	var errs []error
	if hostIfname != "" {
		errs = append(errs, dp.Detach(datapath.FromPod, hostIfname))
	}
	eps := bpfmaps.NewEndpoints(&dp.Maps)
	ep, err := eps.FindOwner(containerID, ifname)
	if errors.Is(err, bpfmaps.ErrNotFound) {
		return errors.Join(errs...)
	}
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := dp.Detach(datapath.FromPod, ep.Ifname); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := eps.DeleteIfOwned(ep.IP, ep.Ifindex); err != nil {
		return errors.Join(append(errs, err)...)
	}
	log.Info("removed pod", "pod_ip", ep.IP, "host_ifname", ep.Ifname)
	return errors.Join(errs...)
}

// withPinned runs f on the node's pinned datapath; where nothing was ever
// loaded there is nothing to undo, and f is not run.
func withPinned(conf *NetConf, f func(*datapath.Datapath) error) error {
	dp, err := datapath.OpenPinned(conf.BpffsRoot)
	if errors.Is(err, datapath.ErrNotLoaded) {
		return nil
	}
	if err != nil {
		return err
	}
	defer dp.Close()
	return f(dp)
}

// collectStale forgets every endpoint of this network whose attachment the
// runtime no longer knows, and deletes its veth in primary mode.
func collectStale(dp *datapath.Datapath, conf *NetConf, valid map[[2]string]bool, log *slog.Logger) error {
	list, err := bpfmaps.NewEndpoints(&dp.Maps).Owners()
	errs := []error{err}
	for _, ep := range list {
		// Another network's endpoints are its own GC's business.
		if ep.Container == "" || ep.Network != conf.Name || valid[[2]string{ep.Container, ep.PodIfname}] {
			continue
		}
		log.Info("collecting stale endpoint", "pod_ip", ep.IP, "container", ep.Container)
		errs = append(errs, forget(dp, ep.Container, ep.PodIfname, "", log))
		if conf.primary() {
			if err := ip.DelLinkByName(ep.Ifname); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
				errs = append(errs, fmt.Errorf("delete veth %s: %w", ep.Ifname, err))
			}
		}
	}
	return errors.Join(errs...)
}

func gc(args *skel.CmdArgs, conf *NetConf) error {
	log := logger(conf, nil)
	valid := make(map[[2]string]bool, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		valid[[2]string{a.ContainerID, a.IfName}] = true
	}

	errs := []error{withPinned(conf, func(dp *datapath.Datapath) error {
		return collectStale(dp, conf, valid, log)
	})}
	if conf.primary() {
		errs = append(errs, gcVeths(conf, log))
		if err := invoke.DelegateGC(context.TODO(), conf.IPAM.Type, args.StdinData, nil); err != nil {
			errs = append(errs, fmt.Errorf("ipam plugin %q GC: %w", conf.IPAM.Type, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrTryAgainLater, "GC did not complete", err.Error())
	}
	return nil
}

func status(args *skel.CmdArgs, conf *NetConf) error {
	dp, err := openDatapath(conf, logger(conf, nil))
	if err != nil {
		return err
	}
	dp.Close()
	if conf.primary() {
		if err := ipam.ExecStatus(conf.IPAM.Type, args.StdinData); err != nil {
			return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("ipam plugin %q is not ready", conf.IPAM.Type), err.Error())
		}
	}
	return nil
}

// gcVeths deletes the network's host veths no valid attachment owns: those
// of ADDs that died before registering anything.
func gcVeths(conf *NetConf, log *slog.Logger) error {
	var errs []error
	keep := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		keep[hostVethName(a.ContainerID, a.IfName)] = true
	}
	links, err := netlink.LinkList()
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		name := l.Attrs().Name
		if _, ok := l.(*netlink.Veth); !ok || keep[name] || l.Attrs().Alias != vethAlias(conf.Name) {
			continue
		}
		log.Info("collecting stale veth", "ifname", name)
		if err := ip.DelLinkByName(name); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
			errs = append(errs, fmt.Errorf("delete veth %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}
