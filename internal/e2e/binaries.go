// How a run finds patchcord and patchcord-cni: `make test` builds them once
// into bin/ and exports PATCHCORD_BIN; a plain `go test ./test/...` builds
// them once into a shared directory, under a file lock, so the packages that
// run at the same time neither build twice in parallel nor see half a binary.
package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/patchcord/patchcord/internal/flock"
)

// commands are the binaries by package; patchcord-install goes into the
// DaemonSet's image.
var commands = map[string]string{"patchcord": "./cmd/patchcord", "patchcord-cni": "./cmd/patchcord-cni", "patchcord-install": "./deploy/install"}

// binaries returns the directory holding this tree's binaries.
func binaries() (string, error) {
	if dir := os.Getenv("PATCHCORD_BIN"); dir != "" {
		for cmd := range commands {
			if _, err := os.Stat(filepath.Join(dir, cmd)); err != nil {
				return "", fmt.Errorf("PATCHCORD_BIN=%s lacks %s: run `make build`", dir, cmd)
			}
		}
		return dir, nil
	}
	// One directory per source tree, so two worktrees never share binaries.
	sum := sha256.Sum256([]byte(RepoDir()))
	dir := filepath.Join(os.TempDir(), "patchcord-e2e-bin-"+hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("binaries dir: %w", err)
	}
	lock, err := flock.Take(dir, flock.Exclusive)
	if err != nil {
		return "", fmt.Errorf("lock binaries dir: %w", err)
	}
	defer lock.Unlock()
	// go build leaves an up-to-date binary alone, so after the first package
	// this costs only the check; it keeps the binaries those of this tree.
	for cmd, pkg := range commands {
		build := exec.Command("go", "build", "-o", filepath.Join(dir, cmd), pkg)
		build.Dir = RepoDir()
		if out, err := build.CombinedOutput(); err != nil {
			return "", fmt.Errorf("build %s (or run `make build` and set PATCHCORD_BIN): %v\n%s", cmd, err, out)
		}
	}
	return dir, nil
}
