package packet

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/internal/checksum"
)

func TestUDP(t *testing.T) {
	dst, src := net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	f := UDP(dst, src, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), 1000, 53, []byte("abc"))
	if len(f) != 14+20+8+3 {
		t.Fatalf("frame of %d bytes, want 45", len(f))
	}
	if got := checksum.OnesSum(f[14:34], 0); got != 0xffff {
		t.Errorf("IPv4 header sums to %#04x, want 0xffff (a valid checksum)", got)
	}
	if got := binary.BigEndian.Uint16(f[16:]); got != 31 {
		t.Errorf("IPv4 total length %d, want 31", got)
	}
	if got := binary.BigEndian.Uint16(f[38:]); got != 11 {
		t.Errorf("UDP length %d, want 11", got)
	}
	if string(f[42:]) != "abc" || net.HardwareAddr(f[0:6]).String() != dst.String() {
		t.Errorf("payload %q, dst MAC %s", f[42:], net.HardwareAddr(f[0:6]))
	}
}
