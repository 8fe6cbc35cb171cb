// Package upgrade upgrades live lab nodes: from the last release (v0.1.0,
// built from git) to this tree, and from this tree to a build of it whose
// program code differs, with pods, a UDP flow and a TCP connection running.
// Not one datagram may be lost, TCP carries on, the old pods' DEL and new
// ADDs work, status stays healthy and counters are kept. A release binary
// run against the upgraded node must fail before it changes anything.
package upgrade

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/views"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// The last release: its tag and the commit the tag names. A clone made
// without tags (CI's may be) still has the commit.
const (
	lastRelease       = "v0.1.0"
	lastReleaseCommit = "4407d6d0d0ddc0e73693d1b09933fe0a73fbefca"
)

// release is what TestUpgradeFromRelease upgrades from:
// $PATCHCORD_UPGRADE_FROM (a tag or commit) or the last release.
func release(t *testing.T) string {
	if ref := os.Getenv("PATCHCORD_UPGRADE_FROM"); ref != "" {
		return ref
	}
	out, err := exec.Command("git", "-C", e2e.RepoDir(), "rev-parse", "--verify", "--quiet", lastRelease+"^{commit}").Output()
	switch got := strings.TrimSpace(string(out)); {
	case err != nil:
		t.Logf("tag %s not in this clone: building its commit %s", lastRelease, lastReleaseCommit[:12])
	case got != lastReleaseCommit:
		t.Fatalf("tag %s names %s, not the release commit %s: update lastReleaseCommit with the tag", lastRelease, got, lastReleaseCommit)
	}
	return lastReleaseCommit
}

func TestUpgradeFromRelease(t *testing.T) {
	t.Parallel()
	old := gitBuild(t, release(t))
	ctx := e2e.Ctx(t)
	u := startLive(t, ctx, old)
	u.c.upgrade(t, ctx, e2e.BinDir())
	u.verify(t, ctx)

	// The maps whose layout changed since the release moved to new pins;
	// their old ones hold tombstones that the release refuses.
	root := u.c.nodes[0].BpffsRoot
	for _, name := range []string{"stats", "config"} {
		if _, err := os.Stat(filepath.Join(root, "maps", name+"_v2")); err != nil {
			t.Errorf("map %s not migrated: %v", name, err)
		}
	}
	refuseRelease(t, ctx, u, old)
	u.flows.Finish(t, "across the upgrade")
}

func TestUpgradeProgramCode(t *testing.T) {
	t.Parallel()
	variant := goBuild(t, e2e.RepoDir(), "-tags", "patchcord_variant")
	ctx := e2e.Ctx(t)
	u := startLive(t, ctx, e2e.BinDir())
	before := progList(t, ctx, u.c.nodes[0])
	u.c.upgrade(t, ctx, variant)
	u.verify(t, ctx)
	after := progList(t, ctx, u.c.nodes[0])
	for key, b := range before {
		a, ok := after[key]
		switch {
		case b.PodIP == u.x.IP.String():
			// x was deleted during the upgrade.
		case !ok:
			t.Errorf("%s: attachment gone after the upgrade", key)
		case a.Tag == b.Tag || a.ProgID == b.ProgID:
			t.Errorf("%s: still runs program %d (tag %s): the upgrade did not load the changed code", key, a.ProgID, a.Tag)
		case a.LinkID != b.LinkID:
			t.Errorf("%s: link %d replaced by %d, want the same link moved to the new program", key, b.LinkID, a.LinkID)
		case a.Status != "ok":
			t.Errorf("%s: status %s after the upgrade", key, a.Status)
		}
	}
	u.flows.Finish(t, "across the upgrade")
}

// live is a cluster with traffic under way: pods a, b and x on node 1, c on
// node 2; UDP a->c (encapsulated) and a->b (redirected), TCP b->c.
type live struct {
	c       *cluster
	a, b, x *lab.Pod
	pc      *lab.Pod
	flows   *e2e.Flows
	before  map[int]map[string]e2e.Counter
}

