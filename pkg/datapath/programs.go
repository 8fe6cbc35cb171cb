package datapath

import (
	"bytes"
	"debug/elf"
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
// SEC("tcx/egress")).
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

// sectionAttach is how cilium/ebpf reads the sections our programs may be
// in (TestProgramsFromELF holds the two readings equal).
var sectionAttach = map[string]ebpf.AttachType{
	"tcx/ingress": ebpf.AttachTCXIngress,
	"tcx/egress":  ebpf.AttachTCXEgress,
}

// programs reads the table from the objects' symbols only: every CNI ADD
// and CLI call needs it, and a full parse of the four objects (their
// instructions, relocations and BTF) costs ≈3.5 ms in a fresh process.
var programs = sync.OnceValues(func() ([]ProgramInfo, error) {
	var out []ProgramInfo
	for _, o := range objects {
		ps, err := elfPrograms(o.bytes)
		if err != nil {
			return nil, fmt.Errorf("read embedded object: %w", err)
		}
		out = append(out, ps...)
	}
	return out, nil
})

// elfPrograms lists the functions an object defines in program sections,
// sorted by name; a function in any other executable section is an error,
// since no hook would run it.
func elfPrograms(obj []byte) ([]ProgramInfo, error) {
	f, err := elf.NewFile(bytes.NewReader(obj))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return nil, err
	}
	var out []ProgramInfo
	for _, sym := range syms {
		if elf.ST_TYPE(sym.Info) != elf.STT_FUNC || elf.ST_BIND(sym.Info) != elf.STB_GLOBAL || int(sym.Section) >= len(f.Sections) {
			continue
		}
		sec := f.Sections[sym.Section]
		if sec.Flags&elf.SHF_EXECINSTR == 0 || sec.Name == ".text" {
			continue
		}
		attach, ok := sectionAttach[sec.Name]
		if !ok {
			return nil, fmt.Errorf("program %s is in section %q: want tcx/ingress or tcx/egress", sym.Name, sec.Name)
		}
		out = append(out, ProgramInfo{Name: sym.Name, Attach: attach})
	}
	slices.SortFunc(out, func(a, b ProgramInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

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
