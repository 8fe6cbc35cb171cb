// This file tests what BPF_PROG_RUN cannot build: a frame whose 802.1Q tag
// the kernel has already moved into skb->vlan_tci, and an skb the pod
// encapsulated itself (skb->encapsulation set by a vxlan device). Each case
// runs from_pod on a real veth ("dummy0") in a namespace of its own; the
// pod's side is the veth's peer ("dummy0p") in the same namespace.
package datapath_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
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
	h.n.put(bpfmaps.EndpointInfo{IP: podA.IP, Ifindex: h.host.Attrs().Index,
		MAC: h.pod.Attrs().HardwareAddr, HostMAC: h.host.Attrs().HardwareAddr})
	h.n.addNode(peerNode())
	h.n.configure(defaultConfig())
	return h
}

// waitCounter polls until counter name has reached at least want packets.
func (h *hostileVeth) waitCounter(name string, want uint64) map[string]bpfmaps.Counter {
	h.n.tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := bpfmaps.NewStats(&h.n.d.Maps).Read()
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
	err := h.netns.Do(func(ns.NetNS) error { return sendThroughPodTunnel(h, overlayDst) })
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

// sendThroughPodTunnel sets up the pod's tunnel (mustPodTunnel) in the
// current namespace and sends one UDP datagram through it.
func sendThroughPodTunnel(h *hostileVeth, overlayDst net.IP) error {
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
	// Else IPv6 DAD on vx0 may put a neighbour solicitation through the
	// tunnel before the test's datagram, and that frame is captured first.
	if err := ipv6off.Disable("vx0"); err != nil {
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

// The whole host path of a pod's own tunnel: from_pod leaves it to the
// stack, the stack routes it to the uplink, and to_uplink wraps it without
// the ENCAP flags. With transmit checksumming off on the uplink the kernel
// completes the pod's pending inner UDP checksum from csum_start: valid on
// the wire only if wrapping kept csum_start on the pod's inner header.
func TestToUplinkWrapsPodEncapsulated(t *testing.T) {
	h := mustHostileVeth(t)
	podNS := mustConntrackNS(t) // an empty namespace: the pod
	overlayDst := net.IPv4(192, 168, 99, 2)
	var up, wire netlink.Link
	err := h.netns.Do(func(ns.NetNS) error {
		if err := netlink.LinkSetNsFd(h.pod, int(podNS.Fd())); err != nil {
			return err
		}
		var err error
		if up, wire, err = mustUplink(h); err != nil {
			return err
		}
		return h.n.d.Attach(datapath.ToUplink, "up0", datapathtest.Logger(t))
	})
	if err != nil {
		t.Fatalf("set up node: %v", err)
	}
	cfg := defaultConfig()
	cfg.UplinkIfindex = up.Attrs().Index
	cfg.UplinkMAC = up.Attrs().HardwareAddr
	h.n.configure(cfg)

	var frame []byte
	err = h.netns.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: wire.Attrs().Index}); err != nil {
			return err
		}
		tv := unix.Timeval{Sec: 5}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		err = podNS.Do(func(ns.NetNS) error {
			h.pod, _ = netlink.LinkByName("dummy0p")
			if err := netlink.LinkSetUp(h.pod); err != nil {
				return err
			}
			return sendThroughPodTunnel(h, overlayDst)
		})
		if err != nil {
			return err
		}
		buf := make([]byte, 4096)
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return err
			}
			if f := buf[:n]; len(f) > 2*vxlanOverhead+ethHdrLen && f[ethHdrLen+9] == ipProtoUDP {
				frame = append([]byte(nil), f...)
				return nil
			}
		}
	})
	if err != nil {
		t.Fatalf("send through the pod's tunnel and capture on the wire: %v", err)
	}
	got := h.waitCounter("encap", 1)
	if got["to_host_encapsulated"].Packets < 1 || got["encap"].Packets < 1 || got["drop_encap_failed"].Packets != 0 {
		t.Errorf("counters: to_host_encapsulated %+v, encap %+v, drop_encap_failed %+v; want from_pod to leave it to the host and to_uplink to wrap it",
			got["to_host_encapsulated"], got["encap"], got["drop_encap_failed"])
	}
	wantNestedUDP(t, frame)
}

