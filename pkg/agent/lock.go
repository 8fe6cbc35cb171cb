// The agent's single-instance lock: one agent per node (per bpffs root),
// and `patchcord status` can tell whether it runs.
package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/patchcord/patchcord/internal/flock"
)

// ErrAgentRunning means another agent already serves this root.
var ErrAgentRunning = errors.New("another agent is running for this bpffs root")

func lockDir(root string) string { return filepath.Join(root, "agent") }

// Lock marks root as served by the calling agent for as long as the
// returned unlock is not called (or the process lives).
func Lock(root string) (unlock func(), err error) {
	dir := lockDir(root)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	unlock, err = flock.Hold(dir, flock.Exclusive|flock.NoWait)
	if errors.Is(err, flock.ErrHeld) {
		return nil, fmt.Errorf("%w: %s", ErrAgentRunning, root)
	}
	return unlock, err
}

// Running reports whether an agent holds root's agent lock.
func Running(root string) (bool, error) {
	return flock.Held(lockDir(root))
}
