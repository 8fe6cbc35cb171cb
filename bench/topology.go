// The datapaths under measurement, built once at start in one lab. Each gets
// node namespaces of its own, so that no two share an address, a route or a
// bridge (lab address plan: node N is 198.18.0.N, its pods 10.244.N.0/24).
package main

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// Lab node indices, one set per datapath or control-plane measurement.
const (
	nodePatchcordA, nodePatchcordB  = 1, 2
	nodeBridge                      = 3
	nodePTP                         = 4
	nodeFloorA, nodeFloorB          = 5, 6
	nodeHostGWA, nodeHostGWB        = 7, 8
	nodeFlannelA, nodeFlannelB      = 9, 10
	nodeLoadedA, nodeLoadedB        = 11, 12
	nodeCNIPatchcord, nodeCNIBridge = 13, 14
	nodeAgentSync                   = 15
	nodeBPFMinimal, nodeBPFLoaded   = 16, 17
	// The self-feeding BPF datapaths (see bpfcost.go).
	nodeBPFMinimalFeed, nodeBPFLoadedFeed = 18, 19
	// patchcord without its GRO device (--vxlan-gro=false).
	nodeNoGROA, nodeNoGROB = 20, 21
	// CNI ADD and DEL with the tc backend beside tcx's.
	nodeCNIPatchcordTC = 22
	// patchcord routing natively (--routing native), host-gw's peer.
	nodeNativeA, nodeNativeB = 23, 24
)

// Groups of datapaths, and what --only selects.
const (
	groupSame  = "same-node"
	groupCross = "cross-node"
	groupBPF   = "bpf"
	groupCNI   = "cni"
)

var allGroups = []string{groupSame, groupCross, groupBPF, groupCNI}

// Roles of the datapaths the others are compared with.
const (
	roleFloor   = "floor"
	roleCeiling = "ceiling"
	roleFlannel = "flannel"
)

// Scale of the loaded maps, as the issue asks.
const (
	scaleEndpoints = 1000
	scaleNodes     = 5000
)

// podMTU is the MTU of every same-node datapath and of both overlays: what a
// VXLAN overlay leaves of a 1500-byte uplink. host-gw carries no header and
// keeps 1500, as a real host-gw network does.
const podMTU = 1450

// host is where a client or a server runs: a pod, or for the floor a bare
// node namespace.
type host interface {
	Exec(ctx context.Context, name string, args ...string) ([]byte, error)
	Start(ctx context.Context, name string, args ...string) (*lab.Process, error)
}

// subject is a datapath under measurement: traffic goes from Client to
// ServerIP, an address of Server.
type subject struct {
	DatapathInfo
	Client, Server host
	ServerIP       netip.Addr
	// uplinks are the nodes whose uplinks the traffic crosses, set to
	// Links before each run.
	uplinks []*lab.Node
}

// builder adds nodes and pods to the lab and remembers what it made.
type builder struct {
	lab   *lab.Lab
	tools tools
	nodes map[int]*lab.Node
	// agents run on the patchcord nodes; loaded ones are stopped once their
	// maps are filled (see loadedPair).
	agents []*lab.Process
	// loaded is the patchcord pair with maps at scale, once built.
	loaded *pcPair
}

func newBuilder(l *lab.Lab, t tools) *builder {
	return &builder{lab: l, tools: t, nodes: map[int]*lab.Node{}}
}

// node returns lab node i, adding it on first use.
func (b *builder) node(i int) (*lab.Node, error) {
	if n, ok := b.nodes[i]; ok {
		return n, nil
	}
	n, err := b.lab.AddNode(i)
	if err != nil {
		return nil, err
	}
	b.nodes[i] = n
	return n, nil
}

// sameNode builds the same-node datapaths: the floor first, then patchcord
// (plain and with loaded maps), then the reference plugins.
func (b *builder) sameNode(ctx context.Context, pc, loaded *pcPair) ([]*subject, error) {
	var subjects []*subject
	floor, err := b.floor(ctx)
	if err != nil {
		return nil, err
	}
	subjects = append(subjects, floor,
		pc.subject(groupSame, "patchcord", "patchcord-cni primary mode + host-local, agent running (masquerade off); from_pod redirects with bpf_redirect_peer"),
		loaded.subject(groupSame, loadedName, loadedSetup))
	for _, c := range []struct {
		name, network, setup string
		index                int
		conf                 func(*lab.Node) []byte
	}{
		{"bridge + host-local", "bridge", "reference bridge plugin: cni0 bridge as the pods' gateway, host-local; br_netfilter at the kernel's default (on), as kube-proxy needs it", nodeBridge,
			func(n *lab.Node) []byte { return e2e.BridgeConflist(n, "bridge", podMTU) }},
		{"ptp + host-local", "ptp", "reference ptp plugin: veth per pod, /32 host routes, host-local", nodePTP,
			func(n *lab.Node) []byte { return e2e.PTPConflist(n, "ptp", podMTU) }},
	} {
		n, err := b.node(c.index)
		if err != nil {
			return nil, err
		}
		if err := n.WriteConflist(c.network, c.conf(n)); err != nil {
			return nil, err
		}
		s, err := podSubject(ctx, DatapathInfo{Group: groupSame, Name: c.name, Setup: c.setup}, n, n, c.network)
		if err != nil {
			return nil, err
		}
		subjects = append(subjects, s)
	}
	return subjects, nil
}

