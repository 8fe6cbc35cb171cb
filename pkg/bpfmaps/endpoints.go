package bpfmaps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// EndpointInfo is a local pod as the datapath knows it, with the owner the
// CNI plugin recorded.
type EndpointInfo struct {
	IP        netip.Addr
	Ifindex   int
	Ifname    string // host-side veth
	MAC       net.HardwareAddr
	HostMAC   net.HardwareAddr
	Container string
	PodIfname string
	Netns     string
	Network   string // the conflist's name
	// HostPath keeps the pod's traffic on the host stack, through its
	// veth's qdiscs, instead of redirecting it (a shaped pod).
	HostPath bool
}

// Endpoints is the pair of endpoint maps plus their owners.
type Endpoints struct {
	byIP, byIfindex, meta *ebpf.Map
}

func NewEndpoints(m *datapath.Maps) *Endpoints {
	return &Endpoints{byIP: m.Endpoints, byIfindex: m.EpByIfindex, meta: m.EpMeta}
}

// Put registers ep. The by-ifindex entry goes in first and the by-IP entry
// last, so the pod may send before anyone can send to it, never the other way
// round. A failure undoes what was written.
func (e *Endpoints) Put(ep EndpointInfo) error {
	if !ep.IP.Is4() {
		return fmt.Errorf("endpoint %s: only IPv4 is supported", ep.IP)
	}
	mac, err := mac6(ep.MAC)
	if err != nil {
		return fmt.Errorf("endpoint %s: pod %w", ep.IP, err)
	}
	hostMAC, err := mac6(ep.HostMAC)
	if err != nil {
		return fmt.Errorf("endpoint %s: host %w", ep.IP, err)
	}
	val := datapath.Endpoint{Ip: u32(ep.IP), Ifindex: uint32(ep.Ifindex), Mac: mac, HostMac: hostMAC}
	if ep.HostPath {
		val.Flags |= datapath.EndpointHostPath
	}
	var meta datapath.EndpointMeta
	if err := errors.Join(
		putCString(meta.ContainerId[:], ep.Container, "container ID"),
		putCString(meta.Ifname[:], ep.PodIfname, "pod interface name"),
		putCString(meta.HostIfname[:], ep.Ifname, "host interface name"),
		putCString(meta.Netns[:], ep.Netns, "netns path"),
		putCString(meta.Network[:], ep.Network, "network name"),
	); err != nil {
		return fmt.Errorf("endpoint %s: %w", ep.IP, err)
	}

	key, ifindex := u32(ep.IP), uint32(ep.Ifindex)
	if err := mapErr(e.meta, e.meta.Put(key, &meta)); err != nil {
		return fmt.Errorf("register endpoint %s: %w", ep.IP, err)
	}
	if err := mapErr(e.byIfindex, e.byIfindex.Put(ifindex, &val)); err != nil {
		e.meta.Delete(key)
		return fmt.Errorf("register endpoint %s: %w", ep.IP, err)
	}
	if err := mapErr(e.byIP, e.byIP.Put(key, &val)); err != nil {
		e.byIfindex.Delete(ifindex)
		e.meta.Delete(key)
		return fmt.Errorf("register endpoint %s: %w", ep.IP, err)
	}
	return nil
}

// Get returns the endpoint with ip, or ErrNotFound.
func (e *Endpoints) Get(ip netip.Addr) (EndpointInfo, error) {
	if !ip.Is4() {
		return EndpointInfo{}, ErrNotFound
	}
	var val datapath.Endpoint
	if err := mapErr(e.byIP, e.byIP.Lookup(u32(ip), &val)); err != nil {
		return EndpointInfo{}, err
	}
	return e.info(val), nil
}

// Delete removes the endpoint with ip, if any: the by-IP entry first, so
// nothing is sent to it while it goes.
func (e *Endpoints) Delete(ip netip.Addr) error {
	key := u32(ip)
	var val datapath.Endpoint
	err := mapErr(e.byIP, e.byIP.Lookup(key, &val))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("look up endpoint %s: %w", ip, err)
	}
	var errs []error
	if err == nil {
		errs = append(errs, ignoreNotFound(e.byIP, e.byIP.Delete(key)))
		// Only drop the anti-spoofing entry if it is this endpoint's:
		// the ifindex may have been reused by a newer pod.
		errs = append(errs, e.deleteByIfindexIf(val.Ifindex, key))
	} else {
		// An ADD killed between its writes leaves the anti-spoofing entry
		// without a forwarding one: find it by address.
		errs = append(errs, e.deleteByIfindexFor(key))
	}
	errs = append(errs, ignoreNotFound(e.meta, e.meta.Delete(key)))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete endpoint %s: %w", ip, err)
	}
	return nil
}

