// CNI ADD and DEL latency: cnitool runs, one at a time, as a container
// runtime would run them, timed from the bench process, for patchcord in
// primary mode and for the reference bridge plugin with host-local.
package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// CNIResults is the CNI group's part of the JSON.
type CNIResults struct {
	GroupResults[CNISample, CNISummary]
	Pods int `json:"podsPerRound"`
}

// CNISample is one cnitool invocation.
type CNISample struct {
	Plugin string `json:"plugin"` // one of cniPlugins
	Verb   string `json:"verb"`   // ADD or DEL
	Round  int    `json:"round"`
	// Seq is the pod's place in its round: ADDs and DELs run one after
	// another, so a late Seq runs on a node with more pods.
	Seq int     `json:"seq"`
	Ms  float64 `json:"ms"`
}

// CNISummary is one plugin's verb over every round, in milliseconds.
type CNISummary struct {
	Plugin string  `json:"plugin"`
	Verb   string  `json:"verb"`
	N      int     `json:"n"`
	P50    float64 `json:"p50Ms"`
	P99    float64 `json:"p99Ms"`
	Max    float64 `json:"maxMs"`
}

const cniMethod = "wall time of `nsenter --net=<node> env CNI_PATH=... cnitool add|del <network> <netns>` run by the bench process, pods added one after another, then deleted one after another; the first ADD of each pod namespace (which for patchcord loads the datapath on the node) is not timed"

const (
	pluginPatchcord   = "patchcord (primary) + host-local"
	pluginPatchcordTC = "patchcord (primary, attachMode tc) + host-local"
	pluginBridge      = "bridge + host-local"
)

// cniPlugins are the CNI group's subjects in the order they run and report.
var cniPlugins = []string{pluginPatchcord, pluginPatchcordTC, pluginBridge}

// cniSubject is a node with a network whose ADD and DEL are timed, and the
// pod namespaces they run on.
type cniSubject struct {
	plugin, network string
	node            *lab.Node
	pods            []*lab.Pod
}

// cniSubjects builds one node per plugin and n pod namespaces on each. The
// lab can only make a pod namespace by adding the pod, so each is added
// once and deleted again, untimed: the timed rounds start from a clean node
// with a warm datapath, as a node that has run pods before.
func (b *builder) cniSubjects(ctx context.Context, n int) ([]*cniSubject, error) {
	pc, br, err := b.pair(nodeCNIPatchcord, nodeCNIBridge)
	if err != nil {
		return nil, err
	}
	// The same plugin with the tc backend: a tcx attach, and the veth's
	// deletion with a tcx program on it, each wait out an RCU grace
	// period; tc's clsact does not.
	tc, err := b.node(nodeCNIPatchcordTC)
	if err != nil {
		return nil, err
	}
	for _, node := range []struct {
		n    *lab.Node
		mode datapath.AttachMode
	}{{pc, datapath.AttachAuto}, {tc, datapath.AttachTC}} {
		conf, err := lab.WithAttachMode(node.n.PrimaryConflist(), string(node.mode))
		if err != nil {
			return nil, err
		}
		if err := node.n.WriteConflist("patchcord", conf); err != nil {
			return nil, err
		}
		// A node runs its agent; the plugin does not need it, but reads
		// the pod MTU from the config the agent writes.
		file := filepath.Join(b.lab.Dir, fmt.Sprintf("nodes-cni-%d.json", node.n.Index))
		if err := nodes.WriteFile(file, []nodes.Entry{e2e.EntryOf(node.n)}); err != nil {
			return nil, err
		}
		agent, _, err := startAgent(ctx, node.n, file, "--masquerade=false", "--attach-mode", string(node.mode))
		if err != nil {
			return nil, err
		}
		b.agents = append(b.agents, agent)
	}
	if err := br.WriteConflist("bridge", e2e.BridgeConflist(br, "bridge", podMTU)); err != nil {
		return nil, err
	}
	subjects := []*cniSubject{
		{plugin: pluginPatchcord, network: "patchcord", node: pc},
		{plugin: pluginPatchcordTC, network: "patchcord", node: tc},
		{plugin: pluginBridge, network: "bridge", node: br},
	}
	for _, s := range subjects {
		for i := range n {
			p, err := s.node.AddPod(ctx, fmt.Sprintf("cni%d", i), s.network)
			if err != nil {
				return nil, err
			}
			s.pods = append(s.pods, p)
		}
		for _, p := range s.pods {
			if _, err := b.tools.cnitoolRun(ctx, s.node, "del", s.network, p.NSPath); err != nil {
				return nil, err
			}
		}
	}
	return subjects, nil
}

// cniRound times an ADD of every pod for each plugin in turn, then a DEL of
// every pod for each plugin in turn.
func (t tools) cniRound(ctx context.Context, subjects []*cniSubject, round int) ([]CNISample, error) {
	var out []CNISample
	for _, verb := range []string{"add", "del"} {
		for _, s := range subjects {
			for i, p := range s.pods {
				took, err := t.cnitoolRun(ctx, s.node, verb, s.network, p.NSPath)
				if err != nil {
					return nil, err
				}
				out = append(out, CNISample{Plugin: s.plugin, Verb: strings.ToUpper(verb), Round: round, Seq: i, Ms: ms(took)})
			}
		}
	}
	return out, nil
}

// cnitoolRun runs cnitool in the node's namespace as the lab does (the
// patchcord binaries first on CNI_PATH), and returns how long it took.
func (t tools) cnitoolRun(ctx context.Context, n *lab.Node, verb, network, nsPath string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	args := []string{"-u", "CNI_ARGS", "-u", "CAP_ARGS",
		"CNI_PATH=" + t.cniPath(), "NETCONFPATH=" + n.ConfDir, "CNI_IFNAME=eth0",
		t.cnitool, verb, network, nsPath}
	start := time.Now()
	_, err := n.Exec(ctx, "env", args...)
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("cnitool %s %s on node %d: %w", verb, network, n.Index, err)
	}
	return took, nil
}

func summarizeCNI(samples []CNISample) []CNISummary {
	var out []CNISummary
	for _, plugin := range cniPlugins {
		for _, verb := range []string{"ADD", "DEL"} {
			var v []float64
			for _, s := range samples {
				if s.Plugin == plugin && s.Verb == verb {
					v = append(v, s.Ms)
				}
			}
			if len(v) == 0 {
				continue
			}
			out = append(out, CNISummary{Plugin: plugin, Verb: verb, N: len(v),
				P50: percentile(v, 50), P99: percentile(v, 99), Max: percentile(v, 100)})
		}
	}
	return out
}
