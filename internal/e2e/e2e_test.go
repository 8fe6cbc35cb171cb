// The kit's own check: a node with an agent and a pod comes up through it.
package e2e_test

import (
	"path/filepath"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// TestLabHarness checks the harness itself: a node with an agent and a
// pod comes up and the CLI answers.
func TestLabHarness(t *testing.T) {
	l := e2e.NewLab(t)
	ctx := e2e.Ctx(t)
	n := e2e.AddNodes(t, l, 1)[0]
	nodes := filepath.Join(l.Dir, "nodes.json")
	e2e.WriteNodes(t, nodes, e2e.EntryOf(n))
	e2e.StartAgent(t, ctx, n, nodes)
	e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
	p := e2e.AddPod(t, ctx, n, "p1", "patchcord")
	e2e.Ping(t, ctx, n, p.IP.String())
	if st := e2e.Stats(t, ctx, n); st["arp_reply"].Packets == 0 {
		t.Errorf("no ARP reply counted: %+v", st)
	}
}
