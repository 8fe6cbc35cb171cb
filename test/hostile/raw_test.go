// This file lets hostile-input tests put arbitrary frames on a link: an
// AF_PACKET socket opened inside a pod's or node's namespace, the frames
// (Ethernet, 802.1Q/802.1ad tags, ARP, IPv4, IPv6, UDP, ICMPv6, VXLAN) built
// by hand so that they can be as wrong as an attacker makes them, and UDP
// listeners opened inside a namespace to see what gets through.
package hostile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/patchcord/patchcord/internal/checksum"
)

const (
	rawEthIPv4  = 0x0800
	rawEthARP   = 0x0806
	rawEth8021Q = 0x8100
	rawEthQinQ  = 0x88a8
	rawEthIPv6  = 0x86dd
)

// rawSend sends each frame repeat times out of dev in the namespace at
// nsPath and returns how many it sent; the socket is bound to no protocol,
// so it receives nothing.
func rawSend(nsPath, dev string, frames [][]byte, repeat int) (int, error) {
	sent := 0
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("find %s: %w", dev, err)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return fmt.Errorf("open AF_PACKET socket: %w", err)
		}
		defer unix.Close(fd)
		to := &unix.SockaddrLinklayer{Ifindex: link.Attrs().Index}
		for range repeat {
			for _, f := range frames {
				if err := unix.Sendto(fd, f, 0, to); err != nil {
					if errors.Is(err, unix.ENOBUFS) {
						continue // a full queue under a flood: that frame is lost
					}
					return fmt.Errorf("send %d-byte frame on %s: %w", len(f), dev, err)
				}
				sent++
			}
		}
		return nil
	})
	return sent, err
}

// mustRawSend is rawSend that fails the test.
func mustRawSend(t *testing.T, nsPath, dev string, repeat int, frames ...[]byte) {
	t.Helper()
	if _, err := rawSend(nsPath, dev, frames, repeat); err != nil {
		t.Fatal(err)
	}
}

// mustListenUDP opens a UDP socket in the namespace at nsPath (network
// "udp4" or "udp6", addr like ":9999"); it stays in that namespace.
func mustListenUDP(t *testing.T, nsPath, network, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) (err error) {
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, nsPath, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// datagram is one datagram a listener received.
type datagram struct {
	from    any
	payload string
}

// receiveUntil reads pc until a datagram with payload marker arrives (or
// the deadline passes) and returns everything received before it.
func receiveUntil(pc net.PacketConn, marker string, within time.Duration) ([]datagram, error) {
	deadline := time.Now().Add(within)
	var got []datagram
	buf := make([]byte, 65536)
	for {
		pc.SetReadDeadline(deadline)
		n, from, err := pc.ReadFrom(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return got, fmt.Errorf("marker %q not received within %s (got %d other datagrams)", marker, within, len(got))
		}
		if err != nil {
			return got, err
		}
		if string(buf[:n]) == marker {
			return got, nil
		}
		got = append(got, datagram{from, string(buf[:n])})
	}
}

// queued returns the datagrams waiting on pc, without waiting for more.
// A read deadline in the past would not do: Go then fails the read before
// looking at the socket.
func queued(pc net.PacketConn) ([]datagram, error) {
	sc, err := pc.(*net.UDPConn).SyscallConn()
	if err != nil {
		return nil, err
	}
	var got []datagram
	var rerr error
	buf := make([]byte, 65536)
	err = sc.Read(func(fd uintptr) bool {
		for {
			n, from, err := unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			if err != nil {
				if !errors.Is(err, unix.EAGAIN) {
					rerr = err
				}
				return true
			}
			got = append(got, datagram{sockaddrString(from), string(buf[:n])})
		}
	})
	return got, errors.Join(err, rerr)
}

func sockaddrString(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String()
	}
	return fmt.Sprint(sa)
}

