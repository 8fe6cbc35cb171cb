package bgp

import (
	"context"
	"net/netip"
	"time"

	"github.com/patchcord/patchcord/pkg/nodes"
)

// refreshEvery rereads GoBGP's tables even when no event came: the
// convergence deadline passes, and a session's state changes without a
// route event.
const refreshEvery = time.Second

// Source merges what the speaker learns into inner's node sets:
//   - a node inner names keeps its entry; when BGP learned its pod CIDR,
//     that route's next hop is where native routing sends it (Via): the
//     node may be beyond the uplink's subnet;
//   - a learned prefix no node of inner has becomes a native node of its
//     own, named "bgp:<prefix>", reached via the route's next hop.
//
// Nothing is sent before inner's first set and the speaker's convergence.
func (s *Speaker) Source(inner nodes.Source) nodes.Source { return &source{s: s, inner: inner} }

type source struct {
	s     *Speaker
	inner nodes.Source
}

func (src *source) Run(ctx context.Context, updates chan<- []nodes.Node) error {
	s := src.s
	innerSets := make(chan []nodes.Node)
	innerErr := make(chan error, 1)
	go func() { innerErr <- src.inner.Run(ctx, innerSets) }()

	tick := time.NewTicker(refreshEvery)
	defer tick.Stop()
	var (
		set      []nodes.Node // inner's last
		haveSet  bool
		routes   []Route
		sent     []nodes.Node
		sentOnce bool
		waitLog  = time.Now()
	)
	for {
		select {
		case set = <-innerSets:
			haveSet = true
		case <-s.changed:
		case <-tick.C:
		case err := <-innerErr:
			return err
		case <-ctx.Done():
			return nil
		}
		if err := s.refresh(ctx); err != nil {
			s.log.Error("read bgp state", "err", err)
			continue
		}
		if !haveSet {
			continue
		}
		if !sentOnce && !s.converged() {
			if time.Since(waitLog) >= 5*time.Second {
				s.log.Info("waiting for every bgp neighbour's End-of-RIB before the first node sync", "peers", s.Peers())
				waitLog = time.Now()
			}
			continue
		}
		routes = s.Routes()
		merged := Merge(set, routes)
		if sentOnce && sameSet(merged, sent) {
			continue
		}
		select {
		case updates <- merged:
			sent, sentOnce = merged, true
		case <-ctx.Done():
			return nil
		}
	}
}

// Merge is set with routes merged in, as Source describes.
func Merge(set []nodes.Node, routes []Route) []nodes.Node {
	byPrefix := make(map[netip.Prefix]Route, len(routes))
	for _, r := range routes {
		byPrefix[r.Prefix] = r
	}
	out := make([]nodes.Node, 0, len(set)+len(routes))
	named := make(map[netip.Prefix]bool, len(set))
	for _, n := range set {
		if r, ok := byPrefix[n.PodCIDR.Masked()]; ok {
			n.Via = r.NextHop
		}
		named[n.PodCIDR.Masked()] = true
		out = append(out, n)
	}
	for _, r := range routes {
		if named[r.Prefix] {
			continue
		}
		out = append(out, nodes.Node{
			Name:    "bgp:" + r.Prefix.String(),
			NodeIP:  r.NextHop,
			PodCIDR: r.Prefix,
			Routing: nodes.Native,
			Via:     r.NextHop,
		})
	}
	return out
}

func sameSet(a, b []nodes.Node) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Name != b[i].Name || a[i].NodeIP != b[i].NodeIP || a[i].PodCIDR != b[i].PodCIDR ||
			a[i].Routing != b[i].Routing || a[i].Via != b[i].Via || a[i].VtepMAC.String() != b[i].VtepMAC.String() {
			return false
		}
	}
	return true
}
