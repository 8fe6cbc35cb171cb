// `patchcord agent`: its flags, resolved into an agent.Config, and the run.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/bgp"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/metrics"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
)

// agentFlags are the agent's flags as given; config turns them into an
// agent.Config.
type agentFlags struct {
	nodeIP, podCIDR, nodesFile, logLevel, clusterCIDR string
	kubeconfig, nodeName, metricsAddr, attachMode     string
	flannelCompat, vxlanGRO                           bool
	vni, port                                         uint32
	cfg                                               agent.Config
	bgpASN                                            uint32
	bgpListenPort                                     int32
	bgpNeighbors                                      []string
	bgpRestartTime                                    time.Duration
	metrics                                           *metrics.Metrics // nil with --metrics-addr ""
}

func newAgentCmd(g *globals) *cobra.Command {
	var af agentFlags
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: uplink programs, remote nodes, repairs",
		Long: `The agent loads (or reuses) the pinned datapath, attaches from_uplink and
to_uplink to the uplink, keeps the remote-node map and routes in step with
the nodes file or the cluster's Node objects, and repairs endpoints and
attachments. It holds no datapath state: stopping or killing it leaves
traffic flowing.

With the Kubernetes API as node source (--kubeconfig, or in a pod its
service account), --node-ip and --pod-cidr default to this node's Node
object (--node-name, $NODE_NAME), and --uplink to the interface holding
the node IP.`,
		Example: `  patchcord agent --uplink eth0 --node-ip 198.18.0.1 --pod-cidr 10.244.1.0/24 --nodes /etc/patchcord/nodes.json
  patchcord agent --uplink eth0 --node-ip 198.18.0.1 --pod-cidr 10.244.1.0/24 --nodes nodes.json --vxlan-port 8472  # Flannel's wire
  patchcord agent --kubeconfig /etc/patchcord/kubeconfig --node-name node1 --vxlan-port 8472 --flannel-compat`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(af.logLevel)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			src, kube, err := nodeSource(af.nodesFile, af.kubeconfig, af.nodeName, log)
			if err != nil {
				return err
			}
			cfg, err := af.config(ctx, kube, g.root, log)
			if err != nil {
				return err
			}
			if src, err = af.withBGP(ctx, src, kube, cfg, log); err != nil {
				return err
			}
			return agent.Run(ctx, cfg, src, log)
		},
	}
	af.register(cmd.Flags())
	return cmd
}