func startLive(t *testing.T, ctx context.Context, bin string) *live {
	t.Helper()
	u := &live{c: newCluster(t, ctx, bin), flows: e2e.NewFlows(), before: map[int]map[string]e2e.Counter{}}
	n1, n2 := u.c.nodes[0], u.c.nodes[1]
	u.a, u.b, u.x = u.c.pod(t, ctx, n1, "a"), u.c.pod(t, ctx, n1, "b"), u.c.pod(t, ctx, n1, "x")
	u.pc = u.c.pod(t, ctx, n2, "c")
	u.flows.UDP(t, "a->c", u.a, u.pc, 7001)
	u.flows.UDP(t, "a->b", u.a, u.b, 7002)
	u.flows.TCP(t, "b->c", u.b, u.pc, 7003)
	u.flows.WaitProgress(t, ctx, 100)
	for _, n := range u.c.nodes {
		u.before[n.Index] = e2e.Stats(t, ctx, n)
	}
	return u
}

// verify checks the upgraded cluster while the traffic still runs: a new
// pod's ADD, an old pod's DEL, counters kept, status healthy.
func (u *live) verify(t *testing.T, ctx context.Context) {
	t.Helper()
	n1 := u.c.nodes[0]
	d := u.c.pod(t, ctx, n1, "d")
	e2e.Ping(t, ctx, d, u.pc.IP.String())
	e2e.Ping(t, ctx, u.pc, d.IP.String())
	if err := u.x.Del(ctx); err != nil {
		t.Errorf("DEL of a pod added before the upgrade: %v", err)
	}
	if eps := e2e.Endpoints(t, ctx, n1); len(eps) != 3 {
		t.Errorf("node 1 has endpoints %v after adding d and deleting x, want a, b and d", eps)
	}
	u.flows.WaitProgress(t, ctx, 100)
	for _, n := range u.c.nodes {
		after := e2e.Stats(t, ctx, n)
		for name, b := range u.before[n.Index] {
			if a := after[name]; a.Packets < b.Packets || a.Bytes < b.Bytes {
				t.Errorf("node %d: counter %s went from %d packets to %d: not kept", n.Index, name, b.Packets, a.Packets)
			}
		}
	}
	u.c.requireHealthy(t, ctx)
}

// progList is `patchcord bpf prog list` on n by program and interface.
func progList(t *testing.T, ctx context.Context, n *lab.Node) map[string]views.Prog {
	t.Helper()
	var list []views.Prog
	out, err := n.CLI(ctx, "bpf", "prog", "list", "-o", "json")
	if err == nil {
		err = json.Unmarshal(out, &list)
	}
	if err != nil {
		t.Fatalf("prog list on %s: %v", n.NetNS, err)
	}
	m := make(map[string]views.Prog)
	for _, p := range list {
		m[p.Program+"@"+p.Ifname] = p
	}
	return m
}

// refuseRelease runs the release's agent and CNI ADD on the upgraded node 1:
// both must fail, saying why, and leave every pin under the root as it was.
func refuseRelease(t *testing.T, ctx context.Context, u *live, old string) {
	t.Helper()
	n1 := u.c.nodes[0]
	pins := pinSnapshot(t, n1.BpffsRoot)
	install(t, old, u.c.bin)
	defer install(t, e2e.BinDir(), u.c.bin)
	// The agent running on the node serves metrics on the default port.
	args := e2e.AgentArgs(n1, u.c.files[n1.Index], "--metrics-addr", "")
	_, err := e2e.Launch(ctx, n1, "release agent", filepath.Join(u.c.lab.Dir, "release.ready"), 20*time.Second, args...)
	if err == nil || !strings.Contains(err.Error(), "incompatible patchcord version") {
		t.Errorf("release agent on the upgraded node: %v, want it to exit on incompatible maps", err)
	}
	t.Logf("the release's agent on the upgraded node: %v", err)
	_, err = n1.AddPod(ctx, "r", "patchcord")
	if err == nil || !strings.Contains(err.Error(), "incompatible patchcord version") {
		t.Errorf("release CNI ADD on the upgraded node: %v, want it to fail on incompatible maps", err)
	}
	t.Logf("the release's CNI ADD on the upgraded node: %v", err)
	if now := pinSnapshot(t, n1.BpffsRoot); !equalSnapshots(pins, now) {
		t.Errorf("the release's agent and ADD changed the pins:\nbefore %v\nafter  %v", pins, now)
	}
}

// pinSnapshot is every pin under root with its inode: a binary that
// pinned, replaced or removed anything there changes it.
func pinSnapshot(t *testing.T, root string) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		out[rel] = info.Sys().(*syscall.Stat_t).Ino
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func equalSnapshots(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
