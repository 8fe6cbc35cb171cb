// Package checksum holds the packet arithmetic that tests and benchmarks share
// when they build frames by hand: the Internet checksum (RFC 1071).
package checksum

import (
	"encoding/binary"
	"net/netip"
)

// OnesSum is the 16-bit ones'-complement sum of b added to sum, folded but
// not inverted, so that sums over several pieces chain.
func OnesSum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// L4 is the TCP or UDP checksum of seg (whose checksum field must
// be zero) between IPv4 addresses src and dst.
func L4(src, dst netip.Addr, proto uint8, seg []byte) uint16 {
	s, d := src.As4(), dst.As4()
	pseudo := append(append(s[:], d[:]...), 0, proto)
	pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(seg)))
	return ^OnesSum(seg, uint32(OnesSum(pseudo, 0)))
}
