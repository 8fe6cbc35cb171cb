// The status view: everything `patchcord status` shows, and the verdicts
// that make it healthy or broken.
package views

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/events"
)

// Status is what `status -o json` prints; field names are stable.
type Status struct {
	Root     string    `json:"root"`
	Loaded   bool      `json:"loaded"`
	Programs []Program `json:"programs"`
	// Config is absent when the datapath is not loaded.
	Config       *Config `json:"config,omitempty"`
	AgentRunning bool    `json:"agentRunning"`
	// Tracing is the datapath's trace flag; Monitoring whether a monitor
	// with traces runs. Tracing without Monitoring: a monitor crashed.
	Tracing      bool `json:"tracing"`
	NATDetection NAT  `json:"natDetection"`
	Monitoring   bool `json:"monitoring"`
	// AttachMode is the node's recorded attach backend, "" before the
	// first attach.
	AttachMode  string           `json:"attachMode"`
	Attachments AttachmentCounts `json:"attachments"`
	Endpoints   int              `json:"endpoints"`
	Nodes       int              `json:"nodes"`
	// NativeNodes is how many of Nodes are reached by routing, the rest
	// by VXLAN.
	NativeNodes int `json:"nativeNodes"`
	// Drops holds every drop counter by name (packets), DropTotal their sum.
	Drops      map[string]uint64 `json:"drops"`
	DropTotal  uint64            `json:"dropTotal"`
	EventsLost uint64            `json:"eventsLost"`
	// BGP lists the agent's BGP sessions (CollectBGP); absent without.
	BGP      []BGPNeighbor `json:"bgp,omitempty"`
	Healthy  bool          `json:"healthy"`
	Problems []string      `json:"problems"`
	Warnings []string      `json:"warnings"`

	// Kernel is the running kernel's release, Features what it has.
	Kernel   string            `json:"kernel"`
	Features datapath.Features `json:"features"`
}

// Program is a pinned program: its kernel ID and tag say which object
// version runs.
type Program struct {
	Name     string     `json:"name"`
	ID       uint32     `json:"id"`
	Tag      string     `json:"tag"`
	LoadedAt *time.Time `json:"loadedAt,omitempty"`
}

// Config is the node config the agent wrote.
type Config struct {
	// Configured is false until an agent has written the node config.
	Configured    bool   `json:"configured"`
	NodeIP        string `json:"nodeIP,omitempty"`
	Uplink        string `json:"uplink,omitempty"`
	UplinkIfindex int    `json:"uplinkIfindex,omitempty"`
	VNI           uint32 `json:"vni,omitempty"`
	VXLANPort     uint16 `json:"vxlanPort,omitempty"`
	PodMTU        int    `json:"podMTU,omitempty"`
}

// NAT says whether the datapath tells NATed connections from others on
// this kernel (it needs nf_conntrack's kfuncs), and if not, why.
type NAT struct {
	On  bool   `json:"on"`
	Why string `json:"why,omitempty"`
}

// AttachmentCounts counts attachment rows by status.
type AttachmentCounts struct {
	OK      int `json:"ok"`
	Stale   int `json:"stale"`
	Missing int `json:"missing"`
}

func (v *Status) problem(format string, args ...any) {
	v.Problems = append(v.Problems, fmt.Sprintf(format, args...))
}

func (v *Status) warn(format string, args ...any) {
	v.Warnings = append(v.Warnings, fmt.Sprintf(format, args...))
}

