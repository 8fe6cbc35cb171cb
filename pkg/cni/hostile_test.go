// A pod that already runs when its ADD comes (a runtime may add a network to
// a running container) and sends forged frames the moment its end of the
// veth appears, raising it itself: nothing of it reaches the node's stack,
// before, during or after ADD.
package cni_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/packet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The node's own address the forged frames are sent to, and their source:
// no pod's.
var (
	nodeLocal  = netip.MustParseAddr("192.0.2.1")
	forgedFrom = netip.MustParseAddr("203.0.113.7")
)

const forgedPort = 9999

// forgedFrame is an Ethernet broadcast carrying a UDP datagram from
// forgedFrom to nodeLocal: the host stack takes it for local delivery.
func forgedFrame(src net.HardwareAddr) []byte {
	broadcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	return packet.UDP(broadcast, src, forgedFrom, nodeLocal, 4000, forgedPort, []byte("pc!!"))
}

// sendForged sends one forged frame out of link.
func sendForged(fd int, link netlink.Link) error {
	return unix.Sendto(fd, forgedFrame(link.Attrs().HardwareAddr), 0, &unix.SockaddrLinklayer{Ifindex: link.Attrs().Index, Protocol: htons(unix.ETH_P_IP)})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func packetSocket(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	return fd
}

// listenNode gives the node nodeLocal and a UDP socket on it.
func (n *node) listenNode(t *testing.T) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := n.hostNS.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(nodeLocal, 32))}); err != nil {
			return err
		}
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: nodeLocal.AsSlice(), Port: forgedPort})
		return err
	})
	if err != nil {
		t.Fatalf("listen on the node: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// received counts the datagrams c holds.
func received(c *net.UDPConn) int {
	buf := make([]byte, 64)
	got := 0
	for {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(buf); err != nil {
			return got
		}
		got++
	}
}

func TestAddPassesNothingBeforeFromPod(t *testing.T) {
	for _, mode := range []string{"tcx", "tc"} {
		t.Run(mode, func(t *testing.T) { addPassesNothingBeforeFromPod(t, mode) })
	}
}

func addPassesNothingBeforeFromPod(t *testing.T, mode string) {
	n := newNode(t)
	c := n.listenNode(t)

	// Control: the same frames through a bare veth pair reach the
	// node's stack, so that none arriving below means they were stopped.
	err := n.hostNS.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ctlhost"}, PeerName: "ctlpod"}); err != nil {
			return err
		}
		var sender netlink.Link
		for _, name := range []string{"ctlhost", "ctlpod"} {
			l, err := netlink.LinkByName(name)
			if err == nil {
				err = netlink.LinkSetUp(l)
			}
			if err != nil {
				return err
			}
			sender = l
		}
		fd := packetSocket(t)
		defer unix.Close(fd)
		for range 3 {
			if err := sendForged(fd, sender); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("control veth: %v", err)
	}
	if got := received(c); got != 3 {
		t.Fatalf("control: the node's stack got %d of 3 forged datagrams through a bare veth; the test cannot tell stopped from lost", got)
	}

	// The pod: from the moment eth0 exists it is raised and floods.
	p := newPod(t)
	var sent atomic.Int64
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- p.ns.Do(func(ns.NetNS) error {
			fd := packetSocket(t)
			defer unix.Close(fd)
			for {
				select {
				case <-stop:
					return nil
				default:
				}
				l, err := netlink.LinkByName(podIfname)
				if err != nil {
					continue
				}
				if l.Attrs().Flags&net.FlagUp == 0 {
					netlink.LinkSetUp(l)
				}
				err = sendForged(fd, l)
				switch {
				case err == nil:
					sent.Add(1)
				case errors.Is(err, unix.ENETDOWN), errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV):
				default:
					return os.NewSyscallError("sendto", err)
				}
			}
		})
	}()
	n.mustAdd(t, p.args(n.conf(t, "1.1.0", with("attachMode", mode))))
	sentDuringAdd := sent.Load()
	time.Sleep(20 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if sentDuringAdd == 0 {
		t.Fatal("the pod sent nothing while ADD ran: the test proves nothing")
	}
	if got := received(c); got != 0 {
		t.Fatalf("the node's stack got %d forged datagrams of the pod's %d (%d during ADD)", got, sent.Load(), sentDuringAdd)
	}
	t.Logf("pod sent %d forged frames, %d during ADD; none reached the node", sent.Load(), sentDuringAdd)
}
