// `patchcord status`: the node's datapath on one screen, and an exit code
// that says whether it is broken, so that it can serve as a liveness probe.
package main

import (
	"errors"
	"fmt"
	"io"
	stdmaps "maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/maps"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// errUnhealthy is returned (exit code 1) after status has printed problems.
var errUnhealthy = errors.New("datapath unhealthy")

func newStatusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "One screen on the node's datapath; exits non-zero when it is broken",
		Long: `Show whether the datapath is loaded (and which programs: IDs, tags, load
times), the node config the agent wrote, attachment health, endpoint and node
counts, drop totals, whether tracing is on and whether the agent runs.

The exit code is 1 when something is broken, so that status can serve as a
liveness probe:
  - the datapath is not loaded, or a program is not pinned;
  - a pod's veth has no current from_pod (missing or stale);
  - the uplink the config names is gone, or lacks from_uplink or to_uplink;
  - the agent has configured the node but does not run now.
Warnings (a node never configured by an agent, leftover links of deleted
interfaces, tracing left on by a crashed monitor) do not fail it.

Run it in the node's network namespace: interfaces are looked up there.`,
		Example: `  patchcord status
  patchcord status -o json | jq .problems
  patchcord status >/dev/null || echo broken   # as a probe`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := collectStatus(g.root)
			if err := g.print(cmd.OutOrStdout(), v, func(w io.Writer) { formatStatus(w, v) }); err != nil {
				return err
			}
			if !v.Healthy {
				return fmt.Errorf("%w: %s", errUnhealthy, strings.Join(v.Problems, "; "))
			}
			return nil
		},
	}
}

// statusView is what `status -o json` prints; field names are stable.
type statusView struct {
	Root     string        `json:"root"`
	Loaded   bool          `json:"loaded"`
	Programs []programView `json:"programs"`
	// Config is absent when the datapath is not loaded.
	Config       *configView `json:"config,omitempty"`
	AgentRunning bool        `json:"agentRunning"`
	// Tracing is the datapath's trace flag; Monitoring whether a monitor
	// with traces runs. Tracing without Monitoring: a monitor crashed.
	Tracing      bool             `json:"tracing"`
	NATDetection natView          `json:"natDetection"`
	Monitoring   bool             `json:"monitoring"`
	Attachments  attachmentCounts `json:"attachments"`
	Endpoints    int              `json:"endpoints"`
	Nodes        int              `json:"nodes"`
	// Drops holds every drop counter by name (packets), DropTotal their sum.
	Drops      map[string]uint64 `json:"drops"`
	DropTotal  uint64            `json:"dropTotal"`
	EventsLost uint64            `json:"eventsLost"`
	Healthy    bool              `json:"healthy"`
	Problems   []string          `json:"problems"`
	Warnings   []string          `json:"warnings"`
}

// programView is a pinned program: its kernel ID and tag say which object
// version runs.
type programView struct {
	Name     string     `json:"name"`
	ID       uint32     `json:"id"`
	Tag      string     `json:"tag"`
	LoadedAt *time.Time `json:"loadedAt,omitempty"`
}

type configView struct {
	// Configured is false until an agent has written the node config.
	Configured    bool   `json:"configured"`
	NodeIP        string `json:"nodeIP,omitempty"`
	Uplink        string `json:"uplink,omitempty"`
	UplinkIfindex int    `json:"uplinkIfindex,omitempty"`
	VNI           uint32 `json:"vni,omitempty"`
	VXLANPort     uint16 `json:"vxlanPort,omitempty"`
	PodMTU        int    `json:"podMTU,omitempty"`
}

// natView says whether the datapath tells NATed connections from others on
// this kernel (it needs nf_conntrack's kfuncs), and if not, why.
type natView struct {
	On  bool   `json:"on"`
	Why string `json:"why,omitempty"`
}

type attachmentCounts struct {
	OK      int `json:"ok"`
	Stale   int `json:"stale"`
	Missing int `json:"missing"`
}