// CollectStatus looks at everything it can and notes what it cannot; it
// never fails, since a status that errors out shows nothing.
func CollectStatus(root string) (v Status) {
	v = Status{Root: root, Programs: []Program{}, Drops: map[string]uint64{}, Problems: []string{}, Warnings: []string{}}
	defer func() { v.Healthy = len(v.Problems) == 0 }()

	v.collectFeatures()

	dp, err := datapath.OpenPinned(root)
	if err != nil {
		v.problem("%v", err)
		return v
	}
	defer dp.Close()
	v.Loaded = true
	if err := natCheckLoaded(dp, &v.NATDetection); err != nil {
		v.problem("%v", err)
	}
	v.collectPrograms(dp)
	if m, err := dp.AttachMode(); err != nil {
		v.problem("%v", err)
	} else {
		v.AttachMode = string(m)
	}
	cfg := v.collectConfig(dp)
	v.collectProcesses()
	eps := v.collectTables(dp)
	v.collectAttachments(dp, eps, cfg)
	v.collectCounters(dp)
	return v
}

// collectFeatures probes the kernel; a missing required feature is a
// problem, since nothing loads there.
func (v *Status) collectFeatures() {
	v.Kernel, v.Features = datapath.KernelRelease(), datapath.ProbeFeatures()
	ct, _ := v.Features.Get(datapath.FeatureCTKfuncs)
	v.NATDetection = NAT{On: ct.Have, Why: ct.Why}
	if err := v.Features.Check(); err != nil {
		v.problem("%v", err)
	}
}

// collectPrograms fills in the pinned programs' IDs, tags and load times.
func (v *Status) collectPrograms(dp *datapath.Datapath) {
	boot, _ := events.BoottimeEpoch() // zero if unknown: no load times
	for _, pi := range datapath.Programs() {
		name := pi.Name
		p, err := dp.Program(name)
		if err != nil {
			v.problem("%s is not pinned under %s/progs: run the agent or a CNI ADD to load it", name, v.Root)
			continue
		}
		pv := Program{Name: name}
		if info, err := p.Info(); err == nil {
			if id, ok := info.ID(); ok {
				pv.ID = uint32(id)
			}
			pv.Tag = info.Tag
			// The load time counts on CLOCK_BOOTTIME.
			if d, ok := info.LoadTime(); ok && !boot.IsZero() {
				t := boot.Add(d).Truncate(time.Second)
				pv.LoadedAt = &t
			}
		}
		v.Programs = append(v.Programs, pv)
	}
}

// collectConfig fills in the node config and returns it.
func (v *Status) collectConfig(dp *datapath.Datapath) bpfmaps.Config {
	cfg, err := bpfmaps.NewConfig(&dp.Maps).Get()
	if err != nil {
		v.problem("%v", err)
	}
	cv := &Config{Configured: cfg.Configured()}
	v.Config = cv
	v.Tracing = cfg.Trace
	if !cv.Configured {
		return cfg
	}
	cv.NodeIP, cv.UplinkIfindex = cfg.NodeIP.String(), cfg.UplinkIfindex
	cv.VNI, cv.VXLANPort, cv.PodMTU = cfg.VNI, cfg.VXLANPort, cfg.PodMTU()
	if iface, err := net.InterfaceByIndex(cfg.UplinkIfindex); err == nil {
		cv.Uplink = iface.Name
	} else {
		v.problem("uplink (ifindex %d) not found in this network namespace: run status in the node's namespace, or restart the agent if the uplink was recreated", cfg.UplinkIfindex)
	}
	return cfg
}

// collectProcesses says whether the agent and a trace monitor run.
func (v *Status) collectProcesses() {
	running, err := agent.Running(v.Root)
	switch {
	case err != nil:
		v.problem("check agent: %v", err)
	case running:
		v.AgentRunning = true
	case v.Config.Configured:
		v.problem("agent not running: start `patchcord agent` (pods keep forwarding, but node changes and repairs wait for it)")
	default:
		v.warn("no agent has configured this node: cross-node traffic is not set up until `patchcord agent` runs")
	}

	if v.Monitoring, err = bpfmaps.TracersRunning(v.Root); err != nil {
		v.warn("check monitors: %v", err)
	} else if v.Tracing && !v.Monitoring {
		v.warn("tracing is on but no monitor runs (one crashed?): start and stop `patchcord monitor --type trace` to switch it off")
	}
}

