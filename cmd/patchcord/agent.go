package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/spf13/cobra"
)

func newAgentCmd(g *globals) *cobra.Command {
	var (
		nodeIP, podCIDR, nodesFile, logLevel, clusterCIDR string
		vni, port                                         uint32
		cfg                                               agent.Config
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: uplink programs, remote nodes, repairs",
		Long: `The agent loads (or reuses) the pinned datapath, attaches from_uplink and
to_uplink to the uplink, keeps the remote-node map and routes in step with
the nodes file, and repairs endpoints and attachments. It holds no datapath
state: stopping or killing it leaves traffic flowing.`,
		Example: `  patchcord agent --uplink eth0 --node-ip 198.18.0.1 --pod-cidr 10.244.1.0/24 --nodes /etc/patchcord/nodes.json
  patchcord agent --uplink eth0 --node-ip 198.18.0.1 --pod-cidr 10.244.1.0/24 --nodes nodes.json --vxlan-port 8472  # Flannel's wire`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel)
			if err != nil {
				return err
			}
			if cfg.NodeIP, err = netip.ParseAddr(nodeIP); err != nil {
				return fmt.Errorf("--node-ip: %q is not an IPv4 address", nodeIP)
			}
			if cfg.PodCIDR, err = netip.ParsePrefix(podCIDR); err != nil {
				return fmt.Errorf("--pod-cidr: %q is not a CIDR", podCIDR)
			}
			if vni > 1<<24-1 {
				return fmt.Errorf("--vni: %d is out of range 1..16777215", vni)
			}
			if port == 0 || port > 65535 {
				return fmt.Errorf("--vxlan-port: %d is out of range 1..65535", port)
			}
			if clusterCIDR != "" {
				if cfg.ClusterCIDR, err = netip.ParsePrefix(clusterCIDR); err != nil {
					return fmt.Errorf("--cluster-cidr: %q is not a CIDR", clusterCIDR)
				}
			}
			cfg.VNI, cfg.VXLANPort, cfg.BpffsRoot = vni, uint16(port), g.root
			if nodesFile == "" {
				return fmt.Errorf("--nodes: required (a JSON file listing the cluster's nodes)")
			}
			src := &nodes.File{Path: nodesFile, Log: log}
			// A bad file at start is an error; on reload it is only logged.
			if _, err := src.Load(); err != nil {
				return fmt.Errorf("--nodes: %w", err)
			}
			return agent.Run(cmd.Context(), cfg, src, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Uplink, "uplink", "", "the node's interface toward other nodes")
	f.StringVar(&nodeIP, "node-ip", "", "this node's IPv4 address on the uplink (tunnel endpoint)")
	f.StringVar(&podCIDR, "pod-cidr", "", "this node's pod CIDR")
	f.StringVar(&nodesFile, "nodes", "", `nodes file: {"nodes":[{"name","nodeIP","podCIDR","vtepMAC"}]}, re-read on change`)
	f.Uint32Var(&vni, "vni", 1, "VXLAN network identifier")
	f.Uint32Var(&port, "vxlan-port", 4789, "VXLAN UDP port (Flannel uses 8472)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&cfg.Masquerade, "masquerade", true, "SNAT pod traffic leaving the cluster to the node IP (an iptables chain the agent owns; false removes it)")
	f.StringVar(&clusterCIDR, "cluster-cidr", "", "what is inside the cluster for --masquerade (default: every known pod CIDR)")
	f.StringVar(&cfg.ReadyFile, "ready-file", "", "file written once the first node sync is done")
	return cmd
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}
