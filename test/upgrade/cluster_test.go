// The lab an upgrade runs in: two nodes whose patchcord binaries sit in one
// directory, as a DaemonSet installs them on a host, so that an upgrade is
// what it is on a real node: new files in place, the agent restarted, the
// next CNI call made by the new plugin.
package upgrade

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/views"
)

var commands = []string{"patchcord", "patchcord-cni"}

type cluster struct {
	lab    *lab.Lab
	bin    string // where the nodes' binaries are installed
	nodes  []*lab.Node
	files  map[int]string
	agents map[int]*lab.Process
}

// newCluster installs the binaries in from, builds nodes 1 and 2 and
// starts their agents.
func newCluster(t *testing.T, ctx context.Context, from string) *cluster {
	t.Helper()
	lab.RequireRoot(t)
	c := &cluster{bin: t.TempDir(), files: map[int]string{}, agents: map[int]*lab.Process{}}
	install(t, from, c.bin)
	c.lab = lab.NewForTest(t, lab.Options{BinDir: c.bin, CNIPath: e2e.CNIPath(t), CNITool: e2e.CNITool(t)})
	c.nodes = e2e.AddNodes(t, c.lab, 1, 2)
	for _, n := range c.nodes {
		if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
			t.Fatal(err)
		}
		c.files[n.Index] = filepath.Join(c.lab.Dir, fmt.Sprintf("nodes-n%d.json", n.Index))
		e2e.WriteNodes(t, c.files[n.Index], e2e.EntryOf(c.nodes[0]), e2e.EntryOf(c.nodes[1]))
		c.agents[n.Index] = e2e.StartAgent(t, ctx, n, c.files[n.Index])
	}
	return c
}

// install copies patchcord and patchcord-cni from one directory to another,
// each by a rename, so that no caller ever runs half a binary.
func install(t *testing.T, from, to string) {
	t.Helper()
	for _, cmd := range commands {
		if err := copyExecutable(filepath.Join(from, cmd), filepath.Join(to, cmd)); err != nil {
			t.Fatalf("install %s: %v", cmd, err)
		}
	}
}

func copyExecutable(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	tmp := to + ".new"
	dst, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	if err := dst.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, to)
}

// upgrade installs the binaries in from and restarts every agent with them,
// one node after the other, as a DaemonSet rolls.
func (c *cluster) upgrade(t *testing.T, ctx context.Context, from string) {
	t.Helper()
	install(t, from, c.bin)
	for _, n := range c.nodes {
		if err := c.agents[n.Index].Stop(); err != nil {
			t.Fatalf("stop agent on node %d: %v", n.Index, err)
		}
		c.agents[n.Index] = e2e.StartAgent(t, ctx, n, c.files[n.Index])
	}
}

// pod adds a pod through whichever plugin is installed.
func (c *cluster) pod(t *testing.T, ctx context.Context, n *lab.Node, name string) *lab.Pod {
	t.Helper()
	p, err := n.AddPod(ctx, name, "patchcord")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// status is `patchcord status` on n, with the installed CLI.
func status(t *testing.T, ctx context.Context, n *lab.Node) views.Status {
	t.Helper()
	out, err := n.CLI(ctx, "status", "-o", "json")
	var s views.Status
	if jerr := json.Unmarshal(out, &s); jerr != nil {
		t.Fatalf("status on %s: %v %v\n%s", n.NetNS, err, jerr, out)
	}
	return s
}

// requireHealthy fails the test unless status on every node is healthy.
func (c *cluster) requireHealthy(t *testing.T, ctx context.Context) {
	t.Helper()
	for _, n := range c.nodes {
		if s := status(t, ctx, n); !s.Healthy {
			t.Errorf("status on node %d after the upgrade: unhealthy: %v", n.Index, s.Problems)
		}
	}
}

// gitBuild builds this repository's binaries at ref into a temporary
// directory: the source from `git archive`, so the worktree stays as it is.
func gitBuild(t *testing.T, ref string) string {
	t.Helper()
	repo := e2e.RepoDir()
	out, err := exec.Command("git", "-C", repo, "rev-parse", "--verify", "--quiet", ref+"^{commit}").Output()
	if err != nil {
		t.Fatalf("%s is not in this repository (%v): fetch it (`git fetch --tags`, or `git fetch --unshallow` in a shallow clone): the upgrade test builds the release it upgrades from", ref, err)
	}
	commit := strings.TrimSpace(string(out))
	src := t.TempDir()
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", repo, commit, src)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("unpack %s: %v\n%s", ref, err, out)
	}
	return goBuild(t, src)
}

// goBuild builds patchcord and patchcord-cni of the source tree src with
// extra go build arguments.
func goBuild(t *testing.T, src string, extra ...string) string {
	t.Helper()
	bin := t.TempDir()
	args := append(append([]string{"build", "-trimpath", "-o", bin + "/"}, extra...), "./cmd/patchcord", "./cmd/patchcord-cni")
	build := exec.Command("go", args...)
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go %s in %s: %v\n%s", strings.Join(args, " "), src, err, out)
	}
	return bin
}
