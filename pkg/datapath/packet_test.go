// This file builds and decodes the packets the BPF_PROG_RUN tests feed the
// datapath: Ethernet, ARP, IPv4 with options, UDP, TCP and VXLAN. They are
// written by hand so that the tests need no packet library and can build the
// malformed headers a library would refuse to. decode names every header
// field of a frame, so that a failed comparison says which field differs
// instead of showing two hex dumps.
package datapath_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/patchcord/patchcord/internal/checksum"
)

const (
	ethTypeIPv4 = 0x0800
	ethTypeARP  = 0x0806
	ethTypeVLAN = 0x8100
	ethTypeIPv6 = 0x86dd

	arpOpRequest = 1
	arpOpReply   = 2

	ipProtoTCP = 6
	ipProtoUDP = 17

	// IPv4 frag_off bits, as on the wire.
	ipDF = 0x4000
	ipMF = 0x2000

	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10

	ethHdrLen   = 14
	arpLen      = 28
	ipv4HdrLen  = 20
	udpHdrLen   = 8
	tcpHdrLen   = 20
	vxlanHdrLen = 8

	// vxlanOverhead is what encapsulation inserts between the outer
	// Ethernet header and the inner IPv4 packet: outer IPv4, UDP, VXLAN and
	// the inner Ethernet header.
	vxlanOverhead = ipv4HdrLen + udpHdrLen + vxlanHdrLen + ethHdrLen

	// vxlanFlagI is the VXLAN I flag: the VNI is valid (RFC 7348).
	vxlanFlagI = 0x08
)

// vxlanPorts are the UDP ports decode reads as VXLAN: the IANA port and the
// Linux default Flannel uses.
var vxlanPorts = map[uint16]bool{4789: true, 8472: true}

type ethernet struct {
	Dst, Src net.HardwareAddr // nil is all zeroes
	Type     uint16
}

func (e ethernet) marshal(payload []byte) []byte {
	b := make([]byte, 0, ethHdrLen+len(payload))
	b = append(b, mac6(e.Dst)...)
	b = append(b, mac6(e.Src)...)
	b = binary.BigEndian.AppendUint16(b, e.Type)
	return append(b, payload...)
}

// arp is an ARP packet; every field is written as given, so that tests can
// build the non-Ethernet and non-IPv4 kinds the datapath must leave alone.
type arp struct {
	HType, PType uint16
	HLen, PLen   uint8
	Op           uint16
	SHA          net.HardwareAddr
	SPA          netip.Addr // the zero Addr is written as 0.0.0.0
	THA          net.HardwareAddr
	TPA          netip.Addr
}

// arpRequest is an ARP request for IPv4 over Ethernet, the only kind a pod
// sends.
func arpRequest(sha net.HardwareAddr, spa, tpa netip.Addr) arp {
	return arp{HType: 1, PType: ethTypeIPv4, HLen: 6, PLen: 4, Op: arpOpRequest, SHA: sha, SPA: spa, TPA: tpa}
}

// with returns a changed by change: a table row's one odd field.
func (a arp) with(change func(*arp)) arp {
	change(&a)
	return a
}

func (a arp) marshal() []byte {
	b := make([]byte, 0, arpLen)
	b = binary.BigEndian.AppendUint16(b, a.HType)
	b = binary.BigEndian.AppendUint16(b, a.PType)
	b = append(b, a.HLen, a.PLen)
	b = binary.BigEndian.AppendUint16(b, a.Op)
	b = append(b, mac6(a.SHA)...)
	b = append(b, ip4(a.SPA)...)
	b = append(b, mac6(a.THA)...)
	return append(b, ip4(a.TPA)...)
}

// ipv4 is an IPv4 header. marshal fills in the version, header length, total
// length and checksum unless a test overrides them to build a malformed one.
type ipv4 struct {
	// VersionIHL replaces the first byte when non-zero (0x65: version 6;
	// 0x44: a 16-byte header); zero means version 4 and the header length
	// of Options.
	VersionIHL uint8
	TOS        uint8
	// TotalLen replaces the total length when non-zero.
	TotalLen uint16
	ID       uint16
	FragOff  uint16 // flags (ipDF, ipMF) and offset in 8-byte units, as on the wire
	TTL      uint8
	Protocol uint8
	Src, Dst netip.Addr
	Options  []byte // a multiple of 4 bytes
	// L4Checksum fills in the checksum of the TCP or UDP segment carried,
	// so that inner packets look like a real stack's; the outer UDP header
	// of VXLAN keeps a zero checksum, as RFC 7348 asks.
	L4Checksum bool
}

func (h ipv4) headerLen() int { return ipv4HdrLen + len(h.Options) }

