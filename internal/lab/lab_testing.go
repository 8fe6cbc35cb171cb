// Test glue: a lab tied to a test's lifetime. It lives outside _test.go so that the
// end-to-end tests in test/ can use it too.
package lab

import (
	"bytes"
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
	if os.Geteuid() != 0 {
		tb.Skip("needs root: creates network namespaces and mounts bpffs")
	}
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