func (af *agentFlags) register(f *pflag.FlagSet) {
	cfg := &af.cfg
	f.StringVar(&cfg.Uplink, "uplink", "", "the node's interface toward other nodes (default: the one holding --node-ip)")
	f.StringVar(&af.nodeIP, "node-ip", "", "this node's IPv4 address on the uplink, the tunnel endpoint (default with Kubernetes: the Node's InternalIP)")
	f.StringVar(&af.podCIDR, "pod-cidr", "", "this node's pod CIDR (default with Kubernetes: the Node's spec.podCIDR)")
	f.StringVar(&af.nodesFile, "nodes", "", `nodes file: {"nodes":[{"name","nodeIP","podCIDR","vtepMAC","routing"}]}, re-read on change`)
	f.StringVar(&af.kubeconfig, "kubeconfig", "", "follow the cluster's Node objects with this kubeconfig instead of --nodes (in a pod, the service account serves without it)")
	f.StringVar(&af.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's Node name (default $NODE_NAME)")
	f.BoolVar(&af.flannelCompat, "flannel-compat", false, "publish this node's VTEP in Flannel's node annotations, so that Flannel nodes reach its pods (with --vxlan-port 8472)")
	f.StringVar(&af.metricsAddr, "metrics-addr", ":9964", `serve Prometheus metrics at http://ADDR/metrics ("" turns them off)`)
	f.StringVar((*string)(&cfg.Routing), "routing", string(nodes.Tunnel), "how remote nodes' pods are reached unless a node says (nodes file \"routing\", annotation "+nodes.RoutingAnnotation+"): tunnel (VXLAN), native (routed by the fabric: pods' packets leave unencapsulated, pod MTU = uplink MTU), or auto (native for nodes on the uplink's subnet, tunnel beyond it)")
	f.Uint32Var(&af.bgpASN, "bgp-asn", 0, "this node's AS number: run a BGP speaker that announces the pod CIDR and routes the pod CIDRs it learns natively (0: no BGP; with Kubernetes, the node's annotation "+nodes.BGPASNAnnotation+")")
	f.StringArrayVar(&af.bgpNeighbors, "bgp-neighbor", nil, "a BGP neighbour as ADDR,ASN (repeat for more): a top-of-rack router, a route reflector, or another node (with Kubernetes, the node's annotation "+nodes.BGPNeighborsAnnotation+": space-separated)")
	f.Int32Var(&af.bgpListenPort, "bgp-listen-port", 179, "TCP port for sessions neighbours open, on the node IP (-1: only dial out)")
	f.DurationVar(&af.bgpRestartTime, "bgp-restart-time", 120*time.Second, "how long neighbours keep this node's routes while its agent restarts (graceful restart); also how long a node that is gone for good stays routed")
	f.Uint32Var(&af.vni, "vni", 1, "VXLAN network identifier")
	f.Uint32Var(&af.port, "vxlan-port", 4789, "VXLAN UDP port (Flannel uses 8472)")
	f.BoolVar(&af.vxlanGRO, "vxlan-gro", true, "hold the VXLAN port with an idle external vxlan device, "+agent.GRODevice+", so that the uplink's GRO merges VXLAN (false removes it)")
	f.StringVar(&af.logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&cfg.Masquerade, "masquerade", true, "SNAT pod traffic leaving the cluster to the node IP (an iptables chain the agent owns; false removes it)")
	f.StringVar(&af.clusterCIDR, "cluster-cidr", "", "what is inside the cluster for --masquerade (default: every known pod CIDR)")
	f.Uint32Var(&cfg.EventRate, "monitor-event-rate", datapath.EventRateDefault, "drop events per second, per CPU and per drop reason, for `patchcord monitor`; more are counted as events_suppressed (0: the default)")
	f.Uint32Var(&cfg.EventBurst, "monitor-event-burst", datapath.EventBurstDefault, "drop events at once, per CPU and per reason, before --monitor-event-rate applies (0: the default)")
	f.StringVar(&cfg.ReadyFile, "ready-file", "", "file written once the first node sync is done")
	f.StringVar(&af.attachMode, "attach-mode", string(datapath.AttachAuto), "how programs attach: auto (tcx on kernel 6.6 and later, tc before), tcx, or tc (clsact + cls_bpf); the node's first choice is recorded")
	f.BoolVar(&cfg.MigrateAttachMode, "migrate-attach-mode", false, "move the node's attachments to --attach-mode when they use the other backend (each attached anew before the old one goes)")
}

// config resolves the flags into the agent's config: defaults from this
// node's Node object and the uplink, Flannel's VTEP annotations published,
// and the metrics server started, since their errors belong to the flags.
func (af *agentFlags) config(ctx context.Context, kube *nodes.Kube, root string, log *slog.Logger) (agent.Config, error) {
	cfg := af.cfg
	if err := af.selfDefaults(ctx, kube); err != nil {
		return cfg, err
	}
	var err error
	if cfg.NodeIP, err = netip.ParseAddr(af.nodeIP); err != nil {
		return cfg, fmt.Errorf("--node-ip: %q is not an IPv4 address", af.nodeIP)
	}
	if cfg.PodCIDR, err = netip.ParsePrefix(af.podCIDR); err != nil {
		return cfg, fmt.Errorf("--pod-cidr: %q is not a CIDR", af.podCIDR)
	}
	if af.vni > 1<<24-1 {
		return cfg, fmt.Errorf("--vni: %d is out of range 1..16777215", af.vni)
	}
	if af.port == 0 || af.port > 65535 {
		return cfg, fmt.Errorf("--vxlan-port: %d is out of range 1..65535", af.port)
	}
	if af.clusterCIDR != "" {
		if cfg.ClusterCIDR, err = netip.ParsePrefix(af.clusterCIDR); err != nil {
			return cfg, fmt.Errorf("--cluster-cidr: %q is not a CIDR", af.clusterCIDR)
		}
	}
	if cfg.AttachMode, err = datapath.ParseAttachMode(af.attachMode); err != nil {
		return cfg, fmt.Errorf("--attach-mode: %w", err)
	}
	cfg.VNI, cfg.VXLANPort, cfg.BpffsRoot = af.vni, uint16(af.port), root
	cfg.NoVXLANGRO = !af.vxlanGRO
	if cfg.Uplink == "" {
		if cfg.Uplink, err = uplinkFor(cfg.NodeIP); err != nil {
			return cfg, err
		}
	}
	if af.flannelCompat {
		if err := af.publishVTEP(ctx, kube, &cfg, log); err != nil {
			return cfg, err
		}
	}
	if af.metricsAddr != "" {
		m := metrics.New(root, log)
		af.metrics = m
		if _, err := m.Start(ctx, af.metricsAddr); err != nil {
			return cfg, fmt.Errorf("--metrics-addr: %w", err)
		}
		cfg.OnSyncError = func(error) { m.SyncError() }
	}
	return cfg, nil
}

// withBGP starts the BGP speaker if --bgp-asn (or, with the Kubernetes
// source, this node's annotation) asks for one, and merges what it learns
// into src. It serves its metrics beside the datapath's.
func (af *agentFlags) withBGP(ctx context.Context, src nodes.Source, kube *nodes.Kube, cfg agent.Config, log *slog.Logger) (nodes.Source, error) {
	if af.bgpASN == 0 && kube != nil {
		if err := af.bgpFromAnnotations(ctx, kube); err != nil {
			return nil, err
		}
	}
	if af.bgpASN == 0 {
		if len(af.bgpNeighbors) != 0 {
			return nil, errors.New("--bgp-neighbor: needs --bgp-asn")
		}
		return src, nil
	}
	bc := bgp.Config{ASN: af.bgpASN, RouterID: cfg.NodeIP, PodCIDR: cfg.PodCIDR, RestartTime: af.bgpRestartTime, ListenPort: af.bgpListenPort, Accept: cfg.ClusterCIDR}
	for _, s := range af.bgpNeighbors {
		n, err := bgp.ParseNeighbor(s)
		if err != nil {
			return nil, fmt.Errorf("--bgp-neighbor: %w", err)
		}
		bc.Neighbors = append(bc.Neighbors, n)
	}
	sp, err := bgp.Start(ctx, bc, log)
	if err != nil {
		return nil, err
	}
	if af.metrics != nil {
		af.metrics.Register(sp.Collector())
	}
	return sp.Source(src), nil
}

// bgpFromAnnotations takes --bgp-asn, and --bgp-neighbor unless given,
// from this node's annotations.
func (af *agentFlags) bgpFromAnnotations(ctx context.Context, kube *nodes.Kube) error {
	asn, neighbors, err := kube.SelfBGP(ctx)
	if err != nil || asn == "" {
		return err
	}
	if af.bgpASN, err = bgp.ParseASN(asn); err != nil {
		return fmt.Errorf("annotation %s: %w", nodes.BGPASNAnnotation, err)
	}
	if len(af.bgpNeighbors) == 0 {
		af.bgpNeighbors = neighbors
	}
	return nil
}

// selfDefaults fills --node-ip and --pod-cidr from this node's Node object
// when the Kubernetes source runs: a DaemonSet needs no per-node flags.
func (af *agentFlags) selfDefaults(ctx context.Context, kube *nodes.Kube) error {
	if kube == nil || (af.nodeIP != "" && af.podCIDR != "") {
		return nil
	}
	self, err := kube.Self(ctx)
	if err != nil {
		return fmt.Errorf("--node-ip/--pod-cidr not given: %w", err)
	}
	if af.nodeIP == "" {
		af.nodeIP = self.NodeIP.String()
	}
	if af.podCIDR == "" {
		af.podCIDR = self.PodCIDR.String()
	}
	return nil
}

// publishVTEP writes this node's VTEP into Flannel's node annotations and
// hands it to the agent, which keeps it published.
func (af *agentFlags) publishVTEP(ctx context.Context, kube *nodes.Kube, cfg *agent.Config, log *slog.Logger) error {
	if kube == nil {
		return errors.New("--flannel-compat: needs the Kubernetes node source (--kubeconfig, or in-cluster)")
	}
	if af.port != 8472 {
		log.Warn("--flannel-compat without --vxlan-port 8472: Flannel nodes send to 8472 unless their net-conf.json sets Port", "vxlan_port", af.port)
	}
	uplink, err := netlink.LinkByName(cfg.Uplink)
	if err != nil {
		return fmt.Errorf("--uplink: %w", err)
	}
	if cfg.VTEP, err = agent.PublishVTEP(ctx, kube, uplink.Attrs().HardwareAddr, int(af.vni), cfg.NodeIP); err != nil {
		return fmt.Errorf("--flannel-compat: %w", err)
	}
	return nil
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

// nodeSource picks where the cluster's nodes come from: the nodes file, or
// the Kubernetes API (with --kubeconfig, or in a pod its service account).
// kube is the Kubernetes source, nil for the file.
func nodeSource(nodesFile, kubeconfig, nodeName string, log *slog.Logger) (src nodes.Source, kube *nodes.Kube, err error) {
	inCluster := os.Getenv("KUBERNETES_SERVICE_HOST") != ""
	switch {
	case nodesFile != "" && kubeconfig != "":
		return nil, nil, errors.New("--nodes, --kubeconfig: give one node source, not both")
	case nodesFile != "":
		f := &nodes.File{Path: nodesFile, Log: log}
		// A bad file at start is an error; on reload it is only logged.
		if _, err := f.Load(); err != nil {
			return nil, nil, fmt.Errorf("--nodes: %w", err)
		}
		return f, nil, nil
	case kubeconfig != "" || inCluster:
		client, err := nodes.NewKubeClient(kubeconfig)
		if err != nil {
			return nil, nil, fmt.Errorf("--kubeconfig: %w", err)
		}
		k := &nodes.Kube{Client: client, NodeName: nodeName, Log: log}
		return k, k, nil
	}
	return nil, nil, errors.New("--nodes or --kubeconfig: one is required (a JSON file listing the cluster's nodes, or the Kubernetes API)")
}

// uplinkFor names the interface holding ip, the node's NIC toward the others.
func uplinkFor(ip netip.Addr) (string, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("--uplink: list addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IP.Equal(ip.AsSlice()) {
			link, err := netlink.LinkByIndex(a.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("--uplink: interface of %s: %w", ip, err)
			}
			return link.Attrs().Name, nil
		}
	}
	return "", fmt.Errorf("--uplink: no interface holds the node IP %s; name one with --uplink", ip)
}