// linkMAC reads the MAC of dev in the namespace at nsPath.
func linkMAC(t *testing.T, nsPath, dev string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(dev)
		if err == nil {
			mac = link.Attrs().HardwareAddr
		}
		return err
	})
	if err != nil {
		t.Fatalf("MAC of %s in %s: %v", dev, nsPath, err)
	}
	return mac
}

// linkLocal returns dev's IPv6 link-local address in the namespace at
// nsPath, or the zero Addr when dev has none (IPv6 disabled on it), and
// whether it is still tentative.
func linkLocal(t *testing.T, nsPath, dev string) (netip.Addr, bool) {
	t.Helper()
	var addr netip.Addr
	var tentative bool
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(link, netlink.FAMILY_V6)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
				addr, tentative = ip, a.Flags&unix.IFA_F_TENTATIVE != 0
			}
		}
		return err
	})
	if err != nil {
		t.Fatalf("addresses of %s in %s: %v", dev, nsPath, err)
	}
	return addr, tentative
}

// ---- frames --------------------------------------------------------------------------------

func rawEth(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	b := append(append(append([]byte{}, dst...), src...), byte(typ>>8), byte(typ))
	return append(b, payload...)
}

// rawTag is an 802.1Q or 802.1ad tag body: VID, then the inner ethertype.
func rawTag(vid, inner uint16, payload []byte) []byte {
	return append(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, vid), inner), payload...)
}

func rawARP(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	b := []byte{0, 1, 8, 0, 6, 4, 0, byte(op)}
	s, t := spa.As4(), tpa.As4()
	b = append(append(b, sha...), s[:]...)
	return append(append(b, tha...), t[:]...)
}

// rawUDP is a UDP header and payload; the checksum is filled in by the IP
// layer that carries it (zero, "none", for IPv4).
func rawUDP(sport, dport uint16, payload []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	b = binary.BigEndian.AppendUint16(b, uint16(8+len(payload)))
	return append(append(b, 0, 0), payload...)
}

// rawIPv4 is an IPv4 header (TTL 64, no options) in front of l4.
func rawIPv4(proto uint8, src, dst netip.Addr, l4 []byte) []byte {
	b := make([]byte, 20, 20+len(l4))
	b[0], b[8], b[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(l4)))
	s, d := src.As4(), dst.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[10:], ^checksum.OnesSum(b, 0))
	return append(b, l4...)
}

// rawIPv6 is an IPv6 header in front of l4, with l4's checksum (UDP or
// ICMPv6, at offset csum) computed over the pseudo-header.
func rawIPv6(next uint8, hops uint8, src, dst netip.Addr, l4 []byte, csum int) []byte {
	s, d := src.As16(), dst.As16()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, 0, byte(len(l4)>>8), byte(len(l4)), 0, 0, 0, next)
	var sum uint32
	for i := 0; i < len(pseudo); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(pseudo[i:]))
	}
	binary.BigEndian.PutUint16(l4[csum:], ^checksum.OnesSum(l4, sum))
	b := []byte{0x60, 0, 0, 0, byte(len(l4) >> 8), byte(len(l4)), next, hops}
	return append(append(append(b, s[:]...), d[:]...), l4...)
}

// rawRA is a router advertisement offering prefix/64 for autoconfiguration
// and a default route.
func rawRA(prefix netip.Prefix) []byte {
	ra := []byte{134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0}
	pi := []byte{3, 4, 64, 0xc0, 0, 0, 0x1c, 0x20, 0, 0, 0x0e, 0x10, 0, 0, 0, 0}
	p := prefix.Addr().As16()
	return append(append(ra, pi...), p[:]...)
}

// rawVXLAN is a VXLAN header with the I flag and vni in front of inner.
func rawVXLAN(vni uint32, inner []byte) []byte {
	b := []byte{0x08, 0, 0, 0}
	return append(binary.BigEndian.AppendUint32(b, vni<<8), inner...)
}