// floor joins two namespaces with one veth pair, addresses on both ends:
// the least any same-node datapath can do.
func (b *builder) floor(ctx context.Context) (*subject, error) {
	na, nb, err := b.pair(nodeFloorA, nodeFloorB)
	if err != nil {
		return nil, err
	}
	// Addresses from node A's pod CIDR, so the lab's address plan holds.
	base := na.PodCIDR.Addr().As4()
	ipA := netip.AddrFrom4([4]byte{base[0], base[1], base[2], 1})
	ipB := netip.AddrFrom4([4]byte{base[0], base[1], base[2], 2})
	mtu := fmt.Sprint(podMTU)
	// `ip` runs inside node A's namespace and creates the peer directly in
	// node B's: no link ever exists in the root namespace.
	steps := []struct {
		n    *lab.Node
		args []string
	}{
		{na, []string{"link", "add", "floor0", "mtu", mtu, "type", "veth", "peer", "name", "floor1", "mtu", mtu, "netns", nb.NetNS}},
		{na, []string{"addr", "add", ipA.String() + "/24", "dev", "floor0"}},
		{nb, []string{"addr", "add", ipB.String() + "/24", "dev", "floor1"}},
		{na, []string{"link", "set", "floor0", "up"}},
		{nb, []string{"link", "set", "floor1", "up"}},
	}
	for _, s := range steps {
		if _, err := s.n.Exec(ctx, "ip", s.args...); err != nil {
			return nil, fmt.Errorf("build veth floor: %w", err)
		}
	}
	return &subject{
		DatapathInfo: DatapathInfo{Group: groupSame, Name: "veth pair (floor)", Role: roleFloor,
			Setup: "two namespaces joined by one veth pair (MTU 1450, as every same-node datapath here), addresses on both ends, no host in between"},
		Client: na, Server: nb, ServerIP: ipB,
	}, nil
}

// crossNode builds the cross-node datapaths: host-gw (the ceiling), the
// kernel's vxlan set up as Flannel does, and patchcord.
func (b *builder) crossNode(ctx context.Context, pc, loaded *pcPair) ([]*subject, error) {
	hostgw, err := b.hostGW(ctx)
	if err != nil {
		return nil, err
	}
	flannel, err := b.flannel(ctx)
	if err != nil {
		return nil, err
	}
	noGRO, err := b.patchcordPair(ctx, nodeNoGROA, nodeNoGROB, 0, "--vxlan-gro=false")
	if err != nil {
		return nil, err
	}
	native, err := b.patchcordPair(ctx, nodeNativeA, nodeNativeB, 0, "--routing", "native")
	if err != nil {
		return nil, err
	}
	return []*subject{
		hostgw, flannel,
		pc.crossSubject(groupCross, "patchcord", "patchcord-cni primary mode + host-local, agents running (masquerade off); VXLAN (port 4789) built and stripped in eBPF, MTU 1450; the agent's idle vxlan device pc-gro0 holds the port so that GRO merges"),
		loaded.crossSubject(groupCross, loadedName, loadedSetup),
		noGRO.crossSubject(groupCross, noGROName, "as patchcord, agents with --vxlan-gro=false: no socket owns the VXLAN port, so GRO cannot merge VXLAN"),
		native.crossSubject(groupCross, nativeName, "as patchcord, agents with --routing native: no tunnel, the agent routes each pod CIDR via its node as host-gw does; from_pod sends by bpf_fib_lookup straight out of the uplink, from_uplink hands packets to the pod; pod MTU 1500"),
	}, nil
}

