// Package datapathtest holds the test helpers every package that loads the
// datapath needs: a private bpffs per test and a datapath loaded onto it.
package datapathtest

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/pkg/datapath"
	"golang.org/x/sys/unix"
)

// RequireRoot skips outside root, naming why: loading BPF programs and
// mounting bpffs need CAP_SYS_ADMIN. As root (here and in CI) it never skips.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: loads BPF programs and mounts bpffs")
	}
}

// MustBPFFS mounts a private bpffs for one test and returns a datapath root
// on it; the mount goes away with the test.
func MustBPFFS(tb testing.TB) string {
	tb.Helper()
	RequireRoot(tb)
	dir := tb.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		tb.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount %s: %v", dir, err)
		}
	})
	return filepath.Join(dir, "patchcord")
}

// Logger logs to stderr under -v and nowhere otherwise.
func Logger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// RequireKernel skips where the running kernel lacks a feature the datapath
// cannot run without (below datapath.MinKernel), naming it: the load is
// refused there, which TestProbeFeatures checks.
func RequireKernel(tb testing.TB) {
	tb.Helper()
	RequireRoot(tb)
	if err := kernelCheck(); err != nil {
		tb.Skip(err)
	}
}

// kernelCheck probes once per test binary: the kernel does not change.
var kernelCheck = sync.OnceValue(func() error { return datapath.ProbeFeatures().Check() })

// MustOpen loads a fresh datapath on a private bpffs.
func MustOpen(tb testing.TB) *datapath.Datapath {
	tb.Helper()
	RequireKernel(tb)
	d, err := datapath.Open(MustBPFFS(tb), Logger(tb))
	if err != nil {
		tb.Fatalf("open datapath: %v", err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// CNIPlugins returns the directory holding the reference CNI plugins named:
// $CNI_PLUGINS, /opt/cni/bin or this tree's bin/cni (the tests run in their
// package directory, two levels down). As root the tests must run, so a
// missing plugin is fatal.
func CNIPlugins(tb testing.TB, names ...string) string {
	tb.Helper()
	var dirs []string
	if d := os.Getenv("CNI_PLUGINS"); d != "" {
		dirs = append(dirs, d)
	}
	dirs = append(dirs, "/opt/cni/bin")
	if d, err := filepath.Abs("../../bin/cni"); err == nil {
		dirs = append(dirs, d)
	}
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, names[0])); err != nil {
			continue
		}
		for _, n := range names[1:] {
			if _, err := os.Stat(filepath.Join(d, n)); err != nil {
				tb.Fatalf("%s has %s but no %s: run make tools", d, names[0], n)
			}
		}
		return d
	}
	tb.Fatalf("no %s plugin in %v: run make tools (or set CNI_PLUGINS)", names[0], dirs)
	return ""
}
