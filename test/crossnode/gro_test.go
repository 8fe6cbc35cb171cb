// GRO on NIC-like links: with segmentation off on the uplinks and GRO on, the
// wire carries MTU-sized VXLAN frames; the uplink merges them only while the
// agent's idle vxlan device (agent.GRODevice) holds the port, and from_uplink
// must decapsulate the merged packets intact. The device itself must forward
// nothing.
package crossnode

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/agent"
)

// linkStats are an interface's packet counters from `ip -j -s link`.
type linkStats struct {
	RxPackets, TxPackets, RxDropped uint64
}

func readLinkStats(t *testing.T, ctx context.Context, e e2e.Execer, dev string) linkStats {
	t.Helper()
	var links []struct {
		Stats64 struct {
			Rx struct {
				Packets uint64 `json:"packets"`
				Dropped uint64 `json:"dropped"`
			} `json:"rx"`
			Tx struct {
				Packets uint64 `json:"packets"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	out := e2e.IPJSON(t, ctx, e, &links, "-s", "link", "show", "dev", dev)
	if len(links) != 1 {
		t.Fatalf("ip -j -s link show %s: want one link\n%s", dev, out)
	}
	s := links[0].Stats64
	return linkStats{RxPackets: s.Rx.Packets, TxPackets: s.Tx.Packets, RxDropped: s.Rx.Dropped}
}

// shape puts a tbf qdisc on the host veth toward pod IP podIP on n and
// returns the veth's name.
func shape(t *testing.T, ctx context.Context, n *lab.Node, podIP string) string {
	t.Helper()
	var routes []struct {
		Dev string `json:"dev"`
	}
	out := e2e.IPJSON(t, ctx, n, &routes, "route", "get", podIP)
	if len(routes) != 1 || routes[0].Dev == "" {
		t.Fatalf("ip -j route get %s: want one route\n%s", podIP, out)
	}
	if out, err := n.Exec(ctx, "tc", "qdisc", "add", "dev", routes[0].Dev, "root", "tbf", "rate", "8gbit", "burst", "16kb", "latency", "50ms"); err != nil {
		t.Fatalf("shape %s: %v\n%s", routes[0].Dev, err, out)
	}
	return routes[0].Dev
}

// qdiscPackets is what the root qdisc of dev has sent.
func qdiscPackets(t *testing.T, ctx context.Context, n *lab.Node, dev string) uint64 {
	t.Helper()
	out, err := n.Exec(ctx, "tc", "-j", "-s", "qdisc", "show", "dev", dev, "root")
	if err != nil {
		t.Fatal(err)
	}
	var qs []struct {
		Packets uint64 `json:"packets"`
	}
	if err := json.Unmarshal(out, &qs); err != nil || len(qs) != 1 {
		t.Fatalf("tc -j -s qdisc show dev %s root: %v\n%s", dev, err, out)
	}
	return qs[0].Packets
}

// TestGRO: bulk TCP pod to pod between NIC-like nodes. With the GRO device,
// from_uplink decapsulates packets larger than the MTU (merged), every byte
// arrives, and the device sends and receives nothing; node to pod, merged
// packets cross the stack and a segmenting qdisc intact; with --vxlan-gro=false
// no packet is larger than a frame, so the first case is the device's doing.
func TestGRO(t *testing.T) {
	// Bytes sent (-n, so that no speed is asserted), and the least the
	// receiver must count: iperf3 stops its count before the last bytes land.
	const size, least = 64 << 20, 32 << 20
	for _, tc := range []struct {
		name   string
		args   []string
		merged bool
	}{
		{"device", nil, true},
		{"no device", []string{"--vxlan-gro=false"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e2e.NewMesh(t, 1, 2)
			ctx := e2e.Ctx(t)
			c.StartAgents(t, ctx, nil, tc.args...)
			c.AddPods(t, ctx, 1)
			n2, from, to := c.Nodes[1], c.Pod(1, 0), c.Pod(2, 0)
			for _, n := range c.Nodes {
				if err := n.SetLinks(ctx, lab.LinksNIC); err != nil {
					t.Fatal(err)
				}
			}
			_, err := n2.Exec(ctx, "ip", "link", "show", "dev", agent.GRODevice)
			if has := err == nil; has != tc.merged {
				t.Fatalf("%s: %s present %v, want %v", n2.NetNS, agent.GRODevice, has, tc.merged)
			}
			var dev0 linkStats
			if tc.merged {
				dev0 = readLinkStats(t, ctx, n2, agent.GRODevice)
			}
			e2e.IperfServer(t, ctx, to, 5201)
			before := e2e.Stats(t, ctx, n2)
			r := e2e.IperfRun(t, ctx, from, to.IP.String(), 5201, "-n", strconv.Itoa(size))
			dec := e2e.Delta(before, e2e.Stats(t, ctx, n2), "decap")
			got := r.End.SumReceived.Bytes
			avg := uint64(0)
			if dec.Packets > 0 {
				avg = dec.Bytes / dec.Packets
			}
			t.Logf("%s: %d bytes received (%.2f Gbit/s, not asserted); decap %d packets, %d bytes, %d bytes each on average",
				tc.name, got, r.Gbps(), dec.Packets, dec.Bytes, avg)
			if got < least {
				t.Errorf("%d bytes received, want >= %d", got, least)
			}
			if dec.Bytes < got {
				t.Errorf("decap %d bytes, want >= %d received", dec.Bytes, got)
			}
			// A frame decapsulated is at most 1450 + 14 bytes; merged packets are
			// many frames.
			if merged := avg > 1500; merged != tc.merged {
				t.Errorf("decap averaged %d bytes a packet: merged %v, want %v", avg, merged, tc.merged)
			}
			// From node 1 itself: from_uplink decapsulates and hands the packets to
			// n2's stack (to_host), which routes them, merged, to the pod's veth.
			// A tbf qdisc there, with a burst smaller than a merged packet,
			// segments them again (tbf_segment): the tunnel GSO type the decap
			// left on them must not get in its way.
			veth := shape(t, ctx, n2, to.IP.String())
			q0 := qdiscPackets(t, ctx, n2, veth)
			before = e2e.Stats(t, ctx, n2)
			r = e2e.IperfRun(t, ctx, c.Nodes[0], to.IP.String(), 5201, "-n", strconv.Itoa(size))
			host := e2e.Delta(before, e2e.Stats(t, ctx, n2), "to_host")
			t.Logf("%s: node to pod %d bytes received (%.2f Gbit/s); to_host %d packets, %d bytes",
				tc.name, r.End.SumReceived.Bytes, r.Gbps(), host.Packets, host.Bytes)
			if got := r.End.SumReceived.Bytes; got < least {
				t.Errorf("node to pod: %d bytes received, want >= %d", got, least)
			}
			if merged := host.Packets > 0 && host.Bytes/host.Packets > 1500; merged != tc.merged {
				t.Errorf("to_host %d packets, %d bytes: merged %v, want %v", host.Packets, host.Bytes, merged, tc.merged)
			}
			// tbf sees only what goes toward the pod: it sent more packets than
			// to_host handed over only if it segmented merged ones.
			if q := qdiscPackets(t, ctx, n2, veth) - q0; tc.merged && q <= host.Packets {
				t.Errorf("tbf on %s sent %d packets for %d merged: it segmented none", veth, q, host.Packets)
			}
			if tc.merged {
				dev := readLinkStats(t, ctx, n2, agent.GRODevice)
				if dev.RxPackets != dev0.RxPackets || dev.TxPackets != dev0.TxPackets {
					t.Errorf("%s: rx %d, tx %d packets during the run, want none", agent.GRODevice, dev.RxPackets-dev0.RxPackets, dev.TxPackets-dev0.TxPackets)
				}
			}
		})
	}
}

// strayVXLAN is a python3 script that sends count VXLAN packets (VNI 1) to
// argv dst:4789 whose outer IPv4 header carries options, which from_uplink
// leaves to the stack, so that they reach the vxlan device's socket. Inside:
// an ICMP echo request from src to inner_dst, to the inner MAC dmac.
const strayVXLAN = `
import socket, struct, sys
dst, src, inner_dst, dmac, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x5043, 1) + b"stray" * 8
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(inner_dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex("0e0000000001") + b"\x08\x00" + ip + icmp
vx = struct.pack("!II", 0x08000000, 1 << 8) + frame
udp = struct.pack("!HHHH", 40000, 4789, 8 + len(vx), 0) + vx
# ihl 6: four bytes of options (NOP NOP NOP EOL); the kernel fills length and checksum.
outer = struct.pack("!BBHHHBBH4s4s", 0x46, 0, 0, 0, 0, 64, 17, 0, b"\0\0\0\0", socket.inet_aton(dst)) + b"\x01\x01\x01\x00" + udp
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(count):
    s.sendto(outer, (dst, 0))
`

// TestGRODeviceForwardsNothing: VXLAN that from_uplink passes to the stack
// (here: with IP options) reaches the GRO device's socket. The device must
// never forward or deliver it itself: from_tunnel judges it by decap's
// rules, so a packet from a pod of the sending node reaches its pod, and a
// forged inner source or a packet for the node itself is dropped.
func TestGRODeviceForwardsNothing(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 (to send VXLAN with IP options) not found")
	}
	c, ctx := e2e.NewPair(t)
	n1, n2, from, to := c.Nodes[0], c.Nodes[1], c.Pod(1, 0), c.Pod(2, 0)
	mac, err := n2.LinkMAC(agent.GRODevice)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name, src, dst string
		drop           string // "": delivered to the pod
	}{
		{"from a pod of the sender to a pod", from.IP.String(), to.IP.String(), ""},
		{"forged inner source", to.IP.String(), to.IP.String(), "drop_inner_spoofed"},
		{"to the node", from.IP.String(), n2.IP.String(), "drop_no_endpoint"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const count = 5
			dev0, stats0 := readLinkStats(t, ctx, n2, agent.GRODevice), e2e.Stats(t, ctx, n2)
			fwd0, echo0 := snmpCounter(t, ctx, n2, "Ip", "ForwDatagrams"), snmpCounter(t, ctx, n2, "Icmp", "InEchos")
			podRx0 := snmpCounter(t, ctx, to, "Ip", "InReceives")
			if out, err := n1.Exec(ctx, "python3", "-c", strayVXLAN, n2.IP.String(), tt.src, tt.dst, mac.String(), strconv.Itoa(count)); err != nil {
				t.Fatalf("send stray VXLAN: %v\n%s", err, out)
			}
			// The device counts what its socket decapsulated; from_tunnel
			// runs on each before the count is read.
			err := e2e.Poll(ctx, agent.GRODevice+" rx", func() error {
				if got := readLinkStats(t, ctx, n2, agent.GRODevice).RxPackets - dev0.RxPackets; got < count {
					return fmt.Errorf("rx %d of %d", got, count)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			wantPod, wantDecap := uint64(0), uint64(0)
			if tt.drop == "" {
				wantPod, wantDecap = count, count
			}
			err = e2e.Poll(ctx, "pod rx", func() error {
				if got := snmpCounter(t, ctx, to, "Ip", "InReceives") - podRx0; got != wantPod {
					return fmt.Errorf("the pod received %d packets, want %d", got, wantPod)
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			}
			stats := e2e.Stats(t, ctx, n2)
			if tt.drop != "" {
				if d := e2e.Delta(stats0, stats, tt.drop); d.Packets != count {
					t.Errorf("%s grew by %d, want %d", tt.drop, d.Packets, count)
				}
			}
			if d := e2e.Delta(stats0, stats, "decap"); d.Packets != wantDecap {
				t.Errorf("decap grew by %d, want %d", d.Packets, wantDecap)
			}
			if dev := readLinkStats(t, ctx, n2, agent.GRODevice); dev.TxPackets != dev0.TxPackets {
				t.Errorf("%s sent %d packets", agent.GRODevice, dev.TxPackets-dev0.TxPackets)
			}
			if got := snmpCounter(t, ctx, n2, "Ip", "ForwDatagrams") - fwd0; got != 0 {
				t.Errorf("%s forwarded %d packets", n2.NetNS, got)
			}
			if got := snmpCounter(t, ctx, n2, "Icmp", "InEchos") - echo0; got != 0 {
				t.Errorf("%s received %d echo requests", n2.NetNS, got)
			}
		})
	}
}