// hostGW routes each node's pod CIDR via the other node's IP: no
// encapsulation, the most an overlay can hope to match.
func (b *builder) hostGW(ctx context.Context) (*subject, error) {
	na, nb, err := b.pair(nodeHostGWA, nodeHostGWB)
	if err != nil {
		return nil, err
	}
	for _, p := range [][2]*lab.Node{{na, nb}, {nb, na}} {
		if _, err := p[0].Exec(ctx, "ip", "route", "add", p[1].PodCIDR.String(), "via", p[1].IP.String(), "dev", "eth0"); err != nil {
			return nil, fmt.Errorf("build host-gw: %w", err)
		}
		if err := p[0].WriteConflist("ptp", e2e.PTPConflist(p[0], "ptp", 1500)); err != nil {
			return nil, err
		}
	}
	return podSubject(ctx, DatapathInfo{Group: groupCross, Name: "host-gw (ceiling)", Role: roleCeiling,
		Setup: "route <peer pod CIDR> via <peer node IP>, no encapsulation; ptp + host-local pods, MTU 1500"}, na, nb, "ptp")
}

// flannel builds two Flannel vxlan nodes: flannel.1 (VNI 1, port 8472,
// nolearning, MTU 1450) with a route, neighbour and FDB entry per peer, and
// pods on a cni0 bridge, which is what Flannel's CNI plugin delegates to.
func (b *builder) flannel(ctx context.Context) (*subject, error) {
	na, nb, err := b.pair(nodeFlannelA, nodeFlannelB)
	if err != nil {
		return nil, err
	}
	vteps := map[*lab.Node]lab.VXLANPeer{}
	for _, n := range []*lab.Node{na, nb} {
		mac, err := n.AddFlannel()
		if err != nil {
			return nil, err
		}
		vteps[n] = lab.VXLANPeer{PodCIDR: n.PodCIDR, NodeIP: n.IP, VtepMAC: mac}
		if err := n.WriteConflist("flannel", e2e.BridgeConflist(n, "flannel", podMTU)); err != nil {
			return nil, err
		}
	}
	if err := na.AddVXLANPeer(lab.FlannelDevice, vteps[nb]); err != nil {
		return nil, err
	}
	if err := nb.AddVXLANPeer(lab.FlannelDevice, vteps[na]); err != nil {
		return nil, err
	}
	return podSubject(ctx, DatapathInfo{Group: groupCross, Name: "flannel vxlan", Role: roleFlannel,
		Setup: "kernel vxlan flannel.1 (VNI 1, port 8472, nolearning, MTU 1450) + per-peer route/neigh/fdb; pods on a cni0 bridge (bridge plugin, as Flannel's CNI delegates)"}, na, nb, "flannel")
}

func (b *builder) pair(i, j int) (*lab.Node, *lab.Node, error) {
	ni, err := b.node(i)
	if err != nil {
		return nil, nil, err
	}
	nj, err := b.node(j)
	if err != nil {
		return nil, nil, err
	}
	return ni, nj, nil
}

// podSubject is the datapath info measured between a new client pod on nc
// and a new server pod on ns.
func podSubject(ctx context.Context, info DatapathInfo, nc, ns *lab.Node, network string) (*subject, error) {
	client, server, err := twoPods(ctx, nc, ns, network)
	if err != nil {
		return nil, err
	}
	s := &subject{DatapathInfo: info, Client: client, Server: server, ServerIP: server.IP}
	if nc != ns {
		s.uplinks = []*lab.Node{nc, ns}
	}
	return s, nil
}

// twoPods adds a client pod on nc and a server pod on ns.
func twoPods(ctx context.Context, nc, ns *lab.Node, network string) (client, server *lab.Pod, err error) {
	if client, err = nc.AddPod(ctx, "client", network); err != nil {
		return nil, nil, err
	}
	if server, err = ns.AddPod(ctx, "server", network); err != nil {
		return nil, nil, err
	}
	return client, server, nil
}

// Names of the patchcord variant whose maps hold the scale, and of
// the one without the GRO device.
const (
	nativeName  = "patchcord, --routing native"
	noGROName   = "patchcord, --vxlan-gro=false"
	loadedName  = "patchcord, 1k endpoints + 5k nodes"
	loadedSetup = "as patchcord, with 1,000 endpoints and 5,000 nodes in each node's maps (5,000 routes in the node); agents stopped once synced, the datapath stays"
)

// pcPair is two patchcord nodes with agents: pods client and server on A,
// server on B.
type pcPair struct {
	a, b            *lab.Node
	client, local   *lab.Pod // on a
	remote          *lab.Pod // on b
	nodesFile       string
	syncA, syncB    time.Duration // agent start to ready
	fakeNodes       int
	fakeEndpointsOn map[int]int // node index -> fake endpoints registered
}

func (p *pcPair) subject(group, name, setup string) *subject {
	return &subject{DatapathInfo: DatapathInfo{Group: group, Name: name, Setup: setup},
		Client: p.client, Server: p.local, ServerIP: p.local.IP}
}

