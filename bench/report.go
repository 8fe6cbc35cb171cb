// Summaries, the targets, and the Markdown report on stdout.
package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// valuesByRound returns one datapath's values of a figure, by round.
func valuesByRound(samples []Sample, group, name, fig string) map[int]float64 {
	v := map[int]float64{}
	for _, s := range samples {
		if s.Group == group && s.Datapath == name && s.Figure == fig {
			v[s.Round] = s.Value
		}
	}
	return v
}

// references are the datapaths of a group the others are compared with,
// the first being the main one: the floor for same-node, the host-gw
// ceiling then Flannel for cross-node.
func references(subjects []*subject, group string) []*subject {
	var refs []*subject
	for _, role := range []string{roleFloor, roleCeiling, roleFlannel} {
		for _, s := range subjects {
			if s.Group == group && s.Role == role {
				refs = append(refs, s)
			}
		}
	}
	return refs
}

// summarize takes the median over rounds of every figure of every datapath,
// and the median of its per-round ratios to each reference: a ratio to a
// reference measured in the same round cancels the drift between rounds.
func summarize(subjects []*subject, samples []Sample) []Summary {
	var out []Summary
	for _, s := range subjects {
		for _, f := range figures {
			vals := valuesByRound(samples, s.Group, s.Name, f.ID)
			if len(vals) == 0 {
				continue
			}
			all := make([]float64, 0, len(vals))
			for _, v := range vals {
				all = append(all, v)
			}
			sum := Summary{Group: s.Group, Datapath: s.Name, Figure: f.ID, Unit: f.Unit, N: len(all),
				Median: median(all), Min: percentile(all, 0), Max: percentile(all, 100), Ratios: map[string]float64{}}
			for _, ref := range references(subjects, s.Group) {
				if ref == s {
					continue
				}
				refVals := valuesByRound(samples, ref.Group, ref.Name, f.ID)
				var ratios []float64
				for round, v := range vals {
					if rv, ok := refVals[round]; ok && rv != 0 {
						ratios = append(ratios, v/rv)
					}
				}
				if len(ratios) > 0 {
					sum.Ratios[ref.Name] = median(ratios)
				}
			}
			out = append(out, sum)
		}
	}
	return out
}

func findSummary(sums []Summary, group, name, fig string) (Summary, bool) {
	for _, s := range sums {
		if s.Group == group && s.Datapath == name && s.Figure == fig {
			return s, true
		}
	}
	return Summary{}, false
}

// evaluate checks the targets (not asserted: a miss is reported,
// not failed).
func evaluate(subjects []*subject, r *Results) []Target {
	var out []Target
	ratioTarget := func(group, name, fig string, ref *subject, want float64, atLeast bool, goal string) {
		s, ok := findSummary(r.Summaries, group, name, fig)
		if !ok || ref == nil {
			return
		}
		v, ok := s.Ratios[ref.Name]
		if !ok {
			return
		}
		t := Target{Goal: goal, Datapath: name, Value: v}
		if atLeast {
			t.Want, t.Met = fmt.Sprintf(">= %.2f× %s", want, ref.Name), v >= want
		} else {
			t.Want, t.Met = fmt.Sprintf("<= %.2f× %s", want, ref.Name), v <= want
		}
		out = append(out, t)
	}
	byRole := func(group, role string) *subject {
		for _, s := range references(subjects, group) {
			if s.Role == role {
				return s
			}
		}
		return nil
	}
	floor, ceiling, flannel := byRole(groupSame, roleFloor), byRole(groupCross, roleCeiling), byRole(groupCross, roleFlannel)
	for _, name := range []string{"patchcord", loadedName} {
		ratioTarget(groupSame, name, "tcp1", floor, 0.97, true, "same-node TCP throughput, 1 stream")
		ratioTarget(groupSame, name, "tcp4", floor, 0.97, true, "same-node TCP throughput, 4 streams")
		ratioTarget(groupSame, name, "rtt_p50", floor, 1.05, false, "same-node RTT p50")
	}
	for _, name := range []string{"patchcord", loadedName} {
		ratioTarget(groupCross, name, "tcp1", ceiling, 1, true, "cross-node TCP throughput, 1 stream")
		ratioTarget(groupCross, name, "tcp4", ceiling, 1, true, "cross-node TCP throughput, 4 streams")
		ratioTarget(groupCross, name, "tcp1", flannel, 1.2, true, "cross-node TCP throughput, 1 stream")
		ratioTarget(groupCross, name, "tcp4", flannel, 1.2, true, "cross-node TCP throughput, 4 streams")
		ratioTarget(groupCross, name, "rtt_p50", flannel, 1, false, "cross-node RTT p50")
	}
	// Native routing's peer is host-gw: the same routes, without the
	// host stack's forwarding in between.
	ratioTarget(groupCross, nativeName, "tcp1", ceiling, 1.05, true, "native routing TCP throughput, 1 stream")
	ratioTarget(groupCross, nativeName, "tcp4", ceiling, 1.05, true, "native routing TCP throughput, 4 streams")
	ratioTarget(groupCross, nativeName, "rtt_p50", ceiling, 0.95, false, "native routing RTT p50")
	out = append(out, bpfTargets(r.BPF)...)
	out = append(out, cniTargets(r.CNI)...)
	out = append(out, agentTargets(r.Agent)...)
	return out
}

