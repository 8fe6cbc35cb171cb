// Package flock is the one place patchcord takes and reads flock(2) locks:
// the loader's and the endpoint writers' locks on a bpffs root, the agent's
// single-instance lock and the trace monitors' shared lock. bpffs holds no
// regular files, but a directory can be flock()ed, and the kernel drops a
// lock with its process, so a killed holder never leaves one behind.
package flock

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Kinds of lock for Take, Hold and Convert: Shared or Exclusive, either
// optionally |NoWait.
const (
	Shared    = unix.LOCK_SH
	Exclusive = unix.LOCK_EX
	// NoWait makes a lock held elsewhere fail at once with ErrHeld.
	NoWait = unix.LOCK_NB
)

// ErrHeld is what a NoWait lock fails with when another process holds it.
var ErrHeld error = unix.EWOULDBLOCK

// Lock is a flock held on an open file or directory until Unlock.
type Lock struct {
	fd   int
	path string
}

// Take opens path (a directory or a file) and takes a flock of kind how
// (Shared or Exclusive, optionally |NoWait) on it. With NoWait a lock held
// elsewhere fails with an error matching ErrHeld.
func Take(path string, how int) (*Lock, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s for locking: %w", path, err)
	}
	l := &Lock{fd: fd, path: path}
	if err := l.Convert(how); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return l, nil
}

// Hold is Take for callers that only ever release the lock: it returns
// the lock's Unlock.
func Hold(path string, how int) (unlock func(), err error) {
	l, err := Take(path, how)
	if err != nil {
		return nil, err
	}
	return l.Unlock, nil
}

// Convert changes the held lock to kind how. The kernel drops the old lock
// first, so a failed LOCK_EX|LOCK_NB leaves none held.
func (l *Lock) Convert(how int) error {
	if err := unix.Flock(l.fd, how); err != nil {
		return fmt.Errorf("lock %s: %w", l.path, err)
	}
	return nil
}

// Unlock releases the lock by closing its descriptor.
func (l *Lock) Unlock() { unix.Close(l.fd) }

// Held reports whether some process holds a flock on path. It reads
// /proc/locks rather than probing: a probe holds the lock for a moment, and
// the real owner trying at that moment would wrongly find it taken.
func Held(path string) (bool, error) {
	var st unix.Stat_t
	err := unix.Stat(path, &st)
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return false, fmt.Errorf("read lock table: %w", err)
	}
	return held(b, st.Dev, st.Ino), nil
}

// held reports whether the lock table (/proc/locks) holds a flock on the
// inode ino of device dev. Its lines read
// "1: FLOCK  ADVISORY  READ 4237 00:27:323450 0 EOF", blocked waiters
// "1: -> FLOCK ...".
func held(table []byte, dev, ino uint64) bool {
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
