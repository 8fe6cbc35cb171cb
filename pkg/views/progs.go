// Package views is what an operator is shown about a node's datapath: the
// status view with its health verdicts, attachment rows, endpoint and node
// rows. The JSON tags are an interface (`-o json`, the tests, the bench):
// field names are stable. cmd/patchcord renders these; it decides nothing.
package views

import (
	"net"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// Attachment statuses.
const (
	StatusOK      = "ok"      // the current program runs on the interface
	StatusStale   = "stale"   // pinned, but the interface is gone or recreated, or the program is old
	StatusMissing = "missing" // a pod veth or the uplink has no pinned link at all
)

// Prog is one row of `bpf prog list`; JSON field names are stable.
type Prog struct {
	Ifname    string `json:"ifname"`
	Ifindex   int    `json:"ifindex"`
	Direction string `json:"direction"`
	Program   string `json:"program"`
	ProgID    uint32 `json:"progID"`
	Tag       string `json:"tag"`
	LinkID    uint32 `json:"linkID"`
	// Mode is the attach backend (datapath.AttachTCX or AttachTC); ""
	// on a missing row. Yielded: tc mode left the veth's ingress qdisc
	// slot to the bandwidth plugin, and the host stack polices the pod.
	Mode    string `json:"mode"`
	Yielded bool   `json:"yielded,omitempty"`
	Pin     string `json:"pin"`
	Status  string `json:"status"`
	// PodIP names the endpoint a from_pod row belongs to, when one does.
	PodIP string `json:"podIP,omitempty"`
}

// progIndex orders programs as the datapath lists them (from its ELF).
func progIndex(name string) int {
	return slices.IndexFunc(datapath.Programs(), func(p datapath.ProgramInfo) bool { return p.Name == name })
}

// direction is where the program name attaches: "ingress" or "egress".
func direction(name string) string {
	if i := progIndex(name); i >= 0 {
		return datapath.Programs()[i].Direction()
	}
	return ""
}

// ProgRows lists the pinned attachments plus a "missing" row for each
// interface that should have a program and has none: every endpoint's veth,
// and the uplink once an agent has configured one.
func ProgRows(dp *datapath.Datapath) ([]Prog, error) {
	atts, err := dp.Attachments()
	if err != nil {
		return nil, err
	}
	eps, err := bpfmaps.NewEndpoints(&dp.Maps).List()
	if err != nil {
		return nil, err
	}
	cfg, err := bpfmaps.NewConfig(&dp.Maps).Get()
	if err != nil {
		return nil, err
	}
	uplink := ""
	if cfg.Configured() {
		if iface, err := net.InterfaceByIndex(cfg.UplinkIfindex); err == nil {
			uplink = iface.Name
		}
	}
	return BuildProgRows(atts, eps, uplink, cfg.UplinkIfindex, ProgTag), nil
}

// BuildProgRows is ProgRows without the kernel: tag looks up a program's tag
// by ID.
func BuildProgRows(atts []datapath.Attachment, eps []bpfmaps.EndpointInfo, uplink string, uplinkIfindex int, tag func(ebpf.ProgramID) string) []Prog {
	podIP := make(map[string]string, len(eps))
	for _, ep := range eps {
		if ep.Ifname != "" {
			podIP[ep.Ifname] = ep.IP.String()
		}
	}
	have := make(map[[2]string]bool, len(atts))
	rows := make([]Prog, 0, len(atts))
	for _, a := range atts {
		have[[2]string{a.Program, a.Ifname}] = true
		rows = append(rows, attachedRow(a, podIP, tag))
	}
	missing := func(prog, ifname string, ifindex int, ip string) {
		if have[[2]string{prog, ifname}] {
			return
		}
		rows = append(rows, Prog{Ifname: ifname, Ifindex: ifindex, Direction: direction(prog), Program: prog, Status: StatusMissing, PodIP: ip})
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
	slices.SortStableFunc(rows, func(a, b Prog) int {
		if c := progIndex(a.Program) - progIndex(b.Program); c != 0 {
			return c
		}
		return strings.Compare(a.Ifname, b.Ifname)
	})
	return rows
}

// attachedRow is the row of a pinned link; podIP maps veths to pod IPs.
func attachedRow(a datapath.Attachment, podIP map[string]string, tag func(ebpf.ProgramID) string) Prog {
	r := Prog{
		Ifname: a.Ifname, Ifindex: a.Ifindex, Direction: a.Direction, Program: a.Program,
		ProgID: uint32(a.ProgID), LinkID: uint32(a.LinkID), Pin: a.Pin, Status: StatusOK,
		Mode: string(a.Mode), Yielded: a.Yielded,
	}
	if a.ProgID != 0 {
		r.Tag = tag(a.ProgID)
	}
	if a.Stale {
		r.Status = StatusStale
	}
	if a.Program == datapath.FromPod {
		r.PodIP = podIP[a.Ifname]
	}
	return r
}

// ProgTag returns the kernel's tag of a loaded program, "" if it is gone.
func ProgTag(id ebpf.ProgramID) string {
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