// bpfBudgets are the per-packet budgets, steady state, by the
// prefix of a path's name; paths without one (drops, to host) have none.
var bpfBudgets = []struct {
	prefix string
	ns     float64
}{
	{"local redirect", 120},
	{"decap", 180},
	{"pass-through", 10},
}

// bpfTargets judges each path that has a budget and a steady figure, in
// each map state.
func bpfTargets(b *BPFResults) []Target {
	if b == nil {
		return nil
	}
	var out []Target
	for _, s := range b.Summary {
		if s.SteadyNs == nil {
			continue
		}
		for _, budget := range bpfBudgets {
			if !strings.HasPrefix(s.Path, budget.prefix) {
				continue
			}
			out = append(out, Target{Goal: "BPF cost per packet, steady state: " + s.Program + " " + s.Path,
				Datapath: "patchcord, " + s.Maps + " maps", Value: *s.SteadyNs,
				Want: fmt.Sprintf("<= %.0f ns", budget.ns), Met: *s.SteadyNs <= budget.ns})
		}
	}
	return out
}

// cniTargets judges patchcord's CNI ADD p99, with each attach backend,
// against bridge's.
func cniTargets(c *CNIResults) []Target {
	if c == nil {
		return nil
	}
	p99 := map[string]float64{}
	for _, s := range c.Summary {
		if s.Verb == "ADD" {
			p99[s.Plugin] = s.P99
		}
	}
	br := p99[pluginBridge]
	var out []Target
	for _, plugin := range []string{pluginPatchcord, pluginPatchcordTC} {
		pc, ok := p99[plugin]
		if !ok || br <= 0 {
			continue
		}
		v := pc / br
		out = append(out, Target{Goal: fmt.Sprintf("CNI ADD p99 (%.1f ms vs %.1f ms)", pc, br),
			Datapath: plugin, Value: v, Want: "<= 1.00× " + pluginBridge, Met: v <= 1})
	}
	return out
}

// agentTargets judges how long one changed node takes the agent to apply.
func agentTargets(a *AgentResult) []Target {
	if a == nil || len(a.ChangeAppliedMs) == 0 {
		return nil
	}
	v := median(a.ChangeAppliedMs)
	return []Target{{Goal: fmt.Sprintf("one node change among %d applied (median)", a.NodesInFile),
		Datapath: pluginPatchcord, Value: v, Want: "<= 50 ms", Met: v <= 50}}
}

// format prints a value in its unit's precision.
func format(v float64, unit string) string {
	switch unit {
	case "Gbit/s", "CPU-s/GB":
		return fmt.Sprintf("%.2f", v)
	case "µs", "ms":
		return fmt.Sprintf("%.1f", v)
	default: // kpps, ns
		return fmt.Sprintf("%.0f", v)
	}
}

func ratio(v float64) string { return fmt.Sprintf("%.2f×", v) }

var groupTitles = map[string]string{
	groupSame:     "Same-node pod → pod",
	groupCross:    "Cross-node pod → pod (two emulated nodes over a fabric bridge)",
	groupCrossNIC: "Cross-node pod → pod, NIC-like links (TSO/GSO off on send, GRO on receive)",
}

