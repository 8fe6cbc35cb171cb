// NIC-like uplinks: a veth carries GSO packets whole, which no physical link
// does. With segmentation off on send and GRO on receive, the wire carries
// MTU-sized frames and the receiver merges them again, as a NIC driver's GRO
// does; tests and the bench share this one setting.
package lab

import (
	"context"
	"fmt"
)

// NICLikeFeatures are the ethtool -K settings of both ends of a NIC-like
// uplink. GRO on a veth gives its receive side the NAPI instance GRO runs in;
// the kernel uses it only for packets from a peer without TSO
// (veth_skb_is_eligible_for_gro), so the switch's port needs them as well.
var NICLikeFeatures = []string{"tso", "off", "gso", "off", "gro", "on"}

// SetNICLike makes the node's uplink, eth0 and its switch port, NIC-like.
func (n *Node) SetNICLike(ctx context.Context) error {
	for _, end := range []struct{ netns, dev string }{
		{n.NetNS, "eth0"},
		{n.Lab.FabricNS(), fmt.Sprintf("n%d", n.Index)},
	} {
		args := append([]string{"-K", end.dev}, NICLikeFeatures...)
		if out, err := n.Lab.exec(ctx, end.netns, "ethtool", args...); err != nil {
			return fmt.Errorf("node %d: ethtool %v in %s: %w: %s", n.Index, args, end.netns, err, out)
		}
	}
	return nil
}
