// Agent sync time with 5,000 nodes in the nodes file: from a cold start on
// a fresh node, from a restart with everything in place, and after one
// entry of the file changes.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/patchcord/patchcord/pkg/views"
)

// AgentResult is the agent's part of the JSON.
type AgentResult struct {
	NodesInFile int  `json:"nodesInFile"`
	Masquerade  bool `json:"masquerade"`
	// ColdStartMs runs from starting the agent on a node with nothing
	// pinned to its ready file: datapath loaded and attached, every remote
	// node in the maps, routed and neighboured, masquerade chain written.
	ColdStartMs float64 `json:"coldStartMs"`
	// RestartMs is the same for an agent restarted with all of that in place.
	RestartMs []float64 `json:"restartMs"`
	// ChangeMs runs from replacing the nodes file (one node's IP changed) to
	// the node map holding the new IP; ChangeSyncedMs to the agent logging
	// the end of that sync. The agent polls the file every 250 ms.
	// ChangeAppliedMs is the sync itself as the agent timed it (took_ms):
	// from the new node set to every map, route and set written.
	ChangeMs        []float64 `json:"changeMs"`
	ChangeSyncedMs  []float64 `json:"changeSyncedMs"`
	ChangeAppliedMs []float64 `json:"changeAppliedMs"`
	// NodeListMs is how long `patchcord bpf node list -o json` took,
	// NodeListEntries how many nodes it printed.
	NodeListMs      float64 `json:"nodeListMs"`
	NodeListEntries int     `json:"nodeListEntries"`
}

// measureAgentSync runs the agent on its own node with a nodes file of
// scaleNodes entries (the node itself and fake ones) and default flags.
func (b *builder) measureAgentSync(ctx context.Context, rounds int) (*AgentResult, error) {
	n, err := b.node(nodeAgentSync)
	if err != nil {
		return nil, err
	}
	file := filepath.Join(b.lab.Dir, "nodes-sync.json")
	entries := append([]nodes.Entry{e2e.EntryOf(n)}, fakeNodes(scaleNodes-1)...)
	if err := nodes.WriteFile(file, entries); err != nil {
		return nil, err
	}
	res := &AgentResult{NodesInFile: len(entries), Masquerade: true}
	agent, took, err := startAgent(ctx, n, file, "--log-level", "info")
	if err != nil {
		return nil, err
	}
	defer func() { agent.Stop() }()
	res.ColdStartMs = ms(took)

	dp, err := datapath.OpenPinned(n.BpffsRoot)
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	var last nodes.Entry
	for r := range rounds {
		// A fake node moves to an address no other node has.
		i := 1 + r*997%(scaleNodes-1)
		entries[i].NodeIP = fmt.Sprintf("198.18.250.%d", r+1)
		last = entries[i]
		changed, synced, err := changeAndWait(ctx, agent, dp, file, entries, last)
		if err != nil {
			return nil, err
		}
		applied, err := lastSyncTook(agent)
		if err != nil {
			return nil, err
		}
		res.ChangeMs = append(res.ChangeMs, ms(changed))
		res.ChangeSyncedMs = append(res.ChangeSyncedMs, ms(synced))
		res.ChangeAppliedMs = append(res.ChangeAppliedMs, applied)
	}
	if err := res.nodeList(ctx, n, last); err != nil {
		return nil, err
	}
	for range rounds {
		if err := agent.Stop(); err != nil {
			return nil, err
		}
		if agent, took, err = startAgent(ctx, n, file, "--log-level", "info"); err != nil {
			return nil, err
		}
		res.RestartMs = append(res.RestartMs, ms(took))
	}
	return res, nil
}

// changeAndWait writes entries and returns when the node map shows want's
// new IP, and when the agent has logged the end of the sync that put it
// there.
func changeAndWait(ctx context.Context, agent *lab.Process, dp *datapath.Datapath, file string, entries []nodes.Entry, want nodes.Entry) (changed, synced time.Duration, err error) {
	before, err := syncsLogged(agent)
	if err != nil {
		return 0, 0, err
	}
	cidr := netip.MustParsePrefix(want.PodCIDR)
	ip := netip.MustParseAddr(want.NodeIP)
	key := datapath.LPMKey{Prefixlen: uint32(cidr.Bits()), Addr: nativeU32(cidr.Addr())}
	start := time.Now()
	if err := nodes.WriteFile(file, entries); err != nil {
		return 0, 0, err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err = e2e.Poll(wctx, "node map to show "+want.PodCIDR+" at "+want.NodeIP, func() error {
		var v datapath.NodeInfo
		if err := dp.Maps.Nodes.Lookup(&key, &v); err != nil {
			return err
		}
		if v.NodeIp != nativeU32(ip) {
			return fmt.Errorf("still at %s", netip.AddrFrom4(nativeBytes(v.NodeIp)))
		}
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	changed = time.Since(start)
	err = e2e.Poll(wctx, "agent to log the sync", func() error {
		n, err := syncsLogged(agent)
		if err == nil && n <= before {
			err = fmt.Errorf("%d syncs logged", n)
		}
		return err
	})
	return changed, time.Since(start), err
}

// syncsLogged counts the agent's "nodes synced" log lines.
func syncsLogged(agent *lab.Process) (int, error) {
	out, err := agent.Output()
	if err != nil {
		return 0, err
	}
	return strings.Count(string(out), `msg="nodes synced"`), nil
}

// syncTook is the agent's log of a sync's duration.
var syncTook = regexp.MustCompile(`msg="nodes synced" .*took_ms=([0-9.]+)`)

// lastSyncTook is how long the agent's last node sync took, as it logged.
func lastSyncTook(agent *lab.Process) (float64, error) {
	out, err := agent.Output()
	if err != nil {
		return 0, err
	}
	m := syncTook.FindAllSubmatch(out, -1)
	if len(m) == 0 {
		return 0, fmt.Errorf("agent logged no node sync with took_ms")
	}
	return strconv.ParseFloat(string(m[len(m)-1][1]), 64)
}

// nodeList times the CLI listing every node and checks that it shows the
// last change.
func (res *AgentResult) nodeList(ctx context.Context, n *lab.Node, want nodes.Entry) error {
	start := time.Now()
	out, err := n.CLI(ctx, "bpf", "node", "list", "-o", "json")
	res.NodeListMs = ms(time.Since(start))
	if err != nil {
		return err
	}
	var list []views.Node
	if err := json.Unmarshal(out, &list); err != nil {
		return fmt.Errorf("parse bpf node list: %w", err)
	}
	res.NodeListEntries = len(list)
	for _, e := range list {
		if e.PodCIDR == want.PodCIDR && e.NodeIP == want.NodeIP {
			return nil
		}
	}
	return fmt.Errorf("bpf node list does not show %s at %s", want.PodCIDR, want.NodeIP)
}

// nativeU32 is an IPv4 address as the maps hold it: the wire's bytes read
// in host order.
func nativeU32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func nativeBytes(v uint32) [4]byte {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return b
}
