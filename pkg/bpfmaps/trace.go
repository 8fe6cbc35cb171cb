package bpfmaps

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/patchcord/patchcord/internal/flock"
)

// Traces cost a ring-buffer record per forwarded packet, so the datapath
// emits them only while the config's trace flag is set, and the flag is set
// only while some monitor asks for traces. Several monitors may run at once:
// each holds a shared flock on <root>/monitor for as long as it runs. The
// one that leaves last, and so can take the lock exclusively, switches
// traces off. The kernel drops a dead monitor's lock; its flag stays on
// until the next monitor with traces exits.

func monitorDir(root string) string { return filepath.Join(root, "monitor") }

// SetTrace switches the datapath's per-packet traces on or off and keeps the
// rest of the node config as it is. The config is one array entry written
// whole, so this is a read-modify-write: callers that may race (several
// monitors) serialise through StartTracing's monitor lock.
func (c *ConfigMap) SetTrace(on bool) error {
	return c.setFlag(func(cfg *Config) *bool { return &cfg.Trace }, on)
}

// SetNative sets the config's native flag as SetTrace sets the trace flag.
// Its one writer is the agent, which checks it on every node sync, so a
// write lost to a monitor's at the same moment is repaired by the next.
func (c *ConfigMap) SetNative(on bool) error {
	return c.setFlag(func(cfg *Config) *bool { return &cfg.Native }, on)
}

func (c *ConfigMap) setFlag(flag func(*Config) *bool, on bool) error {
	cfg, err := c.Get()
	if err != nil {
		return err
	}
	if *flag(&cfg) == on {
		return nil
	}
	*flag(&cfg) = on
	return c.Put(cfg)
}

// StartTracing switches per-packet traces on under root until the returned
// stop is called. stop switches them off again unless another monitor still
// wants them.
func StartTracing(root string, cfg *ConfigMap) (stop func() error, err error) {
	dir := monitorDir(root)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	// Blocking: a monitor that is switching traces off holds the lock
	// exclusively for a moment; ours must come after its write.
	l, err := flock.Take(dir, flock.Shared)
	if err != nil {
		return nil, err
	}
	if err := cfg.SetTrace(true); err != nil {
		l.Unlock()
		return nil, fmt.Errorf("switch tracing on: %w", err)
	}
	return func() error {
		defer l.Unlock()
		// Converting the lock drops our shared one first, so success means
		// no other monitor holds one.
		err := l.Convert(flock.Exclusive | flock.NoWait)
		if errors.Is(err, flock.ErrHeld) {
			return nil
		}
		if err != nil {
			return err
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
	return flock.Held(monitorDir(root))
}
