package datapath

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// The program table comes from the ELF; the names callers use must be in it,
// with the hooks the design gives them, and enum prog_id must name each.
func TestProgramsFromELF(t *testing.T) {
	want := []ProgramInfo{
		{FromPod, ebpf.AttachTCXIngress},
		{FromUplink, ebpf.AttachTCXIngress},
		{ToUplink, ebpf.AttachTCXEgress},
		{FromTunnel, ebpf.AttachTCXIngress},
	}
	if got := Programs(); !slices.Equal(got, want) {
		t.Fatalf("programs %+v, want %+v", got, want)
	}
	// The table is read from symbols alone; cilium/ebpf, which loads the
	// programs, must read the same from the full parse.
	var full []ProgramInfo
	for _, o := range objects {
		spec, err := o.load()
		if err != nil {
			t.Fatal(err)
		}
		var ps []ProgramInfo
		for name, p := range spec.Programs {
			ps = append(ps, ProgramInfo{name, p.AttachType})
		}
		slices.SortFunc(ps, func(a, b ProgramInfo) int { return strings.Compare(a.Name, b.Name) })
		full = append(full, ps...)
	}
	if !slices.Equal(full, Programs()) {
		t.Errorf("cilium/ebpf reads programs %+v from the objects, the symbol table %+v", full, Programs())
	}
	for _, p := range Programs() {
		id := slices.IndexFunc([]ProgID{fromPodProgIdPROG_FROM_POD, fromPodProgIdPROG_FROM_UPLINK, fromPodProgIdPROG_TO_UPLINK, fromPodProgIdPROG_FROM_TUNNEL},
			func(id ProgID) bool { return id.String() == p.Name })
		if id < 0 {
			t.Errorf("enum prog_id names no %s", p.Name)
		}
	}
	if d := Programs()[2].Direction(); d != "egress" {
		t.Errorf("to_uplink direction %q, want egress", d)
	}
	if s := ProgID(99).String(); s != "prog_99" {
		t.Errorf("unknown prog ID reads %q, want prog_99", s)
	}
}

// A function in a section no hook runs is a build bug, said by name.
func TestProgramsOutsideHookSection(t *testing.T) {
	obj := bytes.ReplaceAll(_FromPodBytes, []byte("tcx/ingress\x00"), []byte("tcx/ingresz\x00"))
	_, err := elfPrograms(obj)
	if err == nil || !strings.Contains(err.Error(), `program from_pod is in section "tcx/ingresz"`) {
		t.Fatalf("err = %v, want from_pod named with its section", err)
	}
}
