// Package agent is the node agent: it configures the uplink side of the
// datapath, keeps the remote-node map and routes in step with a node source,
// and repairs endpoints and attachments. The datapath's state is in the
// kernel, not in the agent: killed at any moment, it leaves a working
// datapath, and the next start reconciles. What it keeps in memory is a
// cache of what it applied, so that a node change costs only itself.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
)

// Config is the agent's command line.
type Config struct {
	Uplink    string
	NodeIP    netip.Addr
	PodCIDR   netip.Prefix
	VNI       uint32
	VXLANPort uint16
	BpffsRoot string
	// Routing is how remote nodes' pods are reached where the node source
	// does not say (nodes.Tunnel when empty). With nodes.Native, pods get
	// the uplink's whole MTU.
	Routing nodes.Routing
	// NoVXLANGRO leaves the VXLAN port without the GRO device (grosock.go)
	// and removes one a previous start left.
	NoVXLANGRO bool
	// Masquerade SNATs pod traffic leaving the cluster to the node's
	// address; ClusterCIDR, when set, is what "the cluster" is (otherwise
	// every known pod CIDR).
	Masquerade  bool
	ClusterCIDR netip.Prefix
	// ReadyFile, when set, is written once the first sync is done, so that
	// tests and init systems wait on a signal instead of a sleep.
	ReadyFile string
	// ReconcileEvery repairs endpoints and attachments periodically.
	ReconcileEvery time.Duration
	// NodeResyncEvery is how often the node sync reads the kernel again
	// instead of applying only what changed (checked every ReconcileEvery).
	NodeResyncEvery time.Duration
	// EventRate and EventBurst limit drop events per CPU and reason
	// (events/s, burst); 0 leaves the datapath's defaults.
	EventRate, EventBurst uint32
	// OnSyncError, when set, is called with every failed node sync, so
	// that the metrics can count what the log reports.
	OnSyncError func(error)
	// AttachMode is the attach backend asked for (datapath.AttachAuto
	// when empty); MigrateAttachMode moves existing attachments to it
	// instead of refusing a node recorded with the other.
	AttachMode        datapath.AttachMode
	MigrateAttachMode bool
	// VTEP, when set, is this node's VTEP in Flannel's annotations
	// (PublishVTEP), published again whenever a node set shows it lost.
	VTEP *VTEP
}

// Validate checks what can be checked without the kernel; errors name the flag.
func (c *Config) Validate() error {
	switch {
	case c.Uplink == "":
		return errors.New("--uplink: required (the node's NIC toward other nodes)")
	case !c.NodeIP.Is4():
		return fmt.Errorf("--node-ip: %q is not an IPv4 address", c.NodeIP)
	case !c.PodCIDR.IsValid() || !c.PodCIDR.Addr().Is4():
		return fmt.Errorf("--pod-cidr: %q is not an IPv4 CIDR", c.PodCIDR)
	case c.VNI == 0 || c.VNI > 1<<24-1:
		return fmt.Errorf("--vni: %d is out of range 1..16777215", c.VNI)
	case c.VXLANPort == 0:
		return errors.New("--vxlan-port: 0 is not a port")
	case c.Routing != nodes.RoutingDefault && c.Routing != nodes.Tunnel && c.Routing != nodes.Native && c.Routing != nodes.Auto:
		return fmt.Errorf("--routing: %q is not tunnel, native or auto", c.Routing)
	case c.ClusterCIDR.IsValid() && (!c.ClusterCIDR.Addr().Is4() || !c.ClusterCIDR.Contains(c.PodCIDR.Addr())):
		return fmt.Errorf("--cluster-cidr: %s must be IPv4 and contain --pod-cidr %s", c.ClusterCIDR, c.PodCIDR)
	}
	return nil
}

// Agent runs one node.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	dp     *datapath.Datapath
	uplink netlink.Link
	eps    *bpfmaps.Endpoints
	nodes  *bpfmaps.Nodes
	// synced caches what the last node sync applied, masq the masquerade
	// sets; set is the node set last received, for a periodic full sync.
	synced synced
	masq   masqSets
	set    []nodes.Node
	// tunnel: from_tunnel is meant to be on the GRO device (it held the
	// port when the agent started).
	tunnel bool
	// subnet is the uplink's subnet holding NodeIP: the nodes that
	// nodes.Auto reaches natively.
	subnet netip.Prefix
}

