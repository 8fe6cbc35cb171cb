// This file tests from_uplink's native path through BPF_PROG_RUN: a routed
// packet from a native node's pod to a local pod is redirected past the
// stack; what only the fabric could have forged is dropped; everything else
// is the node's own traffic and passes.
package datapath_test

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// BPF_PROG_RUN's eth_type_trans compares the destination with lo's address,
// all zeros: a frame for it is PACKET_HOST, as a routed frame addressed to
// the uplink is on a real node.
var loMAC = mustMAC("00:00:00:00:00:00")

func nativeConfig() bpfmaps.Config {
	c := defaultConfig()
	c.Native = true
	return c
}

func routed(p packet, dst net.HardwareAddr) []byte {
	return ethernet{Dst: dst, Src: peerMAC, Type: ethTypeIPv4}.marshal(p.marshal())
}

func TestFromUplinkNative(t *testing.T) {
	for _, p := range []packet{toDstPod(tcpPacket(peerPodIP, dstPod.IP)), toDstPod(udpPacket(peerPodIP, dstPod.IP))} {
		n := newPeerNode(t, ptr(nativeConfig()), true, dstPod)
		in := routed(p, loMAC)
		wantForwarded(t, n, datapath.FromUplink, in, dstPod, p, "native_in", len(in))
	}
}

// A pod's address is only ever this node's to send from: on the wire it is
// forged, whatever node it claims to come through.
func TestFromUplinkNativeSpoofed(t *testing.T) {
	n := newPeerNode(t, ptr(nativeConfig()), true, dstPod)
	in := routed(toDstPod(tcpPacket(dstPod.IP, dstPod.IP)), loMAC)
	ret, _ := mustRun(t, n.prog(datapath.FromUplink), in)
	wantVerdict(t, ret, tcActShot)
	n.wantCounters(map[string]bpfmaps.Counter{"drop_wire_spoofed": counted(len(in))})
	n.wantDropEvent(datapath.FromUplink, "drop_wire_spoofed", len(in))
}

// The native path redirects only what a native node's pod sent to this
// node's pod; the rest is left to the stack, unchanged and uncounted.
func TestFromUplinkNativePassThrough(t *testing.T) {
	fromPeerPod := toDstPod(tcpPacket(peerPodIP, dstPod.IP))
	native := ptr(nativeConfig())
	runPassCases(t, datapath.FromUplink, []passCase{
		{name: "native off", config: ptr(defaultConfig()), peerNative: true, in: routed(fromPeerPod, loMAC)},
		{name: "tunnel peer", config: native, in: routed(fromPeerPod, loMAC)},
		{name: "unknown source", config: native, peerNative: true,
			in: routed(toDstPod(tcpPacket(outsideIP, dstPod.IP)), loMAC)},
		{name: "not a pod", config: native, peerNative: true,
			in: routed(toDstPod(tcpPacket(peerPodIP, netip.MustParseAddr("10.244.1.99"))), loMAC)},
		// Not addressed to this node: the stack drops or bridges it.
		{name: "other host", config: native, peerNative: true, in: routed(fromPeerPod, uplinkMAC)},
		{name: "ip options", config: native, peerNative: true, in: func() []byte {
			p := fromPeerPod
			p.ip.VersionIHL = 0x4f
			return routed(p, loMAC)
		}()},
	}, dstPod)
}

// fabric is a namespace where the node's FIB lives: an uplink holding
// nodeIP, forwarding on (bpf_fib_lookup asks the input device), and what a
// test adds to reach peerCIDR.
type fabric struct {
	netns  ns.NetNS
	uplink netlink.Link
	other  netlink.Link
}

func newFabric(t *testing.T) *fabric {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	f := &fabric{netns: netns}
	err = netns.Do(func(ns.NetNS) error {
		for _, name := range []string{"uplink", "other"} {
			// A veth, since the dummy driver may be a module
			// this kernel lacks; its peer only keeps it up.
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: 1500}, PeerName: name + "-peer"}); err != nil {
				return err
			}
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			for _, dev := range []string{name, name + "-peer"} {
				d, err := netlink.LinkByName(dev)
				if err != nil {
					return err
				}
				if err := netlink.LinkSetUp(d); err != nil {
					return err
				}
			}
			if name == "uplink" {
				f.uplink = l
			} else {
				f.other = l
			}
		}
		if err := netlink.AddrAdd(f.uplink, &netlink.Addr{IPNet: &net.IPNet{IP: nodeIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.AddrAdd(f.other, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(203, 0, 113, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		return os.WriteFile("/proc/sys/net/ipv4/conf/all/forwarding", []byte("1"), 0o644)
	})
	if err != nil {
		t.Fatalf("fabric namespace: %v", err)
	}
	return f
}

func (f *fabric) do(t *testing.T, fn func() error) {
	t.Helper()
	if err := f.netns.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatal(err)
	}
}

func (f *fabric) route(t *testing.T, via netip.Addr, dev netlink.Link) {
	t.Helper()
	f.do(t, func() error {
		return netlink.RouteAdd(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: prefixNet(peerCIDR), Gw: via.AsSlice()})
	})
}

