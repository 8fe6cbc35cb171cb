package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/patchcord/patchcord/internal/flock"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where a node's datapath is pinned unless told otherwise.
// Emulated nodes sharing one kernel each get a root on their own bpffs.
const DefaultRoot = "/sys/fs/bpf/patchcord"

const sysBPF = "/sys/fs/bpf"

// prepareRoot makes root a directory on a bpf filesystem. Only the default
// location may be mounted on the caller's behalf, as Cilium does: anywhere
// else a missing bpffs is a setup mistake the operator has to see.
func prepareRoot(root string) error {
	if filepath.Clean(root) == DefaultRoot {
		if err := mountSysBPF(); err != nil {
			return err
		}
	}
	existing := root
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	if ok, err := isBPFFS(existing); err != nil {
		return fmt.Errorf("check bpffs at %s: %w", existing, err)
	} else if !ok {
		return fmt.Errorf("%s is not on a bpf filesystem: mount one with `mount -t bpf bpf %s`", root, root)
	}
	for _, dir := range []string{root, filepath.Join(root, "maps"), filepath.Join(root, "progs"), filepath.Join(root, "links")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	return nil
}

func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC, nil
}

func mountSysBPF() error {
	if err := os.MkdirAll(sysBPF, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", sysBPF, err)
	}
	if ok, err := isBPFFS(sysBPF); err != nil {
		return fmt.Errorf("check bpffs at %s: %w", sysBPF, err)
	} else if ok {
		return nil
	}
	if err := unix.Mount("bpf", sysBPF, "bpf", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount bpffs at %s: %w", sysBPF, err)
	}
	return nil
}

// lockRoot serialises loaders of one node: container runtimes run ADDs in
// parallel, and two of them must not both pin a fresh datapath.
func lockRoot(root string) (unlock func(), err error) {
	return flock.Hold(root, flock.Exclusive)
}

// LockEndpoints serialises the writers of endpoints and their from_pod
// links: CNI ADD's register, DEL's unregister and the agent's reconcile.
// Each holds it only for its map work and its links' pins, never for IPAM,
// veth setup or ADD's attach (staged before, see Staged), so parallel ADDs
// wait on each other for well under a millisecond.
// It is a lock of its own, taken after the root's: Open takes it too while
// it may migrate maps, so nobody may Open while holding it. It fails with
// ErrMapsReplaced where a migration replaced this handle's endpoint maps.
func (d *Datapath) LockEndpoints() (unlock func(), err error) {
	unlock, err = lockEndpoints(d.Root)
	if err != nil {
		return nil, err
	}
	if err := d.endpointMapsCurrent(); err != nil {
		unlock()
		return nil, err
	}
	return unlock, nil
}

func lockEndpoints(root string) (unlock func(), err error) {
	dir := filepath.Join(root, "endpoint-lock")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	return flock.Hold(dir, flock.Exclusive)
}