func (h ipv4) marshal(payload []byte) []byte {
	if len(h.Options)%4 != 0 {
		panic(fmt.Sprintf("IPv4 options of %d bytes: must be a multiple of 4", len(h.Options)))
	}
	hlen := h.headerLen()
	b := make([]byte, hlen, hlen+len(payload))
	b[0] = 0x40 | uint8(hlen/4)
	if h.VersionIHL != 0 {
		b[0] = h.VersionIHL
	}
	b[1] = h.TOS
	tot := uint16(hlen + len(payload))
	if h.TotalLen != 0 {
		tot = h.TotalLen
	}
	binary.BigEndian.PutUint16(b[2:], tot)
	binary.BigEndian.PutUint16(b[4:], h.ID)
	binary.BigEndian.PutUint16(b[6:], h.FragOff)
	b[8] = h.TTL
	b[9] = h.Protocol
	copy(b[12:], ip4(h.Src))
	copy(b[16:], ip4(h.Dst))
	copy(b[20:], h.Options)
	binary.BigEndian.PutUint16(b[10:], ipv4Checksum(b))

	seg := bytes.Clone(payload)
	if h.L4Checksum {
		switch h.Protocol {
		case ipProtoUDP:
			sum := l4Checksum(h.Src, h.Dst, h.Protocol, seg, 6)
			if sum == 0 {
				sum = 0xffff // zero means "no checksum" in UDP over IPv4
			}
			binary.BigEndian.PutUint16(seg[6:], sum)
		case ipProtoTCP:
			binary.BigEndian.PutUint16(seg[16:], l4Checksum(h.Src, h.Dst, h.Protocol, seg, 16))
		}
	}
	return append(b, seg...)
}

// udp is a UDP header; marshal computes its length and leaves the checksum
// zero (ipv4.L4Checksum fills it in).
type udp struct {
	SrcPort, DstPort uint16
}

func (u udp) marshal(payload []byte) []byte {
	b := make([]byte, udpHdrLen, udpHdrLen+len(payload))
	binary.BigEndian.PutUint16(b[0:], u.SrcPort)
	binary.BigEndian.PutUint16(b[2:], u.DstPort)
	binary.BigEndian.PutUint16(b[4:], uint16(udpHdrLen+len(payload)))
	return append(b, payload...)
}

// tcp is an option-less TCP header; ipv4.L4Checksum fills in its checksum.
type tcp struct {
	SrcPort, DstPort uint16
	Seq, Ack         uint32
	Flags            uint8
	Window           uint16
}

func (t tcp) marshal(payload []byte) []byte {
	b := make([]byte, tcpHdrLen, tcpHdrLen+len(payload))
	binary.BigEndian.PutUint16(b[0:], t.SrcPort)
	binary.BigEndian.PutUint16(b[2:], t.DstPort)
	binary.BigEndian.PutUint32(b[4:], t.Seq)
	binary.BigEndian.PutUint32(b[8:], t.Ack)
	b[12] = (tcpHdrLen / 4) << 4
	b[13] = t.Flags
	binary.BigEndian.PutUint16(b[14:], t.Window)
	return append(b, payload...)
}

// vxlan is a VXLAN header: the flags byte and the 24-bit VNI.
type vxlan struct {
	Flags uint8
	VNI   uint32
}

func (v vxlan) marshal(payload []byte) []byte {
	b := make([]byte, vxlanHdrLen, vxlanHdrLen+len(payload))
	b[0] = v.Flags
	binary.BigEndian.PutUint32(b[4:], v.VNI<<8)
	return append(b, payload...)
}

// ipv6 is the smallest IPv6 packet: a header announcing no next header.
func ipv6(src, dst netip.Addr) []byte {
	b := make([]byte, 40)
	b[0] = 0x60
	b[6] = 59 // IPPROTO_NONE
	b[7] = 64
	s, d := src.As16(), dst.As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	return b
}

// ipv4Checksum computes the checksum of an IPv4 header from scratch,
// ignoring what its checksum field holds.
func ipv4Checksum(hdr []byte) uint16 {
	h := bytes.Clone(hdr)
	h[10], h[11] = 0, 0
	return ^checksum.OnesSum(h, 0)
}

// ipv4ChecksumValid verifies a header the way a receiver does: the sum over
// the header, checksum included, is all ones. Unlike comparing against a
// recomputed checksum it accepts both ones'-complement zeroes, as receivers
// do.
func ipv4ChecksumValid(hdr []byte) bool { return checksum.OnesSum(hdr, 0) == 0xffff }

func l4Checksum(src, dst netip.Addr, proto uint8, seg []byte, at int) uint16 {
	s := bytes.Clone(seg)
	s[at], s[at+1] = 0, 0
	return checksum.L4(src, dst, proto, s)
}

