// Tests of the counter reader: the stats map has spare slots beyond the
// counters this build knows, which a newer build may fill.
package bpfmaps_test

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

func TestStatsShowKnownCounters(t *testing.T) {
	d := datapathtest.MustOpen(t)
	names := datapath.StatNames()
	if int(d.Maps.Stats.MaxEntries()) <= len(names) {
		t.Fatalf("stats has %d entries for %d counters: no spare slot", d.Maps.Stats.MaxEntries(), len(names))
	}
	v := make([]datapath.StatCounter, ebpf.MustPossibleCPU())
	v[0] = datapath.StatCounter{Packets: 3, Bytes: 300}
	// The last known counter, and a spare slot only a newer build counts in.
	for _, id := range []uint32{uint32(len(names) - 1), d.Maps.Stats.MaxEntries() - 1} {
		if err := d.Maps.Stats.Put(id, v); err != nil {
			t.Fatal(err)
		}
	}
	got, err := bpfmaps.NewStats(&d.Maps).Read()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(names) {
		t.Errorf("read %d counters, want the %d this build names", len(got), len(names))
	}
	if c := got[names[len(names)-1]]; c.Packets != 3 || c.Bytes != 300 {
		t.Errorf("%s = %+v, want 3 packets, 300 bytes", names[len(names)-1], c)
	}
}
