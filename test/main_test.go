// Package test holds the end-to-end tests: real patchcord binaries, real
// cnitool and reference plugins, emulated nodes built by pkg/lab.
package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
)

// binDir holds the patchcord binaries built from this tree for this run.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		// Every test skips with the reason; nothing to build.
		return m.Run()
	}
	// A run killed by -timeout skips cleanups; its labs go here (only
	// labs whose owner process is dead are touched).
	if err := lab.Sweep(""); err != nil {
		fmt.Fprintln(os.Stderr, "sweep old labs:", err)
	}
	dir, err := os.MkdirTemp("", "patchcord-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Built here rather than taken from bin/, so the tests always exercise
	// this tree's code.
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(file))
	for _, cmd := range []string{"patchcord", "patchcord-cni"} {
		build := exec.Command("go", "build", "-o", filepath.Join(dir, cmd), "./cmd/"+cmd)
		build.Dir = repo
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", cmd, err, out)
			return 1
		}
	}
	binDir = dir
	return m.Run()
}

// cniPath is where the reference plugins are: $CNI_PLUGINS (set by the
// Makefile), else bin/cni of this repo, else /opt/cni/bin.
func cniPath(tb testing.TB) []string {
	tb.Helper()
	_, file, _, _ := runtime.Caller(0)
	candidates := []string{os.Getenv("CNI_PLUGINS"), filepath.Join(filepath.Dir(filepath.Dir(file)), "bin", "cni"), "/opt/cni/bin"}
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

// cnitool finds cnitool: $CNITOOL, bin/tools of this repo, then PATH.
func cnitool(tb testing.TB) string {
	tb.Helper()
	_, file, _, _ := runtime.Caller(0)
	for _, p := range []string{os.Getenv("CNITOOL"), filepath.Join(filepath.Dir(filepath.Dir(file)), "bin", "tools", "cnitool")} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("cnitool"); err == nil {
		return p
	}
	tb.Fatal("cnitool not found: run `make tools`")
	return ""
}

// newLab is a lab wired to this run's binaries and tools; it goes away with
// the test, pass or fail.
func newLab(t *testing.T) *lab.Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds network namespaces, mounts bpffs, loads BPF")
	}
	return lab.NewForTest(t, lab.Options{BinDir: binDir, CNIPath: cniPath(t), CNITool: cnitool(t)})
}

// testCtx bounds everything a test runs.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// nodeEntry is one entry of a nodes file.
type nodeEntry struct {
	Name    string `json:"name"`
	NodeIP  string `json:"nodeIP"`
	PodCIDR string `json:"podCIDR"`
	VtepMAC string `json:"vtepMAC,omitempty"`
}

func entryOf(n *lab.Node) nodeEntry {
	return nodeEntry{Name: n.NetNS, NodeIP: n.IP.String(), PodCIDR: n.PodCIDR.String()}
}

// writeNodes writes a nodes file atomically (as config management does), so
// an agent never reads half of it.
func writeNodes(t *testing.T, path string, entries ...nodeEntry) {
	t.Helper()
	b, err := json.Marshal(struct {
		Nodes []nodeEntry `json:"nodes"`
	}{entries})
	if err != nil {
		t.Fatal(err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startAgent runs `patchcord agent` on n and returns once it has synced.
func startAgent(t *testing.T, ctx context.Context, n *lab.Node, nodesFile string, extra ...string) *lab.Process {
	t.Helper()
	ready := filepath.Join(n.Lab.Dir, fmt.Sprintf("n%d.ready", n.Index))
	args := append([]string{"agent",
		"--uplink", "eth0", "--node-ip", n.IP.String(), "--pod-cidr", n.PodCIDR.String(),
		"--nodes", nodesFile, "--ready-file", ready, "--log-level", "debug"}, extra...)
	return startReady(t, ctx, n, "agent", ready, args...)
}

// startReady runs `patchcord --bpffs-root <n's> args...` in the background
// on n and returns once it writes ready (its --ready-file). It stops waiting
// at once if the process dies, e.g. on a flag error, and shows its log.
func startReady(t *testing.T, ctx context.Context, n *lab.Node, what, ready string, args ...string) *lab.Process {
	t.Helper()
	os.Remove(ready)
	p, err := n.Start(ctx, n.Lab.Bin("patchcord"), append([]string{"--bpffs-root", n.BpffsRoot}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	go func() {
		select {
		case <-p.Done():
			cancel()
		case <-wctx.Done():
		}
	}()
	err = lab.WaitFor(wctx, what+" on "+n.NetNS+" ready", func(context.Context) error {
		_, err := os.Stat(ready)
		return err
	})
	if err != nil {
		out, _ := os.ReadFile(p.LogPath)
		t.Fatalf("%v\n%s log:\n%s", err, what, out)
	}
	return p
}

// stats reads a node's counters through the CLI.
func stats(t *testing.T, ctx context.Context, n *lab.Node) map[string]counter {
	t.Helper()
	out, err := n.CLI(ctx, "bpf", "stats", "-o", "json")
	if err != nil {
		t.Fatalf("bpf stats on %s: %v", n.NetNS, err)
	}
	var m map[string]counter
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("bpf stats on %s: %v\n%s", n.NetNS, err, out)
	}
	return m
}

type counter struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// ping sends count pings from p to dst and fails the test on any loss.
func ping(t *testing.T, ctx context.Context, from interface {
	Exec(context.Context, string, ...string) ([]byte, error)
}, dst string, args ...string) {
	t.Helper()
	out, err := from.Exec(ctx, "ping", append([]string{"-c", "3", "-i", "0.2", "-W", "2", dst}, args...)...)
	if err != nil || !strings.Contains(string(out), " 0% packet loss") {
		t.Fatalf("ping %s: %v\n%s", dst, err, out)
	}
}

// TestLabHarness checks the harness itself: a node with an agent and a
// pod comes up and the CLI answers.
func TestLabHarness(t *testing.T) {
	l := newLab(t)
	ctx := testCtx(t)
	n, err := l.AddNode(1)
	if err != nil {
		t.Fatal(err)
	}
	nodes := filepath.Join(l.Dir, "nodes.json")
	writeNodes(t, nodes, entryOf(n))
	startAgent(t, ctx, n, nodes)
	if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
		t.Fatal(err)
	}
	p, err := n.AddPod(ctx, "p1", "patchcord")
	if err != nil {
		t.Fatal(err)
	}
	ping(t, ctx, n, p.IP.String())
	if st := stats(t, ctx, n); st["arp_reply"].Packets == 0 {
		t.Errorf("no ARP reply counted: %+v", st)
	}
}