// collectTables counts endpoints and nodes and returns the endpoints.
func (v *Status) collectTables(dp *datapath.Datapath) []bpfmaps.EndpointInfo {
	eps, err := bpfmaps.NewEndpoints(&dp.Maps).List()
	if err != nil {
		v.problem("%v", err)
	}
	v.Endpoints = len(eps)
	if nodes, err := bpfmaps.NewNodes(&dp.Maps).List(); err != nil {
		v.problem("%v", err)
	} else {
		v.Nodes = len(nodes)
		for _, n := range nodes {
			if n.Native {
				v.NativeNodes++
			}
		}
	}
	return eps
}

// collectAttachments judges every attachment row.
func (v *Status) collectAttachments(dp *datapath.Datapath, eps []bpfmaps.EndpointInfo, cfg bpfmaps.Config) {
	atts, err := dp.Attachments()
	if err != nil {
		v.problem("%v", err)
		return
	}
	rows := BuildProgRows(atts, eps, v.Config.Uplink, cfg.UplinkIfindex, ProgTag)
	var probs, warns []string
	v.Attachments, probs, warns = JudgeAttachments(rows, v.Config.Uplink)
	v.Problems = append(v.Problems, probs...)
	v.Warnings = append(v.Warnings, warns...)
}

// collectCounters sums the drop counters and reads events_lost.
func (v *Status) collectCounters(dp *datapath.Datapath) {
	counters, err := bpfmaps.NewStats(&dp.Maps).Read()
	if err != nil {
		v.problem("%v", err)
		return
	}
	for name, c := range counters {
		if strings.HasPrefix(name, "drop_") {
			v.Drops[name] = c.Packets
			v.DropTotal += c.Packets
		}
	}
	v.EventsLost = counters["events_lost"].Packets
}

// natCheckLoaded turns nat off where the kernel has the conntrack kfuncs
// but the pinned programs were loaded before, and keep the check off: their
// NATed replies bypass conntrack, which is a problem.
func natCheckLoaded(dp *datapath.Datapath, nat *NAT) error {
	if !nat.On {
		return nil
	}
	on, err := dp.NATCheckLoaded()
	if err != nil {
		return fmt.Errorf("check the loaded NAT check: %w", err)
	}
	if !on {
		*nat = NAT{Why: "the programs were loaded before nf_conntrack"}
		return errors.New("NATed replies bypass conntrack: the programs were loaded before nf_conntrack; a CNI ADD or an agent restart reloads them")
	}
	return nil
}

// JudgeAttachments counts attachment rows by status and says which are
// problems: a pod veth or the uplink without its current program. A stale
// link whose interface no longer exists breaks nothing; the agent removes it.
func JudgeAttachments(rows []Prog, uplink string) (n AttachmentCounts, problems, warnings []string) {
	for _, r := range rows {
		switch r.Status {
		case StatusOK:
			n.OK++
			continue
		case StatusStale:
			n.Stale++
		case StatusMissing:
			n.Missing++
		}
		owner := ""
		switch {
		case r.PodIP != "":
			owner = fmt.Sprintf(" (pod %s)", r.PodIP)
		case r.Ifname == uplink && uplink != "":
			owner = " (uplink)"
		}
		switch {
		case owner == "":
			warnings = append(warnings, fmt.Sprintf("%s link on %s is stale and serves no pod: the agent removes it", r.Program, r.Ifname))
		case r.Status == StatusMissing:
			problems = append(problems, fmt.Sprintf("%s is not attached to %s%s: the agent restores it within 10 s (is it running?)", r.Program, r.Ifname, owner))
		default:
			problems = append(problems, fmt.Sprintf("%s on %s%s is stale (interface recreated or old program): the agent replaces it within 10 s (is it running?)", r.Program, r.Ifname, owner))
		}
	}
	return n, problems, warnings
}
