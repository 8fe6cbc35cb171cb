package datapath

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
)

// Every pinned map of every object has a layout table whose newest entry is
// what the object declares, with versions 1, 2, ... and a converter for each
// after the first: a change to bpf/lib/maps.h or to a struct a map holds
// fails here until its layout is written down.
func TestLayoutsMatchObjects(t *testing.T) {
	for _, o := range objects {
		spec, err := o.load()
		if err != nil {
			t.Fatal(err)
		}
		for name, ms := range pinnedMaps(spec) {
			if _, _, err := currentLayout(name, ms); err != nil {
				t.Error(err)
			}
		}
	}
	for name, ls := range layouts {
		for i, l := range ls {
			if l.version != i+1 {
				t.Errorf("map %s: layout %d has version %d, want %d", name, i, l.version, i+1)
			}
			if i > 0 && l.from == nil {
				t.Errorf("map %s: layout version %d has no converter from the older ones", name, l.version)
			}
			if l.fits(specShape(&tombstone)) {
				t.Errorf("map %s: layout version %d has the tombstone's shape: older binaries would take a tombstone for a map", name, l.version)
			}
		}
	}
}

// Counters keep their values across the new map, including what the old
// programs count between the copy and the move of their links.
func TestCarryCounters(t *testing.T) {
	requireRoot(t)
	old := mustMap(t, 14)
	cur := mustMap(t, 128)
	cpus := ebpf.MustPossibleCPU()
	put := func(m *ebpf.Map, id uint32, packets uint64) {
		t.Helper()
		v := make([]StatCounter, cpus)
		for c := range v {
			v[c] = StatCounter{Packets: packets, Bytes: packets * 100}
		}
		if err := m.Put(id, v); err != nil {
			t.Fatal(err)
		}
	}
	put(old, 3, 7)
	put(old, 13, 9)
	settle, err := carryCounters(old, cur)
	if err != nil {
		t.Fatal(err)
	}
	// The old programs count on until their links move; the new ones
	// count into cur from then.
	put(old, 3, 10)
	put(cur, 5, 2)
	if err := settle(); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[uint32]uint64{3: 10, 13: 9, 5: 2, 0: 0, 100: 0} {
		var got []StatCounter
		if err := cur.Lookup(id, &got); err != nil {
			t.Fatal(err)
		}
		for c := range got {
			if got[c].Packets != want || got[c].Bytes != want*100 {
				t.Errorf("counter %d on CPU %d: %+v, want %d packets", id, c, got[c], want)
			}
		}
	}
}

func mustMap(t *testing.T, entries uint32) *ebpf.Map {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: entries})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// requireRoot skips outside root, naming why; datapathtest cannot serve an
// internal test (it imports this package).
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates BPF maps")
	}
}
