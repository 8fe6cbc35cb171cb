// `patchcord status`: the node's datapath on one screen, and an exit code
// that says whether it is broken, so that it can serve as a liveness probe.
package main

import (
	"errors"
	"fmt"
	"io"
	stdmaps "maps"
	"slices"
	"strings"
	"time"

	"github.com/patchcord/patchcord/pkg/views"
	"github.com/spf13/cobra"
)

// errUnhealthy is returned (exit code 1) after status has printed problems.
var errUnhealthy = errors.New("datapath unhealthy")

func newStatusCmd(g *globals) *cobra.Command {
	var metricsAddr string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "One screen on the node's datapath; exits non-zero when it is broken",
		Long: `Show whether the datapath is loaded (and which programs: IDs, tags, load
times), the node config the agent wrote, attachment health, endpoint and node
counts, drop totals, whether tracing is on, whether the agent runs and, with
BGP, its sessions (read from the agent's metrics).

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
			v := views.CollectStatus(g.root)
			v.CollectBGP(cmd.Context(), metricsAddr)
			if err := g.print(cmd.OutOrStdout(), v, func(w io.Writer) { formatStatus(w, v) }); err != nil {
				return err
			}
			if !v.Healthy {
				return fmt.Errorf("%w: %s", errUnhealthy, strings.Join(v.Problems, "; "))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&metricsAddr, "agent-metrics", "127.0.0.1:9964", `where the agent serves its metrics (its --metrics-addr), to show its BGP sessions ("" skips them)`)
	return cmd
}

func formatStatus(w io.Writer, v views.Status) {
	row := func(k, format string, args ...any) { fmt.Fprintf(w, "%s\t%s\n", k, fmt.Sprintf(format, args...)) }
	if !v.Loaded {
		row("Datapath", "not loaded under %s", v.Root)
	} else {
		formatLoaded(row, v)
	}
	labelled(row, "Problems", v.Problems)
	labelled(row, "Warnings", v.Warnings)
	if v.Healthy {
		row("Status", "OK")
	} else {
		row("Status", "BROKEN")
	}
}

// rowFunc prints one key-value row of the status table.
type rowFunc func(k, format string, args ...any)

// labelled prints lines under one key, given on the first only.
func labelled(row rowFunc, key string, lines []string) {
	for i, l := range lines {
		k := ""
		if i == 0 {
			k = key
		}
		row(k, "%s", l)
	}
}

// formatLoaded prints the rows of a loaded datapath.
func formatLoaded(row rowFunc, v views.Status) {
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
	row("Attach mode", "%s", orDash(v.AttachMode))
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
	kernelRows(row, v)
	row("Attachments", "%d ok, %d stale, %d missing", v.Attachments.OK, v.Attachments.Stale, v.Attachments.Missing)
	row("Endpoints", "%d", v.Endpoints)
	row("Nodes", "%d (%d native, %d tunnel)", v.Nodes, v.NativeNodes, v.Nodes-v.NativeNodes)
	var peers []string
	for _, n := range v.BGP {
		peers = append(peers, n.String())
	}
	labelled(row, "BGP", peers)
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

// kernelRows names the kernel and every feature it lacks, with what the
// datapath does without it.
func kernelRows(row func(string, string, ...any), v views.Status) {
	missing := v.Features.Missing()
	if len(missing) == 0 {
		row("Kernel", "%s: every feature", orDash(v.Kernel))
		return
	}
	row("Kernel", "%s, lacks:", orDash(v.Kernel))
	for _, f := range missing {
		without := f.Without
		if f.Required() {
			without = "required: patchcord cannot run"
		}
		row("", "%s (since %s): %s", f.Name, f.Since, without)
	}
}
