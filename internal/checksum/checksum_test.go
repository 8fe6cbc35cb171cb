package checksum

import (
	"net/netip"
	"testing"
)

func TestChecksums(t *testing.T) {
	// RFC 1071's example: the sum of these words is 0xddf2.
	if got := OnesSum([]byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}, 0); got != 0xddf2 {
		t.Errorf("ones' sum %#04x, want 0xddf2", got)
	}
	if got := OnesSum([]byte{0x01}, 0); got != 0x0100 {
		t.Errorf("odd byte sums %#04x, want 0x0100", got)
	}
	// A segment carrying its own checksum sums to all ones with the pseudo
	// header, as a receiver checks it.
	src, dst := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("10.244.2.7")
	seg := []byte{0x9c, 0x40, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, 'p', 'i', 'n', 'g'}
	c := L4(src, dst, 17, seg)
	seg[6], seg[7] = byte(c>>8), byte(c)
	if got := L4(src, dst, 17, seg); got != 0 {
		t.Errorf("segment with its checksum does not verify: %#04x", got)
	}
}
