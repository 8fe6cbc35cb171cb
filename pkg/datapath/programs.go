package datapath

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
)

// An object is one embedded BPF object: a hook's program and the maps it
// shares with the others. A new hook is a C file, its go:generate line in
// gen.go and one line here.
type object struct {
	load  func() (*ebpf.CollectionSpec, error)
	bytes []byte
}

var objects = []object{
	{loadFromPod, _FromPodBytes},
	{loadFromUplink, _FromUplinkBytes},
	{loadToUplink, _ToUplinkBytes},
	{loadFromTunnel, _FromTunnelBytes},
}

// ProgramInfo is what the ELF says of a program: its name (the C function)
// and where it attaches, from its section (SEC("tcx/ingress") or
// SEC("tcx/egress"), which cilium/ebpf turns into attach types).
type ProgramInfo struct {
	Name   string
	Attach ebpf.AttachType
}

// Direction is "ingress" or "egress".
func (p ProgramInfo) Direction() string {
	if p.Attach == ebpf.AttachTCXEgress {
		return "egress"
	}
	return "ingress"
}

var programs = sync.OnceValues(func() ([]ProgramInfo, error) {
	var out []ProgramInfo
	for _, o := range objects {
		spec, err := o.load()
		if err != nil {
			return nil, fmt.Errorf("parse embedded object: %w", err)
		}
		var names []string
		for name, p := range spec.Programs {
			if p.AttachType != ebpf.AttachTCXIngress && p.AttachType != ebpf.AttachTCXEgress {
				return nil, fmt.Errorf("program %s is in section %q: want tcx/ingress or tcx/egress", name, p.SectionName)
			}
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			out = append(out, ProgramInfo{Name: name, Attach: spec.Programs[name].AttachType})
		}
	}
	return out, nil
})

// Programs lists the datapath's programs in the order of their objects:
// from_pod, from_uplink, to_uplink, from_tunnel.
func Programs() []ProgramInfo { return embedded(programs()) }

// embedded returns what was read from the objects embedded in this binary,
// where a failure can only be a build bug.
func embedded[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// programInfo returns what the ELF says of the program name.
func programInfo(name string) (ProgramInfo, bool) {
	i := slices.IndexFunc(Programs(), func(p ProgramInfo) bool { return p.Name == name })
	if i < 0 {
		return ProgramInfo{}, false
	}
	return Programs()[i], true
}

// programNames are the names of Programs.
func programNames() []string {
	var names []string
	for _, p := range Programs() {
		names = append(names, p.Name)
	}
	return names
}

// progIDName turns an enum prog_id constant into its program's name:
// PROG_FROM_POD is from_pod.
func progIDName(constant string) string {
	return strings.ToLower(strings.TrimPrefix(constant, "PROG_"))
}
