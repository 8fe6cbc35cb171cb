// Package packet builds the frames that tests outside pkg/datapath send
// through the real programs: small, valid, and addressed as a pod would
// address them. pkg/datapath's own tests build every field by hand instead,
// to reach each branch.
package packet

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/patchcord/patchcord/internal/checksum"
)

// UDP is an Ethernet/IPv4/UDP frame from srcMAC to dstMAC carrying payload,
// with a valid IPv4 header checksum and no UDP checksum (0: none, as IPv4
// allows).
func UDP(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	const ethLen, ipLen, udpLen = 14, 20, 8
	f := make([]byte, ethLen+ipLen+udpLen+len(payload))
	copy(f[0:6], dstMAC)
	copy(f[6:12], srcMAC)
	binary.BigEndian.PutUint16(f[12:], 0x0800)

	ip := f[ethLen : ethLen+ipLen]
	ip[0], ip[8], ip[9] = 0x45, 64, 17 // version 4, 20 bytes; TTL; UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(ipLen+udpLen+len(payload)))
	s, d := src.As4(), dst.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	binary.BigEndian.PutUint16(ip[10:], ^checksum.OnesSum(ip, 0))

	udp := f[ethLen+ipLen:]
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(udpLen+len(payload)))
	copy(udp[udpLen:], payload)
	return f
}
