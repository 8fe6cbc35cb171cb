package bpfmaps

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// Counter is one datapath counter summed over CPUs.
type Counter struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Stats is the per-CPU counter array. It has spare slots beyond the
// counters this build names (STAT_SLOTS in bpf/lib/maps.h), so that a newer
// build's counters need no migration; Read and Reset leave those alone.
type Stats struct{ m *ebpf.Map }

func NewStats(m *datapath.Maps) *Stats { return &Stats{m: m.Stats} }

// Read returns every counter by name ("local_redirect", "drop_spoofed", ...).
func (s *Stats) Read() (map[string]Counter, error) {
	names := datapath.StatNames()
	out := make(map[string]Counter, len(names))
	for id, name := range names {
		var perCPU []datapath.StatCounter
		if err := s.m.Lookup(uint32(id), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		var c Counter
		for _, v := range perCPU {
			c.Packets += v.Packets
			c.Bytes += v.Bytes
		}
		out[name] = c
	}
	return out, nil
}

// Reset zeroes every counter.
func (s *Stats) Reset() error {
	zero := make([]datapath.StatCounter, ebpf.MustPossibleCPU())
	for id, name := range datapath.StatNames() {
		if err := s.m.Put(uint32(id), zero); err != nil {
			return fmt.Errorf("reset counter %s: %w", name, err)
		}
	}
	return nil
}
