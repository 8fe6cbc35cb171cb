// This file tests what BPF_PROG_RUN cannot build: a frame whose 802.1Q tag
// the kernel has already moved into skb->vlan_tci, and an skb the pod
// encapsulated itself (skb->encapsulation set by a vxlan device). Each case
// runs from_pod on a real veth ("dummy0") in a namespace of its own; the
// pod's side is the veth's peer ("dummy0p") in the same namespace.
package datapath_test

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/patchcord/patchcord/pkg/maps"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostileVeth is from_pod attached to dummy0 with the pod behind dummy0p
// registered as podA's address and dummy0p's MAC.
type hostileVeth struct {
	n         *testNode
	netns     ns.NetNS
	host, pod netlink.Link
}

func mustHostileVeth(t *testing.T) *hostileVeth {
	t.Helper()
	h := &hostileVeth{n: &testNode{tb: t, d: datapathtest.MustOpen(t)}, netns: mustDummyNS(t)}
	err := h.netns.Do(func(ns.NetNS) error {
		var err error
		if h.host, err = netlink.LinkByName("dummy0"); err != nil {
			return err
		}
		if h.pod, err = netlink.LinkByName("dummy0p"); err != nil {
			return err
		}
		for _, l := range []netlink.Link{h.host, h.pod} {
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return h.n.d.Attach(datapath.FromPod, "dummy0", datapathtest.Logger(t))
	})
	if err != nil {
		t.Fatalf("set up dummy0 with from_pod: %v", err)
	}
	h.n.put(maps.EndpointInfo{IP: podA.IP, Ifindex: h.host.Attrs().Index,
		MAC: h.pod.Attrs().HardwareAddr, HostMAC: h.host.Attrs().HardwareAddr})
	h.n.addNode(peerNode())
	h.n.configure(defaultConfig())
	return h
}

// waitCounter polls until counter name has reached at least want packets.
func (h *hostileVeth) waitCounter(name string, want uint64) map[string]maps.Counter {
	h.n.tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := maps.NewStats(&h.n.d.Maps).Read()
		if err != nil {
			h.n.tb.Fatal(err)
		}
		if got[name].Packets >= want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond) // polling, not waiting for readiness
	}
}

// A single 802.1Q tag with the pod's own addresses reaches tc ingress as
// skb->vlan_tci, not in the frame: from_pod must still drop it.
func TestFromPodDropsAcceleratedVLANTag(t *testing.T) {
	h := mustHostileVeth(t)
	const port = 7777
	ip := udpPacket(podA.IP, podB.IP)
	ip.l4 = udp{SrcPort: 40000, DstPort: port}.marshal([]byte("tagged"))
	inner := ip.marshal()
	frame := ethernet{Dst: h.host.Attrs().HardwareAddr, Src: h.pod.Attrs().HardwareAddr, Type: ethTypeVLAN}.
		marshal(append([]byte{0, 10, 0x08, 0x00}, inner...))

	err := h.netns.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: h.pod.Attrs().Index})
	})
	if err != nil {
		t.Fatalf("send tagged frame from dummy0p: %v", err)
	}

	got := h.waitCounter("drop_vlan", 1)
	if got["drop_vlan"].Packets != 1 {
		t.Errorf("drop_vlan: got %+v, want the one tagged frame", got["drop_vlan"])
	}
	for _, passed := range []string{"to_host", "local_redirect", "encap"} {
		if got[passed].Packets != 0 {
			t.Errorf("%s: got %+v, want nothing through", passed, got[passed])
		}
	}
}

// A pod running its own vxlan device sends skbs with skb->encapsulation
// set; bpf_skb_adjust_room refuses to encapsulate them again, and from_pod
// must hand them to the host stack untouched instead of dropping them.
func TestFromPodPodEncapsulatedGoesToHost(t *testing.T) {
	h := mustHostileVeth(t)
	overlayDst := net.IPv4(192, 168, 99, 2)
	err := h.netns.Do(func(ns.NetNS) error {
		if err := mustPodTunnel(h, overlayDst); err != nil {
			return err
		}
		conn, err := net.Dial("udp", net.JoinHostPort(overlayDst.String(), "9"))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write([]byte("a pod's own tunnel"))
		return err
	})
	if err != nil {
		t.Fatalf("send through the pod's vxlan device: %v", err)
	}

	got := h.waitCounter("to_host_encapsulated", 1)
	if got["to_host_encapsulated"].Packets < 1 {
		t.Errorf("to_host_encapsulated: got %+v, want the pod's tunnelled datagram", got["to_host_encapsulated"])
	}
	if got["drop_encap_failed"].Packets != 0 {
		t.Errorf("drop_encap_failed: got %+v, want none", got["drop_encap_failed"])
	}
}

// mustPodTunnel gives dummy0p podA's address and a vxlan device on top of
// it whose remote is a pod on the peer node, so that what vx0 sends is
// encapsulated by the kernel and leaves dummy0p for dummy0. Neighbours are
// permanent so that no ARP crosses the veth.
func mustPodTunnel(h *hostileVeth, overlayDst net.IP) error {
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: podA.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if err := netlink.AddrAdd(h.pod, addr); err != nil {
		return err
	}
	gw := net.IP(gatewayIP.AsSlice())
	routes := []netlink.Route{
		{LinkIndex: h.pod.Attrs().Index, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK},
		{LinkIndex: h.pod.Attrs().Index, Dst: &net.IPNet{IP: peerPodIP.AsSlice(), Mask: net.CIDRMask(32, 32)}, Gw: gw},
	}
	for _, r := range routes {
		if err := netlink.RouteAdd(&r); err != nil {
			return err
		}
	}
	if err := netlink.NeighAdd(&netlink.Neigh{LinkIndex: h.pod.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: gw, HardwareAddr: h.host.Attrs().HardwareAddr}); err != nil {
		return err
	}
	vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vx0", MTU: 1400}, VxlanId: 42,
		VtepDevIndex: h.pod.Attrs().Index, SrcAddr: podA.IP.AsSlice(), Group: peerPodIP.AsSlice(), Port: 4789}
	if err := netlink.LinkAdd(vx); err != nil {
		return err
	}
	if err := netlink.AddrAdd(vx, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 168, 99, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(vx); err != nil {
		return err
	}
	return netlink.NeighAdd(&netlink.Neigh{LinkIndex: vx.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: overlayDst, HardwareAddr: peerVtepMAC})
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
