package bpfmaps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// Node is a remote node: where its pods live and how to reach it.
type Node struct {
	PodCIDR netip.Prefix
	NodeIP  netip.Addr
	VtepMAC net.HardwareAddr // nil unless the peer runs a kernel vxlan device
	// Native: its pods are reached by routing, without the tunnel.
	Native bool
}

// Nodes is the remote-node LPM map plus the tunnel sources decap accepts.
type Nodes struct {
	byCIDR, sources *ebpf.Map
}

func NewNodes(m *datapath.Maps) *Nodes {
	return &Nodes{byCIDR: m.Nodes, sources: m.TunnelSrcs}
}

func lpmKey(p netip.Prefix) datapath.LPMKey {
	p = p.Masked()
	return datapath.LPMKey{Prefixlen: uint32(p.Bits()), Addr: u32(p.Addr())}
}

// Put adds or replaces a node. Its tunnel source goes in first, so that
// replies to the first encapsulated packet are already accepted.
func (n *Nodes) Put(node Node) error {
	if !node.PodCIDR.Addr().Is4() || !node.NodeIP.Is4() {
		return fmt.Errorf("node %s: only IPv4 is supported", node.NodeIP)
	}
	val := datapath.NodeInfo{NodeIp: u32(node.NodeIP)}
	if node.Native {
		val.Flags |= uint16(datapath.NodeNative)
	}
	if len(node.VtepMAC) != 0 {
		m, err := mac6(node.VtepMAC)
		if err != nil {
			return fmt.Errorf("node %s: vtep %w", node.NodeIP, err)
		}
		val.VtepMac = m
	}
	if err := mapErr(n.sources, n.sources.Put(u32(node.NodeIP), uint32(1))); err != nil {
		return fmt.Errorf("add tunnel source %s: %w", node.NodeIP, err)
	}
	if err := mapErr(n.byCIDR, n.byCIDR.Put(lpmKey(node.PodCIDR), &val)); err != nil {
		return fmt.Errorf("add node %s (%s): %w", node.NodeIP, node.PodCIDR, err)
	}
	return nil
}

// Delete removes the node owning podCIDR. Its tunnel source stays until
// PruneSources: another CIDR may still point at the same node.
func (n *Nodes) Delete(podCIDR netip.Prefix) error {
	key := lpmKey(podCIDR)
	if err := ignoreNotFound(n.byCIDR, n.byCIDR.Delete(&key)); err != nil {
		return fmt.Errorf("delete node %s: %w", podCIDR, err)
	}
	return nil
}

// DeleteSource removes one tunnel source: a node gone or renumbered, whose
// address no other node uses.
func (n *Nodes) DeleteSource(ip netip.Addr) error {
	if err := ignoreNotFound(n.sources, n.sources.Delete(u32(ip))); err != nil {
		return fmt.Errorf("delete tunnel source %s: %w", ip, err)
	}
	return nil
}

// PruneSources removes every tunnel source not in keep: nodes gone, and a
// renumbered node's old address, from which VXLAN must no longer be taken.
func (n *Nodes) PruneSources(keep map[netip.Addr]bool) error {
	all, err := collect(n.sources, "tunnel sources", func(key, _ uint32) uint32 { return key })
	if err != nil {
		return err
	}
	var errs []error
	for _, k := range all {
		if keep[addr(k)] {
			continue
		}
		errs = append(errs, n.DeleteSource(addr(k)))
	}
	return errors.Join(errs...)
}

// List returns every node.
func (n *Nodes) List() ([]Node, error) {
	return collect(n.byCIDR, "nodes", func(key datapath.LPMKey, val datapath.NodeInfo) Node {
		node := Node{
			PodCIDR: netip.PrefixFrom(addr(key.Addr), int(key.Prefixlen)),
			NodeIP:  addr(val.NodeIp),
			Native:  val.Flags&uint16(datapath.NodeNative) != 0,
		}
		if val.VtepMac != [6]uint8{} {
			node.VtepMAC = hw(val.VtepMac)
		}
		return node
	})
}