// DeleteIfOwned removes the endpoint with ip if it is the one on the host
// veth ifindex: the delete of a pod that is gone must not remove a newer pod
// that IPAM gave the same address. When the address is a newer pod's, only
// the old veth's anti-spoofing entry goes. An address without a forwarding
// entry (an ADD killed between its writes) is nobody's: what is left of it
// goes, whatever ifindex says.
func (e *Endpoints) DeleteIfOwned(ip netip.Addr, ifindex int) error {
	key := u32(ip)
	var val datapath.Endpoint
	err := mapErr(e.byIP, e.byIP.Lookup(key, &val))
	switch {
	case errors.Is(err, ErrNotFound) || err == nil && int(val.Ifindex) == ifindex:
		return e.Delete(ip)
	case err == nil:
		if err := e.deleteByIfindexIf(uint32(ifindex), key); err != nil {
			return fmt.Errorf("delete endpoint %s on ifindex %d: %w", ip, ifindex, err)
		}
		return nil
	}
	return fmt.Errorf("look up endpoint %s: %w", ip, err)
}

// deleteByIfindexIf removes the anti-spoofing entry of ifindex if it is
// for the address key.
func (e *Endpoints) deleteByIfindexIf(ifindex, key uint32) error {
	var cur datapath.Endpoint
	if e.byIfindex.Lookup(ifindex, &cur) != nil || cur.Ip != key {
		return nil
	}
	return ignoreNotFound(e.byIfindex, e.byIfindex.Delete(ifindex))
}

// List returns every endpoint.
func (e *Endpoints) List() ([]EndpointInfo, error) {
	return collect(e.byIP, "endpoints", func(_ uint32, val datapath.Endpoint) EndpointInfo { return e.info(val) })
}

// Owners returns every endpoint with a recorded owner, also those an ADD
// killed between its writes left without a forwarding entry.
func (e *Endpoints) Owners() ([]EndpointInfo, error) {
	return collect(e.meta, "endpoint owners", func(key uint32, meta datapath.EndpointMeta) EndpointInfo {
		return e.withMeta(EndpointInfo{IP: addr(key)}, meta)
	})
}

// collect walks m and turns each entry into an element of the result.
func collect[K, V, T any](m *ebpf.Map, what string, conv func(K, V) T) ([]T, error) {
	var (
		key K
		val V
		out []T
	)
	iter := m.Iterate()
	for iter.Next(&key, &val) {
		out = append(out, conv(key, val))
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", what, err)
	}
	return out, nil
}

// FindOwner returns the endpoint registered for a container's interface.
func (e *Endpoints) FindOwner(containerID, podIfname string) (EndpointInfo, error) {
	owners, err := e.Owners()
	if err != nil {
		return EndpointInfo{}, err
	}
	for _, o := range owners {
		if o.Container != containerID || o.PodIfname != podIfname {
			continue
		}
		if ep, err := e.Get(o.IP); err == nil {
			return ep, nil
		}
		// Owner known, forwarding entry gone: report what is left.
		return o, nil
	}
	return EndpointInfo{}, ErrNotFound
}

func (e *Endpoints) info(val datapath.Endpoint) EndpointInfo {
	ep := EndpointInfo{IP: addr(val.Ip), Ifindex: int(val.Ifindex), MAC: hw(val.Mac), HostMAC: hw(val.HostMac),
		HostPath: val.Flags&datapath.EndpointHostPath != 0}
	var meta datapath.EndpointMeta
	if e.meta.Lookup(val.Ip, &meta) == nil {
		ep = e.withMeta(ep, meta)
	}
	return ep
}

func (e *Endpoints) withMeta(ep EndpointInfo, meta datapath.EndpointMeta) EndpointInfo {
	ep.Container = cString(meta.ContainerId[:])
	ep.PodIfname = cString(meta.Ifname[:])
	ep.Ifname = cString(meta.HostIfname[:])
	ep.Netns = cString(meta.Netns[:])
	ep.Network = cString(meta.Network[:])
	return ep
}

func ignoreNotFound(m *ebpf.Map, err error) error {
	if err = mapErr(m, err); errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

func (e *Endpoints) deleteByIfindexFor(key uint32) error {
	var (
		ifindex uint32
		val     datapath.Endpoint
		stale   []uint32
	)
	iter := e.byIfindex.Iterate()
	for iter.Next(&ifindex, &val) {
		if val.Ip == key {
			stale = append(stale, ifindex)
		}
	}
	if err := iter.Err(); err != nil {
		return fmt.Errorf("search anti-spoofing entries: %w", err)
	}
	var errs []error
	for _, i := range stale {
		errs = append(errs, ignoreNotFound(e.byIfindex, e.byIfindex.Delete(i)))
	}
	return errors.Join(errs...)
}
