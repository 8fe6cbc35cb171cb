package main

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/views"
	"github.com/spf13/cobra"
)

func newBPFCmd(g *globals) *cobra.Command {
	return newGroupCmd("bpf", "Inspect the datapath's maps and programs",
		`  patchcord bpf endpoint list
  patchcord bpf node list -o json
  patchcord bpf prog list
  patchcord bpf stats`,
		newEndpointCmd(g), newNodeCmd(g), newProgCmd(g), newStatsCmd(g))
}

// newGroupCmd returns a command that only holds subcommands: it has no RunE
// of its own, so run alone it prints its help.
func newGroupCmd(use, short, example string, subcommands ...*cobra.Command) *cobra.Command {
	cmd := &cobra.Command{Use: use, Short: short, Example: example}
	cmd.AddCommand(subcommands...)
	return cmd
}

func newStatsCmd(g *globals) *cobra.Command {
	var reset bool
	cmd := &cobra.Command{
		Use:     "stats",
		Short:   "Datapath counters, summed over CPUs",
		Example: "  patchcord bpf stats\n  patchcord bpf stats -o json\n  patchcord bpf stats --reset",
		Args:    cobra.NoArgs,
		RunE:    func(cmd *cobra.Command, _ []string) error { return statsShow(g, cmd.OutOrStdout(), reset) },
	}
	cmd.Flags().BoolVar(&reset, "reset", false, "zero every counter after printing it")
	return cmd
}

func newNodeCmd(g *globals) *cobra.Command {
	return newGroupCmd("node", "Remote nodes the datapath tunnels to", "  patchcord bpf node list",
		&cobra.Command{
			Use:     "list",
			Short:   "List remote nodes by pod CIDR",
			Example: "  patchcord bpf node list\n  patchcord bpf node list -o json",
			Args:    cobra.NoArgs,
			RunE:    func(cmd *cobra.Command, _ []string) error { return nodeList(g, cmd.OutOrStdout()) },
		})
}

func newEndpointCmd(g *globals) *cobra.Command {
	return newGroupCmd("endpoint", "Local pods the datapath delivers to",
		"  patchcord bpf endpoint list\n  patchcord bpf endpoint get 10.244.1.5 -o json",
		&cobra.Command{
			Use:     "list",
			Short:   "List local endpoints",
			Example: "  patchcord bpf endpoint list\n  patchcord bpf endpoint list -o json",
			Args:    cobra.NoArgs,
			RunE:    func(cmd *cobra.Command, _ []string) error { return endpointList(g, cmd.OutOrStdout(), "") },
		},
		&cobra.Command{
			Use:     "get IP",
			Short:   "Show one endpoint",
			Example: "  patchcord bpf endpoint get 10.244.1.5",
			Args:    cobra.ExactArgs(1),
			RunE:    func(cmd *cobra.Command, args []string) error { return endpointList(g, cmd.OutOrStdout(), args[0]) },
			// Best effort: completing needs the same privileges as listing.
			ValidArgsFunction: func(_ *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
				if len(args) > 0 {
					return nil, cobra.ShellCompDirectiveNoFileComp
				}
				return endpointIPs(g), cobra.ShellCompDirectiveNoFileComp
			},
		},
	)
}

func endpointList(g *globals, w io.Writer, only string) error {
	read := listEndpoints
	if only != "" {
		ip, err := netip.ParseAddr(only)
		if err != nil {
			return fmt.Errorf("parse endpoint address %q: %w", only, err)
		}
		read = func(dp *datapath.Datapath) ([]bpfmaps.EndpointInfo, error) {
			ep, err := bpfmaps.NewEndpoints(&dp.Maps).Get(ip)
			if errors.Is(err, bpfmaps.ErrNotFound) {
				return nil, fmt.Errorf("endpoint %s: %w (`patchcord bpf endpoint list` shows what is registered)", ip, err)
			}
			if err != nil {
				return nil, fmt.Errorf("endpoint %s: %w", ip, err)
			}
			return []bpfmaps.EndpointInfo{ep}, nil
		}
	}
	list, err := readPinned(g, read)
	if err != nil {
		return err
	}
	return printRows(g, w, views.EndpointRows(list), "IP\tIFINDEX\tIFNAME\tMAC\tHOST MAC\tCONTAINER", func(v views.Endpoint) string {
		return fmt.Sprintf("%s\t%d\t%s\t%s\t%s\t%s", v.IP, v.Ifindex, v.Ifname, v.MAC, v.HostMAC, short(v.ContainerID))
	})
}

// printRows prints rows as JSON, or as a table: header, then a line of each.
func printRows[T any](g *globals, w io.Writer, rows []T, header string, line func(T) string) error {
	return g.print(w, rows, func(w io.Writer) {
		fmt.Fprintln(w, header)
		for _, r := range rows {
			fmt.Fprintln(w, line(r))
		}
	})
}

func statsShow(g *globals, w io.Writer, reset bool) error {
	return g.withPinned(func(dp *datapath.Datapath) error {
		st := bpfmaps.NewStats(&dp.Maps)
		counters, err := st.Read()
		if err != nil {
			return err
		}
		err = g.print(w, counters, func(w io.Writer) {
			fmt.Fprintln(w, "COUNTER\tPACKETS\tBYTES")
			for _, n := range slices.Sorted(maps.Keys(counters)) {
				fmt.Fprintf(w, "%s\t%d\t%d\n", n, counters[n].Packets, counters[n].Bytes)
			}
		})
		if err != nil || !reset {
			return err
		}
		return st.Reset()
	})
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func nodeList(g *globals, w io.Writer) error {
	list, err := readPinned(g, func(dp *datapath.Datapath) ([]bpfmaps.Node, error) { return bpfmaps.NewNodes(&dp.Maps).List() })
	if err != nil {
		return err
	}
	return printRows(g, w, views.NodeRows(list), "POD CIDR\tNODE IP\tROUTING\tVTEP MAC", func(v views.Node) string {
		return fmt.Sprintf("%s\t%s\t%s\t%s", v.PodCIDR, v.NodeIP, v.Routing, v.VtepMAC)
	})
}

// endpointIPs lists the registered pod IPs for shell completion.
func endpointIPs(g *globals) []string {
	list, err := readPinned(g, listEndpoints)
	if err != nil {
		return nil
	}
	ips := make([]string, 0, len(list))
	for _, ep := range list {
		ips = append(ips, ep.IP.String())
	}
	slices.Sort(ips)
	return ips
}
