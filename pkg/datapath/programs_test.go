package datapath

import (
	"slices"
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