// Run sets the node up, then follows src until ctx ends. The datapath stays
// when it returns.
func Run(ctx context.Context, cfg Config, src nodes.Source, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if cfg.ReconcileEvery == 0 {
		cfg.ReconcileEvery = 10 * time.Second
	}
	if cfg.NodeResyncEvery == 0 {
		cfg.NodeResyncEvery = 5 * time.Minute
	}
	uplink, err := netlink.LinkByName(cfg.Uplink)
	if err != nil {
		return fmt.Errorf("--uplink: %w", err)
	}
	subnet, err := nodeSubnet(uplink, cfg.NodeIP)
	if err != nil {
		return err
	}
	dp, err := datapath.Open(cfg.BpffsRoot, log)
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := useAttachMode(dp, cfg, log); err != nil {
		return err
	}
	unlock, err := Lock(cfg.BpffsRoot)
	if err != nil {
		return err
	}
	defer unlock()
	a := &Agent{cfg: cfg, log: log, dp: dp, uplink: uplink, eps: bpfmaps.NewEndpoints(&dp.Maps), nodes: bpfmaps.NewNodes(&dp.Maps), subnet: subnet}

	if err := a.setupUplink(); err != nil {
		return err
	}
	// After from_uplink is attached: the device's socket must never see what
	// from_uplink takes.
	a.setupTunnel(ensureGRODevice(cfg.VXLANPort, cfg.NoVXLANGRO, log))
	if err := a.reconcile(); err != nil {
		log.Error("reconcile endpoints", "err", err)
	}
	if !cfg.Masquerade {
		if err := removeMasquerade(); err != nil {
			return err
		}
	}
	return a.follow(ctx, src)
}

// useAttachMode applies --attach-mode, migrating with --migrate-attach-mode.
func useAttachMode(dp *datapath.Datapath, cfg Config, log *slog.Logger) error {
	want := cfg.AttachMode
	if want == "" {
		want = datapath.AttachAuto
	}
	set := dp.SetAttachMode
	if cfg.MigrateAttachMode {
		set = dp.MigrateAttachMode
	}
	mode, err := set(want, log)
	if err != nil {
		return fmt.Errorf("--attach-mode: %w", err)
	}
	log.Info("attach mode", "mode", mode)
	return nil
}

// follow syncs every node set src sends and reconciles endpoints
// periodically, until ctx ends or src fails.
func (a *Agent) follow(ctx context.Context, src nodes.Source) error {
	updates := make(chan []nodes.Node)
	srcErr := make(chan error, 1)
	srcCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { srcErr <- src.Run(srcCtx, updates) }()

	tick := time.NewTicker(a.cfg.ReconcileEvery)
	defer tick.Stop()
	ready := false
	// apply syncs set and writes the ready file after the first success.
	apply := func(set []nodes.Node) error {
		if a.sync(set) != nil || ready {
			return nil
		}
		ready = true
		if a.cfg.ReadyFile == "" {
			return nil
		}
		if err := os.WriteFile(a.cfg.ReadyFile, []byte("ready\n"), 0o644); err != nil {
			return fmt.Errorf("write ready file: %w", err)
		}
		return nil
	}
	for {
		select {
		case set := <-updates:
			if a.cfg.VTEP != nil {
				a.cfg.VTEP.keep(ctx)
			}
			a.set = set
			if err := apply(set); err != nil {
				return err
			}
		case <-tick.C:
			if err := a.reconcile(); err != nil {
				a.log.Error("reconcile endpoints", "err", err)
			}
			if err := a.repairHooks(); err != nil {
				a.log.Error("restore the node's attachments", "err", err)
			}
			// A failed sync is tried again here, in full, as is any
			// sync once NodeResyncEvery has passed.
			if a.set != nil && a.resyncDue() {
				a.synced = synced{}
				if err := apply(a.set); err != nil {
					return err
				}
			}
		case err := <-srcErr:
			if err != nil {
				return fmt.Errorf("node source: %w", err)
			}
			return nil
		case <-ctx.Done():
			a.log.Info("stopping; the datapath stays in place")
			return nil
		}
	}
}

// sync runs one node sync and reports its failure.
func (a *Agent) sync(set []nodes.Node) error {
	_, err := a.syncNodes(set)
	if err != nil {
		a.log.Error("sync nodes", "err", err)
		if a.cfg.OnSyncError != nil {
			a.cfg.OnSyncError(err)
		}
	}
	return err
}

