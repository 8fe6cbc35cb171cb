package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/spf13/cobra"
)

// globals are the flags every command shares.
type globals struct {
	root   string
	output string
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	cmd := &cobra.Command{
		Use:           "patchcord",
		Short:         "eBPF pod datapath: node agent and debugging CLI",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.PersistentFlags().StringVar(&g.root, "bpffs-root", datapath.DefaultRoot, "bpffs directory the node's datapath is pinned under")
	cmd.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	cmd.AddCommand(newBPFCmd(g), newAgentCmd(g))
	return cmd
}

// open opens the pinned datapath for reading; it never loads one.
func (g *globals) open() (*datapath.Datapath, error) {
	return datapath.OpenPinned(g.root)
}

// print writes v as JSON, or calls table with an aligned writer.
func (g *globals) print(w io.Writer, v any, table func(w io.Writer)) error {
	switch g.output {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "table", "":
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		table(tw)
		return tw.Flush()
	}
	return fmt.Errorf("unknown output format %q: use table or json", g.output)
}