func (p *pcPair) crossSubject(group, name, setup string) *subject {
	return &subject{DatapathInfo: DatapathInfo{Group: group, Name: name, Setup: setup},
		Client: p.client, Server: p.remote, ServerIP: p.remote.IP, uplinks: []*lab.Node{p.a, p.b}}
}

// patchcordPair builds nodes i and j with agents (given agentArgs), whose
// nodes file lists both and fake nodes more, and the pods.
func (b *builder) patchcordPair(ctx context.Context, i, j, fake int, agentArgs ...string) (*pcPair, error) {
	na, nb, err := b.pair(i, j)
	if err != nil {
		return nil, err
	}
	p := &pcPair{a: na, b: nb, fakeNodes: fake, fakeEndpointsOn: map[int]int{},
		nodesFile: filepath.Join(b.lab.Dir, fmt.Sprintf("nodes-%d-%d.json", i, j))}
	entries := append([]nodes.Entry{e2e.EntryOf(na), e2e.EntryOf(nb)}, fakeNodes(fake)...)
	if err := nodes.WriteFile(p.nodesFile, entries); err != nil {
		return nil, err
	}
	// Masquerade off: none of the reference datapaths masquerades either,
	// and pod-to-pod traffic is never translated.
	for _, n := range []*lab.Node{na, nb} {
		agent, took, err := startAgent(ctx, n, p.nodesFile, append([]string{"--masquerade=false"}, agentArgs...)...)
		if err != nil {
			return nil, err
		}
		b.agents = append(b.agents, agent)
		if n == na {
			p.syncA = took
		} else {
			p.syncB = took
		}
		if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
			return nil, err
		}
	}
	if p.client, p.local, err = twoPods(ctx, na, na, "patchcord"); err != nil {
		return nil, err
	}
	if p.remote, err = nb.AddPod(ctx, "remote", "patchcord"); err != nil {
		return nil, err
	}
	return p, nil
}

// loadedPair is a patchcord pair whose maps hold scaleEndpoints endpoints
// and scaleNodes remote nodes on each node. The endpoints are registered
// straight into the pinned maps; they have no veth, so the agents, which
// would remove them as stale within 10 s, are stopped first. The datapath
// needs no agent to forward.
func (b *builder) loadedPair(ctx context.Context) (*pcPair, error) {
	// Each node's map holds the other node plus the fake ones.
	p, err := b.patchcordPair(ctx, nodeLoadedA, nodeLoadedB, scaleNodes-1)
	if err != nil {
		return nil, err
	}
	for _, n := range []*lab.Node{p.a, p.b} {
		if err := stopAgent(b.agents, n); err != nil {
			return nil, err
		}
		added, err := fillEndpoints(n.BpffsRoot, scaleEndpoints)
		if err != nil {
			return nil, err
		}
		p.fakeEndpointsOn[n.Index] = added
	}
	return p, nil
}

// stopAgent stops the agent running on n (SIGTERM: it leaves the datapath).
func stopAgent(agents []*lab.Process, n *lab.Node) error {
	for _, a := range agents {
		if a.NetNS == n.NetNS {
			return a.Stop()
		}
	}
	return fmt.Errorf("no agent on node %d", n.Index)
}

// startAgent runs `patchcord agent` on n (warnings only) and returns once
// its ready file appears (the first node sync is done), with the time from
// start to ready.
func startAgent(ctx context.Context, n *lab.Node, nodesFile string, extra ...string) (*lab.Process, time.Duration, error) {
	start := time.Now()
	args := e2e.AgentArgs(n, nodesFile, append([]string{"--log-level", "warn"}, extra...)...)
	agent, err := e2e.Launch(ctx, n, "agent", e2e.ReadyFile(n), 3*time.Minute, args...)
	return agent, time.Since(start), err
}

// fakeNode is the i-th node that exists only in nodes files and maps: its
// pod CIDR lies outside the lab's 10.244.0.0/16 and its IP outside the
// fabric's 198.18.0.0/24, so no lab packet is ever routed to it.
func fakeNode(i int) nodes.Entry {
	return nodes.Entry{
		Name:    fmt.Sprintf("fake%d", i),
		NodeIP:  fmt.Sprintf("198.18.%d.%d", 1+i/250, 1+i%250),
		PodCIDR: fmt.Sprintf("10.%d.%d.0/24", 100+i/256, i%256),
	}
}

func fakeNodes(count int) []nodes.Entry {
	out := make([]nodes.Entry, count)
	for i := range out {
		out[i] = fakeNode(i)
	}
	return out
}