// nodeSubnet finds nodeIP on the uplink and returns its subnet.
func nodeSubnet(uplink netlink.Link, nodeIP netip.Addr) (netip.Prefix, error) {
	addrs, err := netlink.AddrList(uplink, netlink.FAMILY_V4)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("list addresses of %s: %w", uplink.Attrs().Name, err)
	}
	for _, a := range addrs {
		if a.IP.Equal(nodeIP.AsSlice()) {
			ones, _ := a.Mask.Size()
			return netip.PrefixFrom(nodeIP, ones).Masked(), nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("--node-ip: %s is not an address of %s: tunnels would carry a source no peer replies to", nodeIP, uplink.Attrs().Name)
}

// setupUplink writes the node config and attaches the uplink programs.
func (a *Agent) setupUplink() error {
	attrs := a.uplink.Attrs()
	cfgMap := bpfmaps.NewConfig(&a.dp.Maps)
	old, err := cfgMap.Get()
	if err != nil {
		return err
	}
	// Pods keep room for the tunnel unless no node is meant to need it.
	// A node a source sets to tunnel then costs its packets a detour:
	// from_pod leaves those longer than the tunnel carries to the stack,
	// whose route MTU answers with "fragmentation needed".
	cfg := bpfmaps.Config{
		NodeIP:        a.cfg.NodeIP,
		UplinkIfindex: attrs.Index,
		UplinkMAC:     attrs.HardwareAddr,
		VXLANPort:     a.cfg.VXLANPort,
		VNI:           a.cfg.VNI,
		TunnelMTU:     attrs.MTU - datapath.VXLANOverhead,
		PodUplinkMTU:  a.cfg.Routing == nodes.Native,
		Trace:         old.Trace,  // a running monitor keeps its traces
		Native:        old.Native, // until the first node sync decides
		EventRate:     a.cfg.EventRate,
		EventBurst:    a.cfg.EventBurst,
	}
	if err := cfgMap.Put(cfg); err != nil {
		return err
	}
	for _, prog := range []string{datapath.FromUplink, datapath.ToUplink} {
		if err := a.dp.Attach(prog, attrs.Name, a.log); err != nil {
			return err
		}
	}
	// Forwarding carries what the fast path hands to the stack: services,
	// host-routed traffic to remote pods.
	if err := ip.EnableIP4Forward(); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	a.log.Info("uplink ready", "uplink", attrs.Name, "node_ip", a.cfg.NodeIP, "vni", a.cfg.VNI, "vxlan_port", a.cfg.VXLANPort, "pod_mtu", cfg.PodMTU(),
		"routing", a.routing(), "subnet", a.subnet)
	return nil
}

// repairHooks restores the node's own attachments where one is missing or
// stale: detached by hand (bpftool, tc filter del), or gone with the GRO
// device someone deleted. Without from_uplink the node's pods receive no
// VXLAN; without to_uplink nothing stops a pod's forged VXLAN at the
// uplink; without from_tunnel reassembled VXLAN is dropped.
func (a *Agent) repairHooks() error {
	var errs []error
	uplink := a.uplink.Attrs().Name
	for _, prog := range []string{datapath.FromUplink, datapath.ToUplink} {
		if err := a.dp.Attached(prog, uplink); err != nil {
			a.log.Warn("restoring the uplink's attachment", "prog", prog, "ifname", uplink, "found", err)
			errs = append(errs, a.dp.Attach(prog, uplink, a.log))
		}
	}
	if !a.tunnel {
		return errors.Join(errs...)
	}
	if err := a.dp.Attached(datapath.FromTunnel, GRODevice); err != nil {
		a.log.Warn("restoring the GRO device and its attachment", "prog", datapath.FromTunnel, "ifname", GRODevice, "found", err)
		a.setupTunnel(ensureGRODevice(a.cfg.VXLANPort, a.cfg.NoVXLANGRO, a.log))
	}
	return errors.Join(errs...)
}

// repairs is what one reconcile pass found to do, from a scan without the
// endpoint lock.
type repairs struct {
	gone    []bpfmaps.EndpointInfo // endpoints whose veth is gone or recreated
	restore []bpfmaps.EndpointInfo // endpoints without a current from_pod link
	orphans []datapath.Attachment  // from_pod links without an endpoint
	ipv6    []bpfmaps.EndpointInfo // host veths with IPv6 on (set up before v0.2)
}

// reconcile removes endpoints whose veth is gone, restores missing or stale
// from_pod attachments and detaches links no endpoint owns. The scan runs
// without the endpoint lock, so that ADDs are not held up by it; whatever
// it finds is checked again under the lock before anything is touched,
// because an ADD or DEL may have changed it in between.
func (a *Agent) reconcile() error {
	r, err := a.scan()
	if err != nil || len(r.gone)+len(r.restore)+len(r.orphans)+len(r.ipv6) == 0 {
		return err
	}
	unlock, err := a.dp.LockEndpoints()
	if err != nil {
		return err
	}
	defer unlock()
	return a.repair(r)
}

func (a *Agent) scan() (repairs, error) {
	var r repairs
	list, err := a.eps.List()
	if err != nil {
		return r, err
	}
	owned := make(map[string]bool, len(list))
	var errs []error
	for _, ep := range list {
		owned[ep.Ifname] = true
		gone, err := vethGone(ep)
		switch {
		case err != nil:
			errs = append(errs, err)
		case gone:
			r.gone = append(r.gone, ep)
		case a.dp.Attached(datapath.FromPod, ep.Ifname) != nil:
			r.restore = append(r.restore, ep)
		}
		if !gone && err == nil && ipv6off.Check(ep.Ifname) != nil {
			r.ipv6 = append(r.ipv6, ep)
		}
	}
	atts, err := a.dp.Attachments()
	if err != nil {
		return r, errors.Join(append(errs, err)...)
	}
	for _, at := range atts {
		if at.Program == datapath.FromPod && !owned[at.Ifname] {
			r.orphans = append(r.orphans, at)
		}
	}
	return r, errors.Join(errs...)
}

// vethGone reports whether ep's host veth no longer exists as registered:
// deleted, or recreated with another ifindex.
func vethGone(ep bpfmaps.EndpointInfo) (bool, error) {
	link, err := netlink.LinkByName(ep.Ifname)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up veth %s: %w", ep.Ifname, err)
	}
	return link.Attrs().Index != ep.Ifindex, nil
}

