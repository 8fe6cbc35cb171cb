// Packets for BPF_PROG_RUN, built by hand as the datapath's own tests build
// them (pkg/datapath/packet_test.go), reduced to what the benchmark sends:
// Ethernet, IPv4, UDP, TCP and VXLAN with valid checksums.
package main

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/patchcord/patchcord/internal/checksum"
)

const (
	ethTypeIPv4 = 0x0800
	ipProtoICMP = 1
	ipProtoTCP  = 6
	ipProtoUDP  = 17
	ipDF        = 0x4000
	vxlanFlagI  = 0x08
)

func ethernet(dst, src net.HardwareAddr, payload []byte) []byte {
	b := make([]byte, 0, 14+len(payload))
	b = append(b, mac6(dst)...)
	b = append(b, mac6(src)...)
	b = binary.BigEndian.AppendUint16(b, ethTypeIPv4)
	return append(b, payload...)
}

func mac6(hw net.HardwareAddr) []byte {
	if hw == nil {
		return make([]byte, 6)
	}
	return hw
}

// ipv4 wraps an L4 segment in a 20-byte IPv4 header and fills in the
// segment's checksum if withL4Sum (the outer UDP header of VXLAN keeps 0).
func ipv4(src, dst netip.Addr, proto, ttl uint8, fragOff uint16, seg []byte, withL4Sum bool) []byte {
	seg = append([]byte(nil), seg...)
	if withL4Sum {
		at := 6 // UDP
		if proto == ipProtoTCP {
			at = 16
		}
		sum := checksum.L4(src, dst, proto, seg)
		if sum == 0 && proto == ipProtoUDP {
			sum = 0xffff
		}
		binary.BigEndian.PutUint16(seg[at:], sum)
	}
	h := make([]byte, 20, 20+len(seg))
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(seg)))
	binary.BigEndian.PutUint16(h[4:], 0x1c46)
	binary.BigEndian.PutUint16(h[6:], fragOff)
	h[8], h[9] = ttl, proto
	s, d := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	binary.BigEndian.PutUint16(h[10:], ^checksum.OnesSum(h, 0))
	return append(h, seg...)
}

func udp(sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(8+len(payload)))
	return append(b, payload...)
}

// tcpACK is an option-less TCP segment with ACK and PSH set.
func tcpACK(sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint32(b[4:], 1000)
	binary.BigEndian.PutUint32(b[8:], 2000)
	b[12] = 5 << 4
	b[13] = 0x18
	binary.BigEndian.PutUint16(b[14:], 502)
	return append(b, payload...)
}

// icmpEcho is an ICMP echo request with its checksum.
func icmpEcho(payload []byte) []byte {
	b := make([]byte, 8, 8+len(payload))
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], 0x7063)
	binary.BigEndian.PutUint16(b[6:], 1)
	b = append(b, payload...)
	binary.BigEndian.PutUint16(b[2:], ^checksum.OnesSum(b, 0))
	return b
}

func vxlan(vni uint32, inner []byte) []byte {
	b := make([]byte, 8, 8+len(inner))
	b[0] = vxlanFlagI
	binary.BigEndian.PutUint32(b[4:], vni<<8)
	return append(b, inner...)
}

// payload64 is the 64-byte UDP payload of the small-packet figures.
var payload64 = make([]byte, 64)

func mustMAC(s string) net.HardwareAddr {
	hw, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return hw
}
