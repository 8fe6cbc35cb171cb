// Kernel vxlan devices on lab nodes: a node that speaks Flannel's wire (flannel.1 and its
// per-peer route, neighbour and FDB entry, exactly as flanneld's vxlan backend writes them),
// so that patchcord's eBPF tunnel can be tested against the kernel's own, and odd tunnel
// endpoints (a wrong VNI, a stranger's address) for the drop paths.
package lab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// FlannelDevice, FlannelVNI and FlannelPort are what flanneld's vxlan backend uses by
// default: VNI 1, and port 0 in its config, which leaves the kernel's default, 8472.
const (
	FlannelDevice = "flannel.1"
	FlannelVNI    = 1
	FlannelPort   = 8472
)

// VXLAN is a kernel vxlan device bound to a node's uplink eth0, with the node's IP as its
// local tunnel address and MAC learning off (peers come from AddVXLANPeer, as flanneld
// writes them).
type VXLAN struct {
	Name string
	VNI  int
	// Port is the UDP destination port; 0 means the kernel's default, 8472.
	Port int
	// MTU of the device; 0 means the kernel's choice (the uplink's MTU minus 50).
	MTU int
	// Addr, if valid, is added to the device: Flannel puts <podCIDR>.0/32 there, so that
	// the node's own packets to remote pods leave with a source in its pod CIDR.
	Addr netip.Prefix
}

// VXLANPeer is a remote pod CIDR reached through a vxlan device.
type VXLANPeer struct {
	PodCIDR netip.Prefix
	NodeIP  netip.Addr
	// VtepMAC is the inner destination MAC the peer expects: its flannel.1 MAC for a
	// Flannel node; any unicast MAC for a patchcord node, which ignores it (the lab uses
	// the peer's uplink MAC).
	VtepMAC net.HardwareAddr
}

// AddVXLAN creates dev in the node's namespace, up, and returns its MAC. On error nothing of
// it remains.
func (n *Node) AddVXLAN(dev VXLAN) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := withHandle(n.NSPath, func(h *netlink.Handle) error {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return fmt.Errorf("find eth0: %w", err)
		}
		vx := &netlink.Vxlan{
			LinkAttrs:    netlink.LinkAttrs{Name: dev.Name, MTU: dev.MTU, TxQLen: -1},
			VxlanId:      dev.VNI,
			VtepDevIndex: eth0.Attrs().Index,
			SrcAddr:      n.IP.AsSlice(),
			Port:         dev.Port,
			Learning:     false, // nolearning, as flanneld sets it
		}
		if err := h.LinkAdd(vx); err != nil {
			return fmt.Errorf("add vxlan %s (vni %d, port %d): %w", dev.Name, dev.VNI, dev.Port, err)
		}
		link, err := h.LinkByName(dev.Name)
		if err == nil && dev.Addr.IsValid() {
			a := &netlink.Addr{IPNet: prefixIPNet(dev.Addr)}
			if err = h.AddrAdd(link, a); err != nil {
				err = fmt.Errorf("add %s to %s: %w", dev.Addr, dev.Name, err)
			}
		}
		if err == nil {
			if err = h.LinkSetUp(link); err != nil {
				err = fmt.Errorf("set %s up: %w", dev.Name, err)
			}
		}
		if err == nil {
			// Read back: the MAC is the kernel's random choice, and up may have changed nothing
			// else, but the caller wants what the device really has.
			if link, err = h.LinkByName(dev.Name); err == nil {
				mac = link.Attrs().HardwareAddr
			}
		}
		if err != nil {
			if derr := h.LinkDel(vx); derr != nil {
				err = fmt.Errorf("%w (and removing %s: %v)", err, dev.Name, derr)
			}
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("node %d: %w", n.Index, err)
	}
	n.Lab.log.Info("vxlan added", "node", n.Index, "dev", dev.Name, "vni", dev.VNI, "port", dev.Port, "mac", mac)
	return mac, nil
}

// AddVXLANPeer routes peer's pod CIDR through the vxlan device dev as flanneld does: a
// route via <podCIDR>.0 onlink, a permanent neighbour <podCIDR>.0 -> VtepMAC, and an FDB
// entry VtepMAC -> the peer's node IP. Repeating it for the same peer replaces the entries.
func (n *Node) AddVXLANPeer(dev string, peer VXLANPeer) error {
	gw := peer.PodCIDR.Masked().Addr()
	err := withHandle(n.NSPath, func(h *netlink.Handle) error {
		link, err := h.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("find %s: %w", dev, err)
		}
		idx := link.Attrs().Index
		if err := h.NeighSet(&netlink.Neigh{
			LinkIndex:    idx,
			Family:       unix.AF_BRIDGE,
			Flags:        netlink.NTF_SELF,
			State:        netlink.NUD_PERMANENT,
			IP:           peer.NodeIP.AsSlice(),
			HardwareAddr: peer.VtepMAC,
		}); err != nil {
			return fmt.Errorf("add fdb %s dst %s on %s: %w", peer.VtepMAC, peer.NodeIP, dev, err)
		}
		if err := h.NeighSet(&netlink.Neigh{
			LinkIndex:    idx,
			Family:       unix.AF_INET,
			State:        netlink.NUD_PERMANENT,
			IP:           gw.AsSlice(),
			HardwareAddr: peer.VtepMAC,
		}); err != nil {
			return fmt.Errorf("add neighbour %s lladdr %s on %s: %w", gw, peer.VtepMAC, dev, err)
		}
		if err := h.RouteReplace(&netlink.Route{
			LinkIndex: idx,
			Dst:       prefixIPNet(peer.PodCIDR.Masked()),
			Gw:        gw.AsSlice(),
			Flags:     int(netlink.FLAG_ONLINK),
		}); err != nil {
			return fmt.Errorf("add route %s via %s dev %s onlink: %w", peer.PodCIDR, gw, dev, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("node %d: vxlan peer %s: %w", n.Index, peer.NodeIP, err)
	}
	return nil
}

// AddFlannel makes the node a Flannel vxlan node: flannel.1 (VNI 1, port 8472, MTU
// uplink-50, nolearning) with <podCIDR>.0/32 on it. It returns the device's MAC, the
// VtepMAC other nodes must use for it. Peers come with AddVXLANPeer(FlannelDevice, ...);
// pods with FlannelConflist. ip_forward is already on in every lab node.
func (n *Node) AddFlannel() (net.HardwareAddr, error) {
	return n.AddVXLAN(VXLAN{
		Name: FlannelDevice,
		VNI:  FlannelVNI,
		Port: FlannelPort,
		MTU:  1450,
		Addr: netip.PrefixFrom(n.PodCIDR.Masked().Addr(), 32),
	})
}

// FlannelConflist is network "flannel-ptp": the reference ptp plugin alone, as a Flannel
// node's pods would be wired without patchcord (MTU 1450, host-local over the node's pod
// CIDR with a default route, no masquerade).
func (n *Node) FlannelConflist() []byte {
	return conflist("flannel-ptp", struct {
		Type   string    `json:"type"`
		IPMasq bool      `json:"ipMasq"`
		MTU    int       `json:"mtu"`
		IPAM   *ipamConf `json:"ipam"`
	}{"ptp", false, 1450, n.ptpIPAM()})
}

// LinkMAC returns the MAC of a link in the node's namespace, e.g. "eth0" for the VtepMAC
// a kernel vxlan peer uses to reach a patchcord node.
func (n *Node) LinkMAC(name string) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := withHandle(n.NSPath, func(h *netlink.Handle) error {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s: %w", name, err)
		}
		mac = link.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("node %d: %w", n.Index, err)
	}
	return mac, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
