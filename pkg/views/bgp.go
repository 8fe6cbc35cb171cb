package views

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/patchcord/patchcord/pkg/bgp"
)

// BGPNeighbor is one of the agent's BGP sessions, as its metrics report it.
type BGPNeighbor struct {
	Neighbor    string `json:"neighbor"`
	ASN         string `json:"asn"`
	Established bool   `json:"established"`
	Routes      int    `json:"routes"`
}

// CollectBGP reads the agent's BGP sessions from its metrics at addr
// (host:port); they live in the agent's memory, not in the maps. An agent
// unreachable there (metrics elsewhere or off, no agent) or without BGP
// adds nothing; a session that is not established is a warning: the node
// keeps the routes it has, and learns no new ones.
func (v *Status) CollectBGP(ctx context.Context, addr string) {
	if addr == "" || !v.AgentRunning {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		v.warn("agent metrics at %s: %v", addr, err)
		return
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		v.warn("agent metrics at %s: %s", addr, resp.Status)
		return
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		v.warn("agent metrics at %s: %v", addr, err)
		return
	}
	v.BGP = bgpNeighbors(fams)
	for _, n := range v.BGP {
		if !n.Established {
			v.warn("bgp neighbour %s (AS %s) is not established: routes learned from it are kept, new ones wait", n.Neighbor, n.ASN)
		}
	}
}

func bgpNeighbors(fams map[string]*dto.MetricFamily) []BGPNeighbor {
	byKey := map[string]*BGPNeighbor{}
	each := func(name string, fn func(*BGPNeighbor, float64)) {
		f, ok := fams[name]
		if !ok {
			return
		}
		for _, m := range f.GetMetric() {
			var n BGPNeighbor
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case bgp.LabelNeighbor:
					n.Neighbor = l.GetValue()
				case bgp.LabelASN:
					n.ASN = l.GetValue()
				}
			}
			key := n.Neighbor + "," + n.ASN
			if byKey[key] == nil {
				byKey[key] = &n
			}
			fn(byKey[key], m.GetGauge().GetValue())
		}
	}
	each(bgp.MetricEstablished, func(n *BGPNeighbor, v float64) { n.Established = v == 1 })
	each(bgp.MetricRoutes, func(n *BGPNeighbor, v float64) { n.Routes = int(v) })
	var out []BGPNeighbor
	for _, n := range byKey {
		out = append(out, *n)
	}
	slices.SortFunc(out, func(a, b BGPNeighbor) int { return strings.Compare(a.Neighbor, b.Neighbor) })
	return out
}

// String is the neighbour as status prints it.
func (n BGPNeighbor) String() string {
	state := "established"
	if !n.Established {
		state = "NOT established"
	}
	return fmt.Sprintf("%s AS %s: %s, %d routes", n.Neighbor, n.ASN, state, n.Routes)
}
