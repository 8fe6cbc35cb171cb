package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
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
		Use:   "patchcord",
		Short: "eBPF pod datapath: node agent and debugging CLI",
		Long: `patchcord is the node agent (patchcord agent) and the debugging CLI of the
patchcord datapath. The CLI reads what is pinned under --bpffs-root and never
loads or changes the datapath (except bpf stats --reset, and monitor, which
switches traces on while it runs). Every listing prints an aligned table, or
JSON with -o json. Run it as root in the node's network namespace.`,
		Example: `  patchcord status                                   # is this node's datapath healthy?
  patchcord monitor -o json --count 1 | jq -r .reason  # why is my packet dropped?
  patchcord bpf endpoint list
  patchcord bpf prog list -o json
  source <(patchcord completion bash)`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if !slices.Contains(outputFormats, g.output) {
				return fmt.Errorf("-o/--output: unknown format %q: use table or json", g.output)
			}
			return nil
		},
	}
	cmd.PersistentFlags().StringVar(&g.root, "bpffs-root", datapath.DefaultRoot, "bpffs directory the node's datapath is pinned under")
	cmd.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(outputFormats, cobra.ShellCompDirectiveNoFileComp))
	cmd.AddCommand(newBPFCmd(g), newAgentCmd(g), newMonitorCmd(g), newStatusCmd(g))
	return cmd
}

var outputFormats = []string{"table", "json"}

// open opens the pinned datapath for reading; it never loads one.
func (g *globals) open() (*datapath.Datapath, error) {
	return datapath.OpenPinned(g.root)
}

// withPinned runs f on the node's pinned datapath.
func (g *globals) withPinned(f func(*datapath.Datapath) error) error {
	dp, err := g.open()
	if err != nil {
		return err
	}
	defer dp.Close()
	return f(dp)
}

// readPinned opens the node's pinned datapath for one read.
func readPinned[T any](g *globals, read func(*datapath.Datapath) (T, error)) (v T, err error) {
	err = g.withPinned(func(dp *datapath.Datapath) error {
		v, err = read(dp)
		return err
	})
	return v, err
}

func listEndpoints(dp *datapath.Datapath) ([]bpfmaps.EndpointInfo, error) {
	return bpfmaps.NewEndpoints(&dp.Maps).List()
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
