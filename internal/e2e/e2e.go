// Package e2e is the end-to-end test kit: it finds this tree's binaries and the
// tools (cnitool, crictl, reference plugins), builds labs tied to a test, starts
// agents, writes nodes files and conflists, reads the CLI's views and drives
// traffic. The test packages under test/ and the bench share it, so each piece
// of lab wiring is written once.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// binDir holds the patchcord binaries this run uses; Main sets it.
var binDir string

// Main is the TestMain of every end-to-end package: it sweeps labs left by
// killed runs and finds (or builds, once for all packages) the binaries.
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		// Every test skips with the reason; nothing to build.
		return m.Run()
	}
	// A run killed by -timeout skips cleanups; its labs go here (only labs
	// whose owner process is dead are touched).
	if err := lab.Sweep(""); err != nil {
		fmt.Fprintln(os.Stderr, "sweep old labs:", err)
	}
	dir, err := binaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	binDir = dir
	return m.Run()
}

// RepoDir is the root of this source tree.
func RepoDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}

// BinDir is where this run's patchcord and patchcord-cni are.
func BinDir() string { return binDir }

// CNIPath is where the reference plugins are: $CNI_PLUGINS (set by the
// Makefile), else bin/cni of this repo, else /opt/cni/bin.
func CNIPath(tb testing.TB) []string {
	tb.Helper()
	candidates := []string{os.Getenv("CNI_PLUGINS"), filepath.Join(RepoDir(), "bin", "cni"), "/opt/cni/bin"}
	for _, dir := range candidates {
		if dir == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, "host-local")); err == nil {
			return []string{dir}
		}
	}
	tb.Fatalf("reference CNI plugins (host-local, ptp) not found in %v: run `make tools`", candidates)
	return nil
}

// CNIPathWithPlugin is CNI_PATH for a runtime: this run's patchcord-cni,
// then the reference plugins.
func CNIPathWithPlugin(tb testing.TB) []string {
	return append([]string{binDir}, CNIPath(tb)...)
}

// CNITool finds cnitool: $CNITOOL, bin/tools of this repo, then PATH.
func CNITool(tb testing.TB) string { tb.Helper(); return tool(tb, "CNITOOL", "cnitool") }

// Crictl finds crictl: $CRICTL, bin/tools of this repo, then PATH.
func Crictl(tb testing.TB) string { tb.Helper(); return tool(tb, "CRICTL", "crictl") }

func tool(tb testing.TB, env, name string) string {
	tb.Helper()
	for _, p := range []string{os.Getenv(env), filepath.Join(RepoDir(), "bin", "tools", name)} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	tb.Fatalf("%s not found ($%s, bin/tools, PATH): run `make tools`", name, env)
	return ""
}

// NewLab is a lab wired to this run's binaries and tools; it goes away with
// the test, pass or fail. It skips the test when not root.
func NewLab(t *testing.T) *lab.Lab {
	t.Helper()
	datapathtest.RequireKernel(t)
	return lab.NewForTest(t, lab.Options{BinDir: binDir, CNIPath: CNIPath(t), CNITool: CNITool(t)})
}

// Ctx bounds everything a test runs: 3 minutes, or $PATCHCORD_E2E_TIMEOUT.
func Ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), slowTimeout(3*time.Minute))
	t.Cleanup(cancel)
	return ctx
}

// Step is one named part of a lab test; the steps of a test share its
// topology, which is too slow to build for each.
type Step struct {
	Name string
	Run  func(*testing.T, context.Context)
}

// RunSteps runs each step as a subtest, in order, all of them even when
// one fails: the later ones check that the node keeps working.
func RunSteps(t *testing.T, ctx context.Context, steps ...Step) {
	t.Helper()
	for _, s := range steps {
		t.Run(s.Name, func(t *testing.T) { s.Run(t, ctx) })
	}
}

// slowTimeout is d, or $PATCHCORD_E2E_TIMEOUT (a Go duration) where that is
// longer: everything is slower in the kernel matrix's emulated guests.
func slowTimeout(d time.Duration) time.Duration {
	if env, err := time.ParseDuration(os.Getenv("PATCHCORD_E2E_TIMEOUT")); err == nil && env > d {
		return env
	}
	return d
}
