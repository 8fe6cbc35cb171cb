// `patchcord bpf prog list`: what is attached where, and what should be but
// is not. `patchcord status` judges attachment health from the same rows.
package main

import (
	"fmt"
	"io"

	"github.com/patchcord/patchcord/pkg/views"
	"github.com/spf13/cobra"
)

func newProgCmd(g *globals) *cobra.Command {
	return newGroupCmd("prog", "The datapath's programs and where they are attached", "  patchcord bpf prog list",
		&cobra.Command{
			Use:   "list",
			Short: "List every attachment, flagging stale and missing ones",
			Long: `List every attachment: interface, direction, program, program ID and
tag, link ID (tcx) and mode, and pin. Mode is tcx (a pinned link) or tc (a
cls_bpf filter on the clsact qdisc, its program pinned as the record);
tc/yielded marks a pod veth whose ingress qdisc slot was left to the
bandwidth plugin. Status "stale" marks an attachment whose interface was
deleted or recreated, or that runs an older program; "missing" marks a pod
veth without from_pod, or a configured uplink without from_uplink or
to_uplink. The agent repairs both within 10 s. Run it in the node's network
namespace: interfaces are looked up by name there.`,
			Example: "  patchcord bpf prog list\n  patchcord bpf prog list -o json | jq '.[] | select(.status != \"ok\")'",
			Args:    cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				rows, err := readPinned(g, views.ProgRows)
				if err != nil {
					return err
				}
				return g.print(cmd.OutOrStdout(), rows, func(w io.Writer) { formatProgTable(w, rows) })
			},
		})
}

func formatProgTable(w io.Writer, rows []views.Prog) {
	fmt.Fprintln(w, "IFNAME\tDIRECTION\tPROGRAM\tPROG ID\tTAG\tLINK ID\tMODE\tSTATUS\tPIN")
	for _, r := range rows {
		mode := r.Mode
		if r.Yielded {
			mode += "/yielded"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			r.Ifname, r.Direction, r.Program, idOrDash(r.ProgID), orDash(r.Tag), idOrDash(r.LinkID), orDash(mode), r.Status, orDash(r.Pin))
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