func (f *fabric) neighbour(t *testing.T, ip netip.Addr, mac net.HardwareAddr) {
	t.Helper()
	f.do(t, func() error {
		return netlink.NeighAdd(&netlink.Neigh{LinkIndex: f.uplink.Attrs().Index, Family: netlink.FAMILY_V4,
			State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: mac})
	})
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// newNativePodNode is a node whose uplink is the fabric's and whose peer is
// native.
func newNativePodNode(t *testing.T, f *fabric) *testNode {
	t.Helper()
	c := nativeConfig()
	c.UplinkIfindex = f.uplink.Attrs().Index
	return newPeerNode(t, &c, true, podA)
}

// A pod's packet for a native node leaves by the FIB's route, one hop
// forwarded: readdressed to the next hop when its neighbour is known, left
// to bpf_redirect_neigh when not.
func TestFromPodNative(t *testing.T) {
	t.Run("neighbour known", func(t *testing.T) {
		f := newFabric(t)
		f.route(t, peerIP, f.uplink)
		f.neighbour(t, peerIP, peerMAC)
		n := newNativePodNode(t, f)
		p := tcpPacket(podA.IP, peerPodIP)
		in := fromPod(p)
		ret, out := runIn(t, f.netns, n, datapath.FromPod, in)
		wantVerdict(t, ret, tcActRedirect)
		wantFrame(t, out, ethernet{Dst: peerMAC, Src: f.uplink.Attrs().HardwareAddr, Type: ethTypeIPv4}.marshal(p.withTTL(p.ip.TTL-1).marshal()))
		wantIPv4ChecksumValid(t, out, ethHdrLen, "forwarded packet")
		n.wantCounters(map[string]bpfmaps.Counter{"native_out": counted(len(in))})
	})
	t.Run("neighbour unknown", func(t *testing.T) {
		f := newFabric(t)
		f.route(t, peerIP, f.uplink)
		n := newNativePodNode(t, f)
		p := udpPacket(podA.IP, peerPodIP)
		in := fromPod(p)
		ret, out := runIn(t, f.netns, n, datapath.FromPod, in)
		wantVerdict(t, ret, tcActRedirect)
		wantFrame(t, out, fromPod(p.withTTL(p.ip.TTL-1)))
		n.wantCounters(map[string]bpfmaps.Counter{"native_out": counted(len(in))})
	})
	// Whatever the FIB cannot send out of the uplink as it is, the host
	// stack handles: its ICMP for a small route MTU, its unreachable, its
	// other devices.
	for _, tt := range []struct {
		name    string
		setup   func(*testing.T, *fabric)
		packet  packet
		counter string
	}{
		// The uplink's MTU, as the kernel's forwarding sees it (an
		// unlocked route MTU binds only the host's own packets).
		{name: "uplink mtu", setup: func(t *testing.T, f *fabric) {
			f.do(t, func() error { return netlink.LinkSetMTU(f.uplink, 1000) })
			f.route(t, peerIP, f.uplink)
			f.neighbour(t, peerIP, peerMAC)
		}, packet: udpPacketOfLen(podA.IP, peerPodIP, 1400, true), counter: "to_host_too_big"},
		{name: "no route", setup: func(*testing.T, *fabric) {}, packet: tcpPacket(podA.IP, peerPodIP), counter: "to_host"},
		{name: "route by another device", setup: func(t *testing.T, f *fabric) {
			f.route(t, netip.MustParseAddr("203.0.113.2"), f.other)
		}, packet: tcpPacket(podA.IP, peerPodIP), counter: "to_host"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFabric(t)
			tt.setup(t, f)
			n := newNativePodNode(t, f)
			in := fromPod(tt.packet)
			ret, out := runIn(t, f.netns, n, datapath.FromPod, in)
			n.wantToStack(ret, out, in, tt.counter)
		})
	}
}

// The stack's own packets for a native node's pods leave by its route as
// they are: to_uplink wraps nothing and counts nothing.
func TestToUplinkNativePassesThrough(t *testing.T) {
	runPassCases(t, datapath.ToUplink, []passCase{
		{name: "to native pod", config: ptr(nativeConfig()), peerNative: true, in: fromHost(tcpPacket(nodeIP, peerPodIP))},
	}, dstPod)
}