// render writes the whole report.
func render(w io.Writer, r *Results, subjects []*subject) {
	m := r.Machine
	fmt.Fprintf(w, "# patchcord bench\n\n")
	fmt.Fprintf(w, "- **Machine:** %s, %d CPUs; kernel %s; %s; %s; iperf3 %s; sockperf %s; patchcord %s\n",
		m.Model, m.CPUs, m.Kernel, m.Date, m.GoVersion, strings.TrimPrefix(m.Iperf3, "iperf "), m.Sockperf, m.Commit)
	fmt.Fprintf(w, "- **Method:** %d interleaved rounds (in each, every measurement runs on every datapath back to back), %d s per run; "+
		"medians over rounds, min–max shown; ratios are medians of per-round ratios to the reference measured in the same round.\n",
		r.Settings.Rounds, r.Settings.RunSeconds)
	if n := r.Settings.KubeProxyServices; n > 0 {
		fmt.Fprintf(w, "- **kube-proxy:** every cross-node node holds kube-proxy's iptables rules for %d services (conntrack and its chains on whatever the host stack forwards), as a Kubernetes node does.\n", n)
	}
	// The bench keeps both CPUs busy itself: only the load before it
	// started says whether other work shared the machine.
	fmt.Fprintf(w, "- **Load average** (1 min): %.2f at start, %.2f at end (the bench's own load included)", m.LoadStart, m.LoadEnd)
	if m.LoadStart > 0.5 {
		fmt.Fprintf(w, " — other work shared the machine: read ratios, not absolute figures")
	}
	fmt.Fprintf(w, ".\n- **Run time:** %s.\n", r.Elapsed)
	for _, g := range []string{groupSame, groupCross, groupCrossNIC} {
		renderGroup(w, r, subjects, g)
	}
	renderLinks(w, r, subjects)
	if r.Scale != nil {
		renderScale(w, r.Scale)
	}
	if r.BPF != nil {
		renderBPF(w, r.BPF)
	}
	if r.CNI != nil {
		renderCNI(w, r.CNI)
	}
	if r.Agent != nil {
		renderAgent(w, r.Agent)
	}
	if len(r.Targets) > 0 {
		renderTargets(w, r.Targets)
	}
}

func groupSubjects(subjects []*subject, group string) []*subject {
	var out []*subject
	for _, s := range subjects {
		if s.Group == group {
			out = append(out, s)
		}
	}
	return out
}

func renderGroup(w io.Writer, r *Results, subjects []*subject, group string) {
	members := groupSubjects(subjects, group)
	if len(members) == 0 {
		return
	}
	refs := references(subjects, group)
	var refNames []string
	for _, ref := range refs {
		refNames = append(refNames, ref.Name)
	}
	fmt.Fprintf(w, "\n## %s\n\n", groupTitles[group])
	fmt.Fprintf(w, "Cells: median (× %s). RTT is sockperf's full round trip (`--full-rtt`), 64-byte UDP messages; "+
		"UDP 64 B is iperf3's received rate with `-l 64 -b 0`; CPU is machine-wide busy time (/proc/stat) per GB received. "+
		"The first two patchcord rows differ only in what their maps hold: how far apart they are shows this run's noise.\n\n",
		strings.Join(refNames, " / × "))
	fmt.Fprintf(w, "| datapath |")
	for _, f := range figures {
		fmt.Fprintf(w, " %s (%s) |", f.Title, f.Unit)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", len(figures)))
	for _, s := range members {
		fmt.Fprintf(w, "| %s |", s.Name)
		for _, f := range figures {
			sum, ok := findSummary(r.Summaries, group, s.Name, f.ID)
			if !ok {
				fmt.Fprintf(w, " – |")
				continue
			}
			var rs []string
			for _, ref := range refs {
				if v, ok := sum.Ratios[ref.Name]; ok {
					rs = append(rs, ratio(v))
				} else {
					rs = append(rs, "ref")
				}
			}
			fmt.Fprintf(w, " %s (%s) |", format(sum.Median, f.Unit), strings.Join(rs, " / "))
		}
		fmt.Fprintln(w)
	}
	renderDetails(w, r, members, group, refNames)
	fmt.Fprintf(w, "\n</details>\n\nHow each is built:\n\n")
	for _, s := range members {
		fmt.Fprintf(w, "- **%s**: %s.\n", s.Name, s.Setup)
	}
}

// renderDetails is the folded table of a group: every figure's median,
// spread and ratio to each reference.
func renderDetails(w io.Writer, r *Results, members []*subject, group string, refNames []string) {
	fmt.Fprintf(w, "\n<details><summary>Per figure: median, min–max over rounds, ratios</summary>\n\n")
	fmt.Fprintf(w, "| figure | datapath | median | min–max |")
	for _, n := range refNames {
		fmt.Fprintf(w, " × %s |", n)
	}
	fmt.Fprintf(w, "\n|---|---|---:|---:|%s\n", strings.Repeat("---:|", len(refNames)))
	for _, f := range figures {
		for _, s := range members {
			sum, ok := findSummary(r.Summaries, group, s.Name, f.ID)
			if !ok {
				continue
			}
			fmt.Fprintf(w, "| %s (%s) | %s | %s | %s–%s |", f.Title, f.Unit, s.Name, format(sum.Median, f.Unit),
				format(sum.Min, f.Unit), format(sum.Max, f.Unit))
			for _, n := range refNames {
				if v, ok := sum.Ratios[n]; ok {
					fmt.Fprintf(w, " %s |", ratio(v))
				} else {
					fmt.Fprintf(w, " – |")
				}
			}
			fmt.Fprintln(w)
		}
	}
}

func renderScale(w io.Writer, sc *ScaleCheck) {
	fmt.Fprintf(w, "\n## Maps at scale\n\n")
	keys := make([]string, 0, len(sc.Endpoints))
	for k := range sc.Endpoints {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "- `%s`: %d endpoints, %d remote nodes in the maps; agent ready %.0f ms after start (nodes file of %d entries).\n",
			k, sc.Endpoints[k], sc.Nodes[k], sc.AgentReadyMs[k], scaleNodes+1)
	}
	for _, p := range sc.Pings {
		fmt.Fprintf(w, "- ping through the loaded datapath: %s\n", p)
	}
	fmt.Fprintf(w, "- Figures with these maps: the \"%s\" rows above.\n", loadedName)
}

