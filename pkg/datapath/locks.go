package datapath

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// DirLocked reports whether some process holds a flock on dir (the agent's
// and the monitors' locks under a root). It reads /proc/locks rather than
// probing: a probe holds the lock for a moment, and the real owner trying
// at that moment would wrongly find it taken.
func DirLocked(dir string) (bool, error) {
	var st unix.Stat_t
	err := unix.Stat(dir, &st)
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", dir, err)
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return false, fmt.Errorf("read lock table: %w", err)
	}
	return flockHeld(b, st.Dev, st.Ino), nil
}

// flockHeld reports whether the lock table (/proc/locks) holds a flock on
// the inode ino of device dev. Its lines read
// "1: FLOCK  ADVISORY  READ 4237 00:27:323450 0 EOF", blocked waiters
// "1: -> FLOCK ...".
func flockHeld(table []byte, dev, ino uint64) bool {
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(dev), unix.Minor(dev), ino)
	for _, line := range strings.Split(string(table), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[1] != "FLOCK" {
			continue
		}
		if f[5] == want {
			return true
		}
	}
	return false
}
