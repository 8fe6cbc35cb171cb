// Nodes files for labs, in pkg/nodes' own format.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// EntryOf is n's entry in a nodes file.
func EntryOf(n *lab.Node) nodes.Entry {
	return nodes.Entry{Name: n.NetNS, NodeIP: n.IP.String(), PodCIDR: n.PodCIDR.String()}
}

// WriteNodes writes a nodes file atomically (as config management does), so
// an agent never reads half of it.
func WriteNodes(t *testing.T, path string, entries ...nodes.Entry) {
	t.Helper()
	if err := nodes.WriteFile(path, entries); err != nil {
		t.Fatal(err)
	}
}

// AddNodes adds lab nodes concurrently, in the order given.
func AddNodes(t *testing.T, l *lab.Lab, idx ...int) []*lab.Node {
	t.Helper()
	nodes := make([]*lab.Node, len(idx))
	InParallel(t, len(idx), func(i int) (err error) {
		nodes[i], err = l.AddNode(idx[i])
		return err
	})
	return nodes
}

// NodeListEntry is one node of `patchcord bpf node list -o json`, the
// fields tests read.
type NodeListEntry struct {
	PodCIDR string `json:"podCIDR"`
	NodeIP  string `json:"nodeIP"`
	Routing string `json:"routing"`
}

// NodeList runs `patchcord bpf node list -o json` on n.
func NodeList(ctx context.Context, n *lab.Node) ([]NodeListEntry, error) {
	out, err := n.CLI(ctx, "bpf", "node", "list", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []NodeListEntry
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("%w: %s", err, out)
	}
	return list, nil
}

// WaitNodeList polls `patchcord bpf node list` on n until want holds for what it lists
// (pod CIDR -> node IP).
func WaitNodeList(t *testing.T, ctx context.Context, n *lab.Node, what string, want func(map[string]string) bool) {
	t.Helper()
	waitNodes(t, ctx, n, what, func(e NodeListEntry) string { return e.NodeIP }, want)
}

// WaitNodeRouting polls until n's node list shows cidr with routing.
func WaitNodeRouting(t *testing.T, ctx context.Context, n *lab.Node, cidr netip.Prefix, routing string) {
	t.Helper()
	waitNodes(t, ctx, n, fmt.Sprintf("%s routed %s", cidr, routing), func(e NodeListEntry) string { return e.Routing },
		func(m map[string]string) bool { return m[cidr.String()] == routing })
}

// waitNodes polls the node list until want holds for pod CIDR -> field(e).
func waitNodes(t *testing.T, ctx context.Context, n *lab.Node, what string, field func(NodeListEntry) string, want func(map[string]string) bool) {
	t.Helper()
	// The agent follows its nodes file "within a second"; a few are allowed.
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := lab.WaitFor(wctx, what, func(ctx context.Context) error {
		list, err := NodeList(ctx, n)
		if err != nil {
			return err
		}
		m := map[string]string{}
		for _, e := range list {
			m[e.PodCIDR] = field(e)
		}
		if !want(m) {
			return fmt.Errorf("node list: %+v", list)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// AddPod adds a pod named name to n through the conflist network.
func AddPod(t *testing.T, ctx context.Context, n *lab.Node, name, network string) *lab.Pod {
	t.Helper()
	p, err := n.AddPod(ctx, name, network)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// WriteConflist writes the conflist network on n.
func WriteConflist(t *testing.T, n *lab.Node, network string, conf []byte) {
	t.Helper()
	if err := n.WriteConflist(network, conf); err != nil {
		t.Fatal(err)
	}
}

// InParallel runs f for every index below n at once and fails t with all
// their errors.
func InParallel(t *testing.T, n int, f func(i int) error) {
	t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = f(i) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}
