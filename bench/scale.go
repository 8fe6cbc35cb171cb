// Maps at the scale: fake endpoints registered straight into a
// node's pinned maps, and the check that the datapath still forwards once
// they are there.
package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// ScaleCheck records what the loaded patchcord nodes held and that real
// pods still reached each other through them.
type ScaleCheck struct {
	Endpoints map[string]int `json:"endpointsByNode"`
	Nodes     map[string]int `json:"remoteNodesByNode"`
	// AgentReadyMs is how long each loaded node's agent took from start to
	// its first sync of the nodes file (5,000 entries, routes included).
	AgentReadyMs map[string]float64 `json:"agentReadyMs"`
	Pings        []string           `json:"pings"`
}

// fakeEndpoint is the i-th endpoint that has no pod: its address lies
// outside the lab's pod CIDRs and its ifindex beyond any real link's, so it
// never shadows a real pod in either endpoint map.
func fakeEndpoint(i int) bpfmaps.EndpointInfo {
	hi, lo := byte(i>>8), byte(i)
	return bpfmaps.EndpointInfo{
		IP:        netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)}),
		Ifindex:   100000 + i,
		MAC:       net.HardwareAddr{0x02, 0xfe, 0, 0, hi, lo},
		HostMAC:   net.HardwareAddr{0x02, 0xfd, 0, 0, hi, lo},
		Container: fmt.Sprintf("bench-fake-%d", i),
		PodIfname: "eth0",
	}
}

// fillEndpoints registers fake endpoints in the datapath pinned under root
// until it holds total, and returns how many it added. It runs in the bench
// process: the node's bpffs is mounted in the root mount namespace.
func fillEndpoints(root string, total int) (int, error) {
	dp, err := datapath.OpenPinned(root)
	if err != nil {
		return 0, err
	}
	defer dp.Close()
	return fillOpen(&dp.Maps, total)
}

func fillOpen(m *datapath.Maps, total int) (int, error) {
	eps := bpfmaps.NewEndpoints(m)
	list, err := eps.List()
	if err != nil {
		return 0, err
	}
	added := 0
	for i := 0; len(list)+added < total; i++ {
		if err := eps.Put(fakeEndpoint(i)); err != nil {
			return added, fmt.Errorf("fill endpoints: %w", err)
		}
		added++
	}
	return added, nil
}

// fillNodes adds fake remote nodes until the node map holds total.
func fillNodes(m *datapath.Maps, total int) error {
	nodes := bpfmaps.NewNodes(m)
	list, err := nodes.List()
	if err != nil {
		return err
	}
	for i := 0; len(list)+i < total; i++ {
		e := fakeNode(i)
		n := bpfmaps.Node{PodCIDR: netip.MustParsePrefix(e.PodCIDR), NodeIP: netip.MustParseAddr(e.NodeIP)}
		if err := nodes.Put(n); err != nil {
			return fmt.Errorf("fill nodes: %w", err)
		}
	}
	return nil
}

// checkScale counts what the loaded nodes hold and pings across them, same
// node and cross node: a datapath that stopped forwarding at this scale
// fails the run here rather than showing as a slow figure.
func checkScale(ctx context.Context, p *pcPair) (*ScaleCheck, error) {
	sc := &ScaleCheck{
		Endpoints:    map[string]int{},
		Nodes:        map[string]int{},
		AgentReadyMs: map[string]float64{p.a.NetNS: ms(p.syncA), p.b.NetNS: ms(p.syncB)},
	}
	for _, n := range []*lab.Node{p.a, p.b} {
		eps, nodes, err := countMaps(n.BpffsRoot)
		if err != nil {
			return nil, err
		}
		sc.Endpoints[n.NetNS], sc.Nodes[n.NetNS] = eps, nodes
	}
	for _, dst := range []netip.Addr{p.local.IP, p.remote.IP} {
		out, err := p.client.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", dst.String())
		if err != nil {
			return nil, fmt.Errorf("ping %s with loaded maps: %w", dst, err)
		}
		sc.Pings = append(sc.Pings, lastLines(string(out), 2))
	}
	return sc, nil
}

// countMaps returns how many endpoints and remote nodes the datapath pinned
// under root holds.
func countMaps(root string) (endpoints, nodes int, err error) {
	dp, err := datapath.OpenPinned(root)
	if err != nil {
		return 0, 0, err
	}
	defer dp.Close()
	eps, err := bpfmaps.NewEndpoints(&dp.Maps).List()
	if err != nil {
		return 0, 0, err
	}
	ns, err := bpfmaps.NewNodes(&dp.Maps).List()
	if err != nil {
		return 0, 0, err
	}
	return len(eps), len(ns), nil
}