func renderBPF(w io.Writer, b *BPFResults) {
	fmt.Fprintf(w, "\n## The datapath's own cost (BPF_PROG_RUN)\n\n%s\n\n", b.Method)
	fmt.Fprintf(w, "| program | path | verdict | steady ns/packet, minimal maps | steady ns/packet, %s | min–max (loaded) | cold ns, one packet per call (minimal / loaded) |\n", mapsLoaded)
	fmt.Fprintf(w, "|---|---|---|---:|---:|---:|---:|\n")
	defer fmt.Fprintf(w, "\nn/a: encap cannot run back to back on one skb; its cold figure bounds its steady cost from above.\n")
	find := func(state, prog, path string) (BPFSummary, bool) {
		for _, s := range b.Summary {
			if s.Maps == state && s.Program == prog && s.Path == path {
				return s, true
			}
		}
		return BPFSummary{}, false
	}
	for _, p := range bpfPaths() {
		lo, ok1 := find(mapsMinimal, p.Program, p.Path)
		hi, ok2 := find(mapsLoaded, p.Program, p.Path)
		if !ok1 || !ok2 {
			continue
		}
		steadyLo, steadyHi, spread := "n/a", "n/a", "–"
		if lo.SteadyNs != nil && hi.SteadyNs != nil {
			steadyLo, steadyHi = fmt.Sprintf("%.0f", *lo.SteadyNs), fmt.Sprintf("%.0f", *hi.SteadyNs)
			spread = fmt.Sprintf("%.0f–%.0f", hi.Min, hi.Max)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %.0f / %.0f |\n",
			p.Program, p.Path, lo.Verdict, steadyLo, steadyHi, spread, lo.ColdNs, hi.ColdNs)
	}
}

func renderCNI(w io.Writer, c *CNIResults) {
	fmt.Fprintf(w, "\n## CNI ADD and DEL latency\n\n%d pods per round; %s.\n\n", c.Pods, c.Method)
	fmt.Fprintf(w, "| plugin | verb | n | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---:|---:|---:|---:|\n")
	for _, s := range c.Summary {
		fmt.Fprintf(w, "| %s | %s | %d | %.1f | %.1f | %.1f |\n", s.Plugin, s.Verb, s.N, s.P50, s.P99, s.Max)
	}
}

func renderAgent(w io.Writer, a *AgentResult) {
	masq := "on"
	if !a.Masquerade {
		masq = "off"
	}
	fmt.Fprintf(w, "\n## Agent sync, %d nodes in the nodes file\n\nDefault flags (masquerade %s).\n\n", a.NodesInFile, masq)
	fmt.Fprintf(w, "| measurement | median (ms) | min–max (ms) | n |\n|---|---:|---:|---:|\n")
	row := func(what string, v []float64) {
		if len(v) == 0 {
			return
		}
		fmt.Fprintf(w, "| %s | %.0f | %.0f–%.0f | %d |\n", what, median(v), percentile(v, 0), percentile(v, 100), len(v))
	}
	row("cold start to ready (nothing pinned, no routes)", []float64{a.ColdStartMs})
	row("restart to ready (datapath, maps and routes in place)", a.RestartMs)
	row("one entry changed → node map updated (file polled every 250 ms)", a.ChangeMs)
	row("one entry changed → its sync logged", a.ChangeSyncedMs)
	row("one entry changed: the sync itself (agent's took_ms)", a.ChangeAppliedMs)
	row(fmt.Sprintf("`patchcord bpf node list -o json` (%d entries)", a.NodeListEntries), []float64{a.NodeListMs})
}

func renderTargets(w io.Writer, ts []Target) {
	fmt.Fprintf(w, "\n## Targets (not asserted)\n\n| goal | datapath | this run | target | met |\n|---|---|---:|---|---|\n")
	for _, t := range ts {
		met := "**missed**"
		if t.Met {
			met = "met"
		}
		v := ratio(t.Value)
		switch {
		case strings.HasSuffix(t.Want, " ns"):
			v = fmt.Sprintf("%.0f ns", t.Value)
		case strings.HasSuffix(t.Want, " ms"):
			v = fmt.Sprintf("%.1f ms", t.Value)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", t.Goal, t.Datapath, v, t.Want, met)
	}
}