// repair acts on what scan found, each item only if it still holds now that
// the endpoint lock keeps ADD and DEL out: the endpoint is still there on
// the same ifindex, the link still has no endpoint.
func (a *Agent) repair(r repairs) error {
	list, err := a.eps.List()
	if err != nil {
		return err
	}
	byIP := make(map[netip.Addr]bpfmaps.EndpointInfo, len(list))
	owners := make(map[string]int, len(list))
	for _, ep := range list {
		byIP[ep.IP] = ep
		owners[ep.Ifname]++
	}
	same := func(ep bpfmaps.EndpointInfo) bool {
		cur, ok := byIP[ep.IP]
		return ok && cur.Ifindex == ep.Ifindex && cur.Ifname == ep.Ifname
	}
	var errs []error
	for _, ep := range r.gone {
		if gone, err := vethGone(ep); err != nil || !gone || !same(ep) {
			continue
		}
		a.log.Info("removing endpoint whose veth is gone", "pod_ip", ep.IP, "ifname", ep.Ifname)
		if owners[ep.Ifname] == 1 {
			errs = append(errs, a.dp.Detach(datapath.FromPod, ep.Ifname))
		}
		errs = append(errs, a.eps.DeleteIfOwned(ep.IP, ep.Ifindex))
	}
	for _, ep := range r.restore {
		if gone, err := vethGone(ep); err != nil || gone || !same(ep) || a.dp.Attached(datapath.FromPod, ep.Ifname) == nil {
			continue
		}
		a.log.Info("restoring from_pod attachment", "pod_ip", ep.IP, "ifname", ep.Ifname)
		errs = append(errs, a.dp.Attach(datapath.FromPod, ep.Ifname, a.log))
	}
	for _, ep := range r.ipv6 {
		if gone, err := vethGone(ep); err != nil || gone || !same(ep) {
			continue
		}
		// A pod added by a release that left IPv6 on its host veth could
		// reach the node's services on [::] past from_pod.
		a.log.Info("turning IPv6 off on a pod's host veth", "pod_ip", ep.IP, "ifname", ep.Ifname)
		errs = append(errs, ipv6off.Disable(ep.Ifname))
	}
	for _, at := range r.orphans {
		// A DEL since the scan may have taken it already.
		if _, err := os.Stat(at.Pin); err != nil || owners[at.Ifname] > 0 {
			continue
		}
		a.log.Info("removing attachment without endpoint", "ifname", at.Ifname)
		errs = append(errs, a.dp.Detach(datapath.FromPod, at.Ifname))
	}
	return errors.Join(errs...)
}
