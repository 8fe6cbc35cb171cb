// NIC-like uplinks: a veth carries GSO packets whole, which no physical link
// does. With segmentation off on send and GRO on receive, the wire carries
// MTU-sized frames and the receiver merges them again, as a NIC driver's GRO
// does; tests and the bench share these settings.
package lab

import (
	"context"
	"fmt"
)

// Links is how a node's uplink carries packets.
type Links string

const (
	// LinksVeth is a veth as created: GSO packets cross whole, no GRO.
	LinksVeth Links = "veth"
	// LinksNIC is NIC-like: TSO and GSO off, GRO on.
	LinksNIC Links = "nic"
)

// linkFeatures are the ethtool -K settings of both ends of an uplink. GRO
// on a veth gives its receive side the NAPI instance GRO runs in; the kernel
// uses it only for packets from a peer without TSO
// (veth_skb_is_eligible_for_gro), so the switch's port needs them as well.
var linkFeatures = map[Links][]string{
	LinksVeth: {"tso", "on", "gso", "on", "gro", "off"},
	LinksNIC:  {"tso", "off", "gso", "off", "gro", "on"},
}

// SetLinks sets the node's uplink, eth0 and its switch port, to mode.
func (n *Node) SetLinks(ctx context.Context, mode Links) error {
	features, ok := linkFeatures[mode]
	if !ok {
		return fmt.Errorf("node %d: unknown link mode %q (veth or nic)", n.Index, mode)
	}
	for _, end := range []struct{ netns, dev string }{
		{n.NetNS, "eth0"},
		{n.Lab.FabricNS(), fmt.Sprintf("n%d", n.Index)},
	} {
		args := append([]string{"-K", end.dev}, features...)
		if out, err := n.Lab.exec(ctx, end.netns, "ethtool", args...); err != nil {
			return fmt.Errorf("node %d: ethtool %v in %s: %w: %s", n.Index, args, end.netns, err, out)
		}
	}
	return nil
}
