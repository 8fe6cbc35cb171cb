// `patchcord bpf prog list`: what is attached where, and what should be but
// is not. `patchcord status` judges attachment health from the same rows.
package main

import (
	"fmt"
	"io"
	"net"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/maps"
	"github.com/spf13/cobra"
)

// Attachment statuses.
const (
	statusOK      = "ok"      // the current program runs on the interface
	statusStale   = "stale"   // pinned, but the interface is gone or recreated, or the program is old
	statusMissing = "missing" // a pod veth or the uplink has no pinned link at all
)

func newProgCmd(g *globals) *cobra.Command {
	prog := &cobra.Command{
		Use:     "prog",
		Short:   "The datapath's programs and where they are attached",
		Example: "  patchcord bpf prog list",
	}
	prog.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List every attachment, flagging stale and missing ones",
		Long: `List every pinned tcx link: interface, direction, program, program ID and
tag, link ID and pin. Status "stale" marks a link whose interface was
deleted or recreated, or that runs an older program; "missing" marks a pod
veth without from_pod, or a configured uplink without from_uplink or
to_uplink. The agent repairs both within 10 s. Run it in the node's network
namespace: interfaces are looked up by name there.`,
		Example: "  patchcord bpf prog list\n  patchcord bpf prog list -o json | jq '.[] | select(.status != \"ok\")'",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dp, err := g.open()
			if err != nil {
				return err
			}
			defer dp.Close()
			rows, err := progRows(dp)
			if err != nil {
				return err
			}
			return g.print(cmd.OutOrStdout(), rows, func(w io.Writer) { formatProgTable(w, rows) })
		},
	})
	return prog
}

// progView is one row of `bpf prog list`; JSON field names are stable.
type progView struct {
	Ifname    string `json:"ifname"`
	Ifindex   int    `json:"ifindex"`
	Direction string `json:"direction"`
	Program   string `json:"program"`
	ProgID    uint32 `json:"progID"`
	Tag       string `json:"tag"`
	LinkID    uint32 `json:"linkID"`
	Pin       string `json:"pin"`
	Status    string `json:"status"`
	// PodIP names the endpoint a from_pod row belongs to, when one does.
	PodIP string `json:"podIP,omitempty"`
}

var progOrder = []string{datapath.FromPod, datapath.FromUplink, datapath.ToUplink}

var directions = map[string]string{
	datapath.FromPod:    "ingress",
	datapath.FromUplink: "ingress",
	datapath.ToUplink:   "egress",
}

// progRows lists the pinned attachments plus a "missing" row for each
// interface that should have a program and has none: every endpoint's veth,
// and the uplink once an agent has configured one.
func progRows(dp *datapath.Datapath) ([]progView, error) {
	atts, err := dp.Attachments()
	if err != nil {
		return nil, err
	}
	eps, err := maps.NewEndpoints(&dp.Maps).List()
	if err != nil {
		return nil, err
	}
	cfg, err := maps.NewConfig(&dp.Maps).Get()
	if err != nil {
		return nil, err
	}
	uplink := ""
	if cfg.Configured() {
		if iface, err := net.InterfaceByIndex(cfg.UplinkIfindex); err == nil {
			uplink = iface.Name
		}
	}
	return buildProgRows(atts, eps, uplink, cfg.UplinkIfindex, progTag), nil
}

// buildProgRows is progRows without the kernel: tag looks up a program's tag
// by ID.
func buildProgRows(atts []datapath.Attachment, eps []maps.EndpointInfo, uplink string, uplinkIfindex int, tag func(ebpf.ProgramID) string) []progView {
	podIP := make(map[string]string, len(eps))
	for _, ep := range eps {
		if ep.Ifname != "" {
			podIP[ep.Ifname] = ep.IP.String()
		}
	}
	have := make(map[[2]string]bool, len(atts))
	rows := make([]progView, 0, len(atts))
	for _, a := range atts {
		have[[2]string{a.Program, a.Ifname}] = true
		r := progView{
			Ifname: a.Ifname, Ifindex: a.Ifindex, Direction: a.Direction, Program: a.Program,
			ProgID: uint32(a.ProgID), LinkID: uint32(a.LinkID), Pin: a.Pin, Status: statusOK,
		}
		if a.ProgID != 0 {
			r.Tag = tag(a.ProgID)
		}
		if a.Stale {
			r.Status = statusStale
		}
		if a.Program == datapath.FromPod {
			r.PodIP = podIP[a.Ifname]
		}
		rows = append(rows, r)
	}
	missing := func(prog, ifname string, ifindex int, ip string) {
		if have[[2]string{prog, ifname}] {
			return
		}
		rows = append(rows, progView{Ifname: ifname, Ifindex: ifindex, Direction: directions[prog], Program: prog, Status: statusMissing, PodIP: ip})
	}
	for _, ep := range eps {
		if ep.Ifname != "" {
			missing(datapath.FromPod, ep.Ifname, ep.Ifindex, ep.IP.String())
		}
	}
	if uplink != "" {
		missing(datapath.FromUplink, uplink, uplinkIfindex, "")
		missing(datapath.ToUplink, uplink, uplinkIfindex, "")
	}
	slices.SortStableFunc(rows, func(a, b progView) int {
		if c := slices.Index(progOrder, a.Program) - slices.Index(progOrder, b.Program); c != 0 {
			return c
		}
		return strings.Compare(a.Ifname, b.Ifname)
	})
	return rows
}

// progTag returns the kernel's tag of a loaded program, "" if it is gone.
func progTag(id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return ""
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return ""
	}
	return info.Tag
}

func formatProgTable(w io.Writer, rows []progView) {
	fmt.Fprintln(w, "IFNAME\tDIRECTION\tPROGRAM\tPROG ID\tTAG\tLINK ID\tSTATUS\tPIN")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			r.Ifname, r.Direction, r.Program, idOrDash(r.ProgID), orDash(r.Tag), idOrDash(r.LinkID), r.Status, orDash(r.Pin))
	}
}

func idOrDash(id uint32) string {
	if id == 0 {
		return "-"
	}
	return fmt.Sprint(id)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
