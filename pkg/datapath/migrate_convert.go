// The converters of the layouts in migrate.go: each fills a new map from a
// map of an earlier layout.
package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// resizeValues copies every entry, cutting each value to the new size or
// padding it with zeros: for structs that grew (or shrank) at their end,
// such as node_config when event_rate and event_burst were appended.
func resizeValues(old, cur *ebpf.Map) (func() error, error) {
	return nil, convertEntries(old, cur, func(k, v []byte) ([]byte, []byte, error) {
		nv := make([]byte, cur.ValueSize())
		copy(nv, v)
		return k, nv, nil
	})
}

// convertEntries puts convert(k, v) into cur for every entry of old. Both
// must be maps of one value per key (not per CPU).
func convertEntries(old, cur *ebpf.Map, convert func(k, v []byte) ([]byte, []byte, error)) error {
	k := make([]byte, old.KeySize())
	v := make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(&k, &v) {
		nk, nv, err := convert(k, v)
		if err != nil {
			return fmt.Errorf("convert entry %x: %w", k, err)
		}
		if err := cur.Put(nk, nv); err != nil {
			return fmt.Errorf("write entry %x: %w", nk, err)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read entries: %w", err)
	}
	return nil
}

// carryCounters copies the per-CPU counters of every stat ID both maps
// have: IDs are append-only, so an ID names one counter in every layout.
// Its settle adds what the old programs counted between the copy and the
// move of their links.
func carryCounters(old, cur *ebpf.Map) (func() error, error) {
	n := min(old.MaxEntries(), cur.MaxEntries())
	before, err := readCounters(old, n)
	if err != nil {
		return nil, err
	}
	if err := addCounters(cur, before, nil); err != nil {
		return nil, err
	}
	return func() error {
		after, err := readCounters(old, n)
		if err != nil {
			return err
		}
		return addCounters(cur, after, before)
	}, nil
}

func readCounters(m *ebpf.Map, n uint32) ([][]StatCounter, error) {
	out := make([][]StatCounter, n)
	for id := range n {
		if err := m.Lookup(id, &out[id]); err != nil {
			return nil, fmt.Errorf("read counter %d: %w", id, err)
		}
	}
	return out, nil
}

// addCounters adds add[id]-sub[id] to m's counter id on every CPU, and
// writes only the counters that moved: the programs count into m
// meanwhile, and an increment between the read and the write is lost.
func addCounters(m *ebpf.Map, add, sub [][]StatCounter) error {
	for id := range add {
		delta := add[id]
		if sub != nil {
			delta = diffCounters(add[id], sub[id])
		}
		if delta == nil {
			continue
		}
		var cur []StatCounter
		if err := m.Lookup(uint32(id), &cur); err != nil {
			return fmt.Errorf("read counter %d: %w", id, err)
		}
		if len(cur) != len(delta) {
			return errors.New("per-CPU counters of the two layouts differ in CPU count")
		}
		for cpu := range cur {
			cur[cpu].Packets += delta[cpu].Packets
			cur[cpu].Bytes += delta[cpu].Bytes
		}
		if err := m.Put(uint32(id), cur); err != nil {
			return fmt.Errorf("write counter %d: %w", id, err)
		}
	}
	return nil
}

// diffCounters is a-b per CPU, nil where nothing moved.
func diffCounters(a, b []StatCounter) []StatCounter {
	var out []StatCounter
	for cpu := range a {
		if a[cpu] != b[cpu] && out == nil {
			out = make([]StatCounter, len(a))
		}
	}
	if out == nil {
		return nil
	}
	for cpu := range a {
		out[cpu] = StatCounter{Packets: a[cpu].Packets - b[cpu].Packets, Bytes: a[cpu].Bytes - b[cpu].Bytes}
	}
	return out
}