// collectStatus looks at everything it can and notes what it cannot; it
// never fails, since a status that errors out shows nothing.
func collectStatus(root string) (v statusView) {
	v = statusView{Root: root, Programs: []programView{}, Drops: map[string]uint64{}, Problems: []string{}, Warnings: []string{}}
	defer func() { v.Healthy = len(v.Problems) == 0 }()
	problem := func(format string, args ...any) { v.Problems = append(v.Problems, fmt.Sprintf(format, args...)) }
	warn := func(format string, args ...any) { v.Warnings = append(v.Warnings, fmt.Sprintf(format, args...)) }

	nat := datapath.ProbeNATDetection()
	v.NATDetection = natView{On: nat.On, Why: nat.Why}

	dp, err := datapath.OpenPinned(root)
	if err != nil {
		problem("%v", err)
		return v
	}
	defer dp.Close()
	v.Loaded = true
	if err := natCheckLoaded(dp, &v.NATDetection); err != nil {
		problem("%v", err)
	}

	boot := bootTime()
	for _, name := range progOrder {
		p, err := dp.Program(name)
		if err != nil {
			problem("%s is not pinned under %s/progs: run the agent or a CNI ADD to load it", name, root)
			continue
		}
		pv := programView{Name: name}
		if info, err := p.Info(); err == nil {
			if id, ok := info.ID(); ok {
				pv.ID = uint32(id)
			}
			pv.Tag = info.Tag
			if d, ok := info.LoadTime(); ok && !boot.IsZero() {
				t := boot.Add(d).Truncate(time.Second)
				pv.LoadedAt = &t
			}
		}
		v.Programs = append(v.Programs, pv)
	}

	cfg, err := maps.NewConfig(&dp.Maps).Get()
	if err != nil {
		problem("%v", err)
	}
	cv := &configView{Configured: cfg.Configured()}
	v.Config = cv
	v.Tracing = cfg.Trace
	uplink := ""
	if cv.Configured {
		cv.NodeIP, cv.UplinkIfindex = cfg.NodeIP.String(), cfg.UplinkIfindex
		cv.VNI, cv.VXLANPort, cv.PodMTU = cfg.VNI, cfg.VXLANPort, cfg.MTU
		if iface, err := net.InterfaceByIndex(cfg.UplinkIfindex); err == nil {
			uplink, cv.Uplink = iface.Name, iface.Name
		} else {
			problem("uplink (ifindex %d) not found in this network namespace: run status in the node's namespace, or restart the agent if the uplink was recreated", cfg.UplinkIfindex)
		}
	}

	running, err := agent.Running(root)
	switch {
	case err != nil:
		problem("check agent: %v", err)
	case running:
		v.AgentRunning = true
	case cv.Configured:
		problem("agent not running: start `patchcord agent` (pods keep forwarding, but node changes and repairs wait for it)")
	default:
		warn("no agent has configured this node: cross-node traffic is not set up until `patchcord agent` runs")
	}

	if v.Monitoring, err = maps.TracersRunning(root); err != nil {
		warn("check monitors: %v", err)
	} else if v.Tracing && !v.Monitoring {
		warn("tracing is on but no monitor runs (one crashed?): start and stop `patchcord monitor --type trace` to switch it off")
	}

	eps, err := maps.NewEndpoints(&dp.Maps).List()
	if err != nil {
		problem("%v", err)
	}
	v.Endpoints = len(eps)
	if nodes, err := maps.NewNodes(&dp.Maps).List(); err != nil {
		problem("%v", err)
	} else {
		v.Nodes = len(nodes)
	}

	if atts, err := dp.Attachments(); err != nil {
		problem("%v", err)
	} else {
		rows := buildProgRows(atts, eps, uplink, cfg.UplinkIfindex, progTag)
		var probs, warns []string
		v.Attachments, probs, warns = judgeAttachments(rows, uplink)
		v.Problems = append(v.Problems, probs...)
		v.Warnings = append(v.Warnings, warns...)
	}

	if counters, err := maps.NewStats(&dp.Maps).Read(); err != nil {
		problem("%v", err)
	} else {
		for name, c := range counters {
			if strings.HasPrefix(name, "drop_") {
				v.Drops[name] = c.Packets
				v.DropTotal += c.Packets
			}
		}
		v.EventsLost = counters["events_lost"].Packets
	}
	return v
}

// natCheckLoaded turns nat off where the kernel has the conntrack kfuncs
// but the pinned programs were loaded before, and keep the check off: their
// NATed replies bypass conntrack, which is a problem.
func natCheckLoaded(dp *datapath.Datapath, nat *natView) error {
	if !nat.On {
		return nil
	}
	on, err := dp.NATCheckLoaded()
	if err != nil {
		return fmt.Errorf("check the loaded NAT check: %w", err)
	}
	if !on {
		*nat = natView{Why: "the programs were loaded before nf_conntrack"}
		return errors.New("NATed replies bypass conntrack: the programs were loaded before nf_conntrack; a CNI ADD or an agent restart reloads them")
	}
	return nil
}

