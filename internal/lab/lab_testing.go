// Test glue: a lab tied to a test's lifetime. It lives outside _test.go so that the
// end-to-end tests in test/ can use it too.
package lab

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

// NewForTest creates a lab that closes when tb ends, logging to the test's output unless
// opts.Log is set. It skips the test when not root, fails it when New fails, and on
// failure prints the tail of every process log before the lab directory goes.
func NewForTest(tb testing.TB, opts Options) *Lab {
	tb.Helper()
	RequireRoot(tb)
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	l, err := New(opts)
	if err != nil {
		tb.Fatalf("new lab: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			l.dumpLogs(tb)
		}
		if err := l.Close(); err != nil {
			tb.Errorf("close lab: %v", err)
		}
	})
	return l
}

// CheckRoot says why what cannot run unless root: labs build network
// namespaces, mount bpffs and load BPF. Programs (demo, bench) fail with it.
func CheckRoot(what string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%s builds network namespaces, mounts bpffs and loads BPF: run it as root", what)
	}
	return nil
}

// RequireRoot skips the test, with the reason, unless root. Every lab test
// checks through it.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if err := CheckRoot("this test"); err != nil {
		tb.Skip(err)
	}
}

// dumpLogs prints the last 4 KiB of each process log: enough for an agent's final error.
func (l *Lab) dumpLogs(tb testing.TB) {
	tb.Helper()
	logs, _ := filepath.Glob(filepath.Join(l.Dir, "logs", "*.log"))
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		const tail = 4096
		if len(b) > tail {
			b = append([]byte("..."), b[len(b)-tail:]...)
		}
		tb.Logf("%s:\n%s", filepath.Base(path), bytes.TrimRight(b, "\n"))
	}
}
