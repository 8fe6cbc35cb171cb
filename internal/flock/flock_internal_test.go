package flock

import "testing"

func TestFlockHeld(t *testing.T) {
	table := []byte(`1: FLOCK  ADVISORY  WRITE 4237 00:27:323450 0 EOF
2: FLOCK  ADVISORY  READ 4300 00:2e:77 0 EOF
3: -> FLOCK  ADVISORY  WRITE 4301 00:2f:78 0 EOF
4: POSIX  ADVISORY  WRITE 4302 00:30:79 0 EOF
`)
	for _, tt := range []struct {
		dev, ino uint64
		want     bool
	}{
		{0x2e, 77, true},     // a monitor holds it shared
		{0x27, 323450, true}, // exclusively, while switching off
		{0x2f, 78, false},    // only waiting for it
		{0x30, 79, false},    // a POSIX lock is not ours
		{0x2e, 7, false},     // another inode
		{0x2e, 770, false},   // no prefix match
	} {
		if got := held(table, tt.dev, tt.ino); got != tt.want {
			t.Errorf("held(%x, %d) = %v, want %v", tt.dev, tt.ino, got, tt.want)
		}
	}
}