// wantNestedUDP checks a frame on the wire: our VXLAN from node 1 to node 2
// around the pod's VXLAN around its datagram, whose UDP checksum is valid.
func wantNestedUDP(t *testing.T, f []byte) {
	t.Helper()
	if len(f) < ethHdrLen+2*vxlanOverhead+ipv4HdrLen+udpHdrLen {
		t.Fatalf("frame of %d bytes cannot hold two VXLAN headers and a datagram:\n%s", len(f), describe(f))
	}
	ip := ethHdrLen
	if !bytes.Equal(f[ip+12:ip+16], nodeIP.AsSlice()) || !bytes.Equal(f[ip+16:ip+20], peerIP.AsSlice()) ||
		binary.BigEndian.Uint16(f[ip+ipv4HdrLen+2:]) != 4789 {
		t.Fatalf("outer header is not node 1 -> node 2 VXLAN:\n%s", describe(f))
	}
	pod := ethHdrLen + vxlanOverhead // the pod's own outer IPv4
	if !bytes.Equal(f[pod+12:pod+16], podA.IP.AsSlice()) || !bytes.Equal(f[pod+16:pod+20], peerPodIP.AsSlice()) {
		t.Fatalf("wrapped packet is not the pod's tunnel:\n%s", describe(f))
	}
	in := pod + vxlanOverhead // the datagram inside the pod's tunnel
	hlen, tot := int(f[in]&0x0f)*4, int(binary.BigEndian.Uint16(f[in+2:]))
	if hlen < ipv4HdrLen || tot < hlen+udpHdrLen || in+tot > len(f) {
		t.Fatalf("innermost IPv4 header is not sound:\n%s", describe(f))
	}
	seg := f[in+hlen : in+tot]
	var src, dst [4]byte
	copy(src[:], f[in+12:in+16])
	copy(dst[:], f[in+16:in+20])
	if c := l4Checksum(netip.AddrFrom4(src), netip.AddrFrom4(dst), ipProtoUDP, seg, 6); c != binary.BigEndian.Uint16(seg[6:]) {
		t.Errorf("innermost UDP checksum %#04x, want %#04x: the pod's pending checksum was completed in the wrong place",
			binary.BigEndian.Uint16(seg[6:]), c)
	}
}

// mustUplink gives the node namespace node 1's uplink "up0", its far end
// "wire0" left for capturing, a route to the peer's pod CIDR through it as
// the agent installs one, and forwarding. Transmit checksumming is off on
// up0, so the kernel completes pending checksums itself before the wire.
func mustUplink(h *hostileVeth) (up, wire netlink.Link, err error) {
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "wire0"}); err != nil {
		return nil, nil, err
	}
	if up, err = netlink.LinkByName("up0"); err != nil {
		return nil, nil, err
	}
	if wire, err = netlink.LinkByName("wire0"); err != nil {
		return nil, nil, err
	}
	for _, l := range []netlink.Link{up, wire} {
		if err := netlink.LinkSetUp(l); err != nil {
			return nil, nil, err
		}
	}
	if err := netlink.AddrAdd(up, &netlink.Addr{IPNet: &net.IPNet{IP: nodeIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		return nil, nil, err
	}
	if err := netlink.NeighAdd(&netlink.Neigh{LinkIndex: up.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: peerIP.AsSlice(), HardwareAddr: peerMAC}); err != nil {
		return nil, nil, err
	}
	routes := []netlink.Route{
		{LinkIndex: up.Attrs().Index, Dst: &net.IPNet{IP: peerCIDR.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}, Gw: peerIP.AsSlice()},
		{LinkIndex: h.host.Attrs().Index, Dst: &net.IPNet{IP: podA.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK},
	}
	for _, r := range routes {
		if err := netlink.RouteAdd(&r); err != nil {
			return nil, nil, err
		}
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return nil, nil, err
	}
	if out, err := exec.Command("nsenter", "--net="+h.netns.Path(), "ethtool", "-K", "up0", "tx", "off").CombinedOutput(); err != nil {
		return nil, nil, fmt.Errorf("ethtool -K up0 tx off: %w: %s", err, out)
	}
	return up, wire, nil
}