func mac6(hw net.HardwareAddr) []byte {
	if hw == nil {
		return make([]byte, 6)
	}
	if len(hw) != 6 {
		panic(fmt.Sprintf("MAC %s is not 6 bytes", hw))
	}
	return hw
}

func ip4(a netip.Addr) []byte {
	if !a.IsValid() {
		return make([]byte, 4)
	}
	b := a.As4()
	return b[:]
}

func mustMAC(s string) net.HardwareAddr {
	hw, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return hw
}

// field is one decoded header field, named like "ip.ttl" or
// "inner.eth.src".
type field struct{ name, value string }

// decode names every header field of an Ethernet frame, down to TCP, UDP and
// VXLAN's inner frame; what it cannot parse is shown as hex.
func decode(frame []byte) []field {
	var d decoder
	d.ethernet("", frame)
	return d.fields
}

type decoder struct{ fields []field }

func (d *decoder) add(name, format string, args ...any) {
	d.fields = append(d.fields, field{name, fmt.Sprintf(format, args...)})
}

func (d *decoder) rest(name string, b []byte) {
	if len(b) > 0 {
		d.add(name, "%d bytes %x", len(b), b)
	}
}

// truncated reports whether b is too short for the n bytes of header h,
// showing what there is as h's truncated bytes.
func (d *decoder) truncated(h string, b []byte, n int) bool {
	if len(b) >= n {
		return false
	}
	d.rest(h+".truncated", b)
	return true
}

func (d *decoder) ethernet(p string, b []byte) {
	if d.truncated(p+"eth", b, ethHdrLen) {
		return
	}
	typ := binary.BigEndian.Uint16(b[12:])
	d.add(p+"eth.dst", "%s", net.HardwareAddr(b[0:6]))
	d.add(p+"eth.src", "%s", net.HardwareAddr(b[6:12]))
	d.add(p+"eth.type", "%#04x", typ)
	switch typ {
	case ethTypeARP:
		d.arp(p, b[ethHdrLen:])
	case ethTypeIPv4:
		d.ipv4(p, b[ethHdrLen:])
	default:
		d.rest(p+"eth.payload", b[ethHdrLen:])
	}
}

func (d *decoder) arp(p string, b []byte) {
	if d.truncated(p+"arp", b, arpLen) {
		return
	}
	d.add(p+"arp.htype", "%d", binary.BigEndian.Uint16(b[0:]))
	d.add(p+"arp.ptype", "%#04x", binary.BigEndian.Uint16(b[2:]))
	d.add(p+"arp.hlen", "%d", b[4])
	d.add(p+"arp.plen", "%d", b[5])
	d.add(p+"arp.op", "%d", binary.BigEndian.Uint16(b[6:]))
	d.add(p+"arp.sha", "%s", net.HardwareAddr(b[8:14]))
	d.add(p+"arp.spa", "%s", netip.AddrFrom4([4]byte(b[14:18])))
	d.add(p+"arp.tha", "%s", net.HardwareAddr(b[18:24]))
	d.add(p+"arp.tpa", "%s", netip.AddrFrom4([4]byte(b[24:28])))
	d.rest(p+"arp.trailer", b[arpLen:])
}

func (d *decoder) ipv4(p string, b []byte) {
	if d.truncated(p+"ip", b, ipv4HdrLen) {
		return
	}
	hlen := int(b[0]&0x0f) * 4
	tot := int(binary.BigEndian.Uint16(b[2:]))
	frag := binary.BigEndian.Uint16(b[6:])
	d.add(p+"ip.version", "%d", b[0]>>4)
	d.add(p+"ip.ihl", "%d", b[0]&0x0f)
	d.add(p+"ip.tos", "%#02x", b[1])
	d.add(p+"ip.tot_len", "%d", tot)
	d.add(p+"ip.id", "%#04x", binary.BigEndian.Uint16(b[4:]))
	d.add(p+"ip.flags", "DF=%t MF=%t", frag&ipDF != 0, frag&ipMF != 0)
	d.add(p+"ip.frag_offset", "%d", frag&0x1fff)
	d.add(p+"ip.ttl", "%d", b[8])
	d.add(p+"ip.protocol", "%d", b[9])
	d.add(p+"ip.saddr", "%s", netip.AddrFrom4([4]byte(b[12:16])))
	d.add(p+"ip.daddr", "%s", netip.AddrFrom4([4]byte(b[16:20])))
	if hlen < ipv4HdrLen || hlen > len(b) || tot < hlen || tot > len(b) {
		d.add(p+"ip.check", "%#04x", binary.BigEndian.Uint16(b[10:]))
		d.rest(p+"ip.unparsed", b[ipv4HdrLen:])
		return
	}
	valid := "valid"
	if !ipv4ChecksumValid(b[:hlen]) {
		valid = fmt.Sprintf("INVALID, want %#04x", ipv4Checksum(b[:hlen]))
	}
	d.add(p+"ip.check", "%#04x (%s)", binary.BigEndian.Uint16(b[10:]), valid)
	d.rest(p+"ip.options", b[ipv4HdrLen:hlen])
	l4 := b[hlen:tot]
	switch {
	case frag&0x1fff != 0:
		d.rest(p+"ip.fragment", l4)
	case b[9] == ipProtoUDP:
		d.udp(p, l4)
	case b[9] == ipProtoTCP:
		d.tcp(p, l4)
	default:
		d.rest(p+"ip.payload", l4)
	}
	d.rest(p+"eth.trailer", b[tot:])
}

