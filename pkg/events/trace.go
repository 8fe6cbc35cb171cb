package events

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/maps"
	"golang.org/x/sys/unix"
)

// Traces cost a ring-buffer record per forwarded packet, so the datapath
// emits them only while the config's trace flag is set, and the flag is set
// only while some monitor asks for traces. Several monitors may run at once:
// each holds a shared flock on <root>/monitor (bpffs has no regular files,
// but a directory can be locked) for as long as it runs. The one that leaves
// last, and so can take the lock exclusively, switches traces off. The
// kernel drops a dead monitor's lock; its flag stays on until the next
// monitor with traces exits.

func monitorDir(root string) string { return filepath.Join(root, "monitor") }

// StartTracing switches per-packet traces on under root until the returned
// stop is called. stop switches them off again unless another monitor still
// wants them.
func StartTracing(root string, cfg *maps.ConfigMap) (stop func() error, err error) {
	dir := monitorDir(root)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	// Blocking: a monitor that is switching traces off holds the lock
	// exclusively for a moment; ours must come after its write.
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := cfg.SetTrace(true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("switch tracing on: %w", err)
	}
	return func() error {
		defer unix.Close(fd)
		// Converting the lock drops our shared one first, so success means
		// no other monitor holds one.
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("lock %s: %w", dir, err)
		}
		if err := cfg.SetTrace(false); err != nil {
			return fmt.Errorf("switch tracing off: %w", err)
		}
		return nil
	}, nil
}

// TracersRunning reports whether a monitor with traces runs under root, so
// that `patchcord status` can tell a trace flag left on by a crashed monitor
// from one in use.
func TracersRunning(root string) (bool, error) {
	return datapath.DirLocked(monitorDir(root))
}
