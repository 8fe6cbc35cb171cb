// A mesh of patchcord lab nodes, each with its own nodes file (so that a
// test can make one node forget another), its agent and its pods: the
// cross-node tests and the hostile-pod suite share it.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// Mesh is a lab of patchcord nodes (a full mesh) with their nodes files, agents and pods.
type Mesh struct {
	Lab    *lab.Lab
	Nodes  []*lab.Node          // patchcord nodes, by position
	Files  map[int]string       // nodes file per node index
	Agents map[int]*lab.Process // by node index
	Pods   map[int][]*lab.Pod   // by node index
}

// NewMesh adds patchcord nodes with the given indexes (in parallel) and
// writes the primary conflist on each. Agents and pods come with StartAgents
// and AddPods.
func NewMesh(t *testing.T, idx ...int) *Mesh {
	t.Helper()
	c := &Mesh{Lab: NewLab(t), Files: map[int]string{}, Agents: map[int]*lab.Process{}, Pods: map[int][]*lab.Pod{}}
	c.Nodes = AddNodes(t, c.Lab, idx...)
	for _, n := range c.Nodes {
		if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
			t.Fatal(err)
		}
		c.Files[n.Index] = filepath.Join(c.Lab.Dir, fmt.Sprintf("nodes-n%d.json", n.Index))
	}
	return c
}

// Entries lists every patchcord node of the cluster, then extra.
func (c *Mesh) Entries(extra ...nodes.Entry) []nodes.Entry {
	var es []nodes.Entry
	for _, n := range c.Nodes {
		es = append(es, EntryOf(n))
	}
	return append(es, extra...)
}

// StartAgents writes each node's nodes file (all patchcord nodes plus extra)
// and starts its agent with args.
func (c *Mesh) StartAgents(t *testing.T, ctx context.Context, extra []nodes.Entry, args ...string) {
	t.Helper()
	for _, n := range c.Nodes {
		WriteNodes(t, c.Files[n.Index], c.Entries(extra...)...)
		c.Agents[n.Index] = StartAgent(t, ctx, n, c.Files[n.Index], args...)
		AssertUplinkBackend(t, ctx, n)
	}
}

// AddPods adds pods named a, b, ... to every node, all concurrently.
func (c *Mesh) AddPods(t *testing.T, ctx context.Context, perNode int) {
	t.Helper()
	type slot struct {
		node *lab.Node
		i    int
	}
	var slots []slot
	for _, n := range c.Nodes {
		c.Pods[n.Index] = make([]*lab.Pod, perNode)
		for i := range perNode {
			slots = append(slots, slot{n, i})
		}
	}
	errs := make([]error, len(slots))
	var wg sync.WaitGroup
	for k, s := range slots {
		// Each goroutine writes its own slot; the map is only read.
		pods := c.Pods[s.node.Index]
		wg.Go(func() { pods[s.i], errs[k] = s.node.AddPod(ctx, string(rune('a'+s.i)), "patchcord") })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

// Pod returns pod i (0 = "a") of node index n.
func (c *Mesh) Pod(n, i int) *lab.Pod { return c.Pods[n][i] }