func (d *decoder) udp(p string, b []byte) {
	if d.truncated(p+"udp", b, udpHdrLen) {
		return
	}
	dport := binary.BigEndian.Uint16(b[2:])
	d.add(p+"udp.sport", "%d", binary.BigEndian.Uint16(b[0:]))
	d.add(p+"udp.dport", "%d", dport)
	d.add(p+"udp.len", "%d", binary.BigEndian.Uint16(b[4:]))
	d.add(p+"udp.check", "%#04x", binary.BigEndian.Uint16(b[6:]))
	payload := b[udpHdrLen:]
	if p == "" && vxlanPorts[dport] && len(payload) >= vxlanHdrLen {
		d.add("vxlan.flags", "%#02x", payload[0])
		d.add("vxlan.reserved", "%x %x", payload[1:4], payload[7])
		d.add("vxlan.vni", "%d", binary.BigEndian.Uint32(payload[4:])>>8)
		d.ethernet("inner.", payload[vxlanHdrLen:])
		return
	}
	d.rest(p+"udp.payload", payload)
}

func (d *decoder) tcp(p string, b []byte) {
	if d.truncated(p+"tcp", b, tcpHdrLen) {
		return
	}
	d.add(p+"tcp.sport", "%d", binary.BigEndian.Uint16(b[0:]))
	d.add(p+"tcp.dport", "%d", binary.BigEndian.Uint16(b[2:]))
	d.add(p+"tcp.seq", "%d", binary.BigEndian.Uint32(b[4:]))
	d.add(p+"tcp.ack", "%d", binary.BigEndian.Uint32(b[8:]))
	d.add(p+"tcp.flags", "%#02x", b[13])
	d.add(p+"tcp.window", "%d", binary.BigEndian.Uint16(b[14:]))
	d.add(p+"tcp.check", "%#04x", binary.BigEndian.Uint16(b[16:]))
	off := int(b[12]>>4) * 4
	if off < tcpHdrLen || off > len(b) {
		d.rest(p+"tcp.unparsed", b[tcpHdrLen:])
		return
	}
	d.rest(p+"tcp.options", b[tcpHdrLen:off])
	d.rest(p+"tcp.payload", b[off:])
}

// frameDiff explains how got differs from want: the header fields whose
// values differ, then the first differing byte.
func frameDiff(want, got []byte) string {
	var sb strings.Builder
	if len(got) != len(want) {
		fmt.Fprintf(&sb, "  length: got %d, want %d\n", len(got), len(want))
	}
	w, g := fieldMap(decode(want)), fieldMap(decode(got))
	for _, name := range fieldNames(decode(want), decode(got)) {
		wv, wok := w[name]
		gv, gok := g[name]
		switch {
		case !gok:
			fmt.Fprintf(&sb, "  %s: missing, want %s\n", name, wv)
		case !wok:
			fmt.Fprintf(&sb, "  %s: got %s, want nothing\n", name, gv)
		case gv != wv:
			fmt.Fprintf(&sb, "  %s: got %s, want %s\n", name, gv, wv)
		}
	}
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			fmt.Fprintf(&sb, "  first difference at byte %d: got %#02x, want %#02x\n", i, got[i], want[i])
			break
		}
	}
	fmt.Fprintf(&sb, "  got  %x\n  want %x", got, want)
	return sb.String()
}

func fieldMap(fs []field) map[string]string {
	m := make(map[string]string, len(fs))
	for _, f := range fs {
		m[f.name] = f.value
	}
	return m
}

// fieldNames lists the names of both decodings once each, in frame order.
func fieldNames(a, b []field) []string {
	seen := make(map[string]bool)
	var names []string
	for _, f := range slices.Concat(a, b) {
		if !seen[f.name] {
			seen[f.name] = true
			names = append(names, f.name)
		}
	}
	return names
}

// describe prints a frame's decoded fields one per line, for failure
// messages about a single frame.
func describe(frame []byte) string {
	var sb strings.Builder
	for _, f := range decode(frame) {
		fmt.Fprintf(&sb, "  %s: %s\n", f.name, f.value)
	}
	return sb.String()
}