// judgeAttachments counts attachment rows by status and says which are
// problems: a pod veth or the uplink without its current program. A stale
// link whose interface no longer exists breaks nothing; the agent removes it.
func judgeAttachments(rows []progView, uplink string) (n attachmentCounts, problems, warnings []string) {
	for _, r := range rows {
		switch r.Status {
		case statusOK:
			n.OK++
			continue
		case statusStale:
			n.Stale++
		case statusMissing:
			n.Missing++
		}
		owner := ""
		switch {
		case r.PodIP != "":
			owner = fmt.Sprintf(" (pod %s)", r.PodIP)
		case r.Ifname == uplink && uplink != "":
			owner = " (uplink)"
		}
		switch {
		case owner == "":
			warnings = append(warnings, fmt.Sprintf("%s link on %s is stale and serves no pod: the agent removes it", r.Program, r.Ifname))
		case r.Status == statusMissing:
			problems = append(problems, fmt.Sprintf("%s is not attached to %s%s: the agent restores it within 10 s (is it running?)", r.Program, r.Ifname, owner))
		default:
			problems = append(problems, fmt.Sprintf("%s on %s%s is stale (interface recreated or old program): the agent replaces it within 10 s (is it running?)", r.Program, r.Ifname, owner))
		}
	}
	return n, problems, warnings
}

// bootTime is the wall-clock time of boot on CLOCK_BOOTTIME, which program
// load times count from; zero if unknown.
func bootTime() time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(ts.Nano()))
}

func formatStatus(w io.Writer, v statusView) {
	row := func(k, format string, args ...any) { fmt.Fprintf(w, "%s\t%s\n", k, fmt.Sprintf(format, args...)) }
	if !v.Loaded {
		row("Datapath", "not loaded under %s", v.Root)
	} else {
		row("Datapath", "loaded under %s", v.Root)
		for i, p := range v.Programs {
			k := ""
			if i == 0 {
				k = "Programs"
			}
			loaded := ""
			if p.LoadedAt != nil {
				loaded = ", loaded " + p.LoadedAt.Local().Format(time.DateTime)
			}
			row(k, "%-11s id %d tag %s%s", p.Name, p.ID, orDash(p.Tag), loaded)
		}
		switch c := v.Config; {
		case c == nil:
		case !c.Configured:
			row("Node", "not configured (no agent has run)")
		default:
			up := c.Uplink
			if up == "" {
				up = "?"
			}
			row("Node", "IP %s, uplink %s (ifindex %d), VNI %d, port %d, pod MTU %d", c.NodeIP, up, c.UplinkIfindex, c.VNI, c.VXLANPort, c.PodMTU)
		}
		row("Agent", "%s", map[bool]string{true: "running", false: "not running"}[v.AgentRunning])
		tracing := "off"
		switch {
		case v.Tracing && v.Monitoring:
			tracing = "on (a monitor runs)"
		case v.Tracing:
			tracing = "on (no monitor runs)"
		}
		row("Tracing", "%s", tracing)
		if v.NATDetection.On {
			row("NAT check", "on")
		} else {
			row("NAT check", "off: %s", v.NATDetection.Why)
		}
		row("Attachments", "%d ok, %d stale, %d missing", v.Attachments.OK, v.Attachments.Stale, v.Attachments.Missing)
		row("Endpoints", "%d", v.Endpoints)
		row("Nodes", "%d", v.Nodes)
		var by []string
		for _, name := range slices.Sorted(stdmaps.Keys(v.Drops)) {
			if n := v.Drops[name]; n > 0 {
				by = append(by, fmt.Sprintf("%s %d", name, n))
			}
		}
		if len(by) > 0 {
			row("Drops", "%d (%s)", v.DropTotal, strings.Join(by, ", "))
		} else {
			row("Drops", "%d", v.DropTotal)
		}
		row("Events lost", "%d", v.EventsLost)
	}
	for i, p := range v.Problems {
		k := ""
		if i == 0 {
			k = "Problems"
		}
		row(k, "%s", p)
	}
	for i, p := range v.Warnings {
		k := ""
		if i == 0 {
			k = "Warnings"
		}
		row(k, "%s", p)
	}
	if v.Healthy {
		row("Status", "OK")
	} else {
		row("Status", "BROKEN")
	}
}
