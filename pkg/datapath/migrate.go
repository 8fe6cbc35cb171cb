// This file keeps the pinned maps, and what they hold, across upgrades.
//
// cilium/ebpf reuses a pinned map only if its type, key and value sizes,
// entries and flags equal the new spec's: call that the map's layout. Each
// layout a map has had is a version with a pin of its own, maps/<name> for
// version 1 (what v0.1.0 pinned) and maps/<name>_v<N> after it, as Cilium
// names its maps (cilium_ipcache_v2). A binary that finds a map in an older
// layout fills a new map beside it from the old one, loads its programs
// against the new, full map, moves the links to them (link.Update), pins the
// new map, and only then leaves a tombstone where the old map was pinned. The
// programs never see an empty map, and a crash at any step leaves the old
// pin real, so the next Open starts the migration over from it.
//
// A tombstone is a one-entry array no layout has. A binary that knows only
// the old layout finds it, cilium/ebpf refuses it as incompatible, and the
// binary fails before it has touched anything, where it would otherwise
// create an empty map at the old name and load its programs against it.
//
// The next layout change is one entry in layouts: a new version with its
// shape and a converter (from) from the maps the older versions left.
// TestLayoutsMatchObjects fails until the entry exists.
package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// shape is what cilium/ebpf compares before it reuses a pinned map.
type shape struct {
	Type       ebpf.MapType
	KeySize    uint32
	ValueSize  uint32
	MaxEntries uint32
	Flags      uint32
}

func shapeOf(m *ebpf.Map) shape {
	return shape{m.Type(), m.KeySize(), m.ValueSize(), m.MaxEntries(), m.Flags()}
}

func specShape(s *ebpf.MapSpec) shape {
	return shape{s.Type, s.KeySize, s.ValueSize, s.MaxEntries, s.Flags}
}

// A layout is one version of a pinned map.
type layout struct {
	version int
	shape   shape
	// also are shapes that builds between two releases pinned under this
	// version; from handles them like shape.
	also []shape
	// from fills cur, a new and empty map of this layout, from old, a map
	// of any earlier version. Its settle, if not nil, runs once the
	// programs write to cur, to carry over what they wrote to old until
	// their links moved.
	from func(old, cur *ebpf.Map) (settle func() error, err error)
}

func (l layout) fits(s shape) bool {
	if s == l.shape {
		return true
	}
	for _, a := range l.also {
		if s == a {
			return true
		}
	}
	return false
}

// layouts is every layout of every pinned map since v0.1.0, oldest first.
// The last one of each is what bpf/lib/maps.h declares now.
var layouts = map[string][]layout{
	"endpoints":     {{version: 1, shape: shape{ebpf.Hash, 4, 24, 16384, 0}}},
	"ep_by_ifindex": {{version: 1, shape: shape{ebpf.Hash, 4, 24, 16384, 0}}},
	"ep_meta":       {{version: 1, shape: shape{ebpf.Hash, 4, 480, 16384, 0}}},
	"nodes":         {{version: 1, shape: shape{ebpf.LPMTrie, 8, 12, 16384, unix.BPF_F_NO_PREALLOC}}},
	"tunnel_srcs":   {{version: 1, shape: shape{ebpf.Hash, 4, 4, 16384, 0}}},
	"events":        {{version: 1, shape: shape{ebpf.RingBuf, 0, 0, 256 * 1024, 0}}},
	// New since v0.1.0; its first shape is its version 1.
	"event_buckets": {{version: 1, shape: shape{ebpf.PerCPUArray, 4, 16, 64, 0}}},
	"ct_verdicts":   {{version: 1, shape: shape{ebpf.LRUHash, 12, 4, 65536, 0}}},
	"config": {
		// v0.1.0's struct node_config; builds after it appended
		// event_rate and event_burst under the same pin.
		{version: 1, shape: shape{ebpf.Array, 4, 28, 1, 0}, also: []shape{{ebpf.Array, 4, 36, 1, 0}}},
		// Appended fields are zero, which stands for their defaults.
		{version: 2, shape: shape{ebpf.Array, 4, 36, 1, 0}, from: resizeValues},
	},
	"stats": {
		// STAT_MAX entries: 14 in v0.1.0, 21 in builds after it.
		{version: 1, shape: shape{ebpf.PerCPUArray, 4, 16, 14, 0}, also: []shape{{ebpf.PerCPUArray, 4, 16, 21, 0}}},
		// STAT_SLOTS entries, so that new counters need no version 3.
		{version: 2, shape: shape{ebpf.PerCPUArray, 4, 16, 128, 0}, from: carryCounters},
	},
}

// tombstone stands where a map was pinned in a layout it has left. Its one
// value is the version the map moved to.
var tombstone = ebpf.MapSpec{Name: "pc_superseded", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}

// pinPath is where version v of map name is pinned.
func pinPath(dir, name string, v int) string {
	if v == 1 {
		return filepath.Join(dir, name)
	}
	return filepath.Join(dir, fmt.Sprintf("%s_v%d", name, v))
}

// newestLayout is name's newest layout, and all of them.
func newestLayout(name string) (layout, []layout, error) {
	ls := layouts[name]
	if len(ls) == 0 {
		return layout{}, nil, fmt.Errorf("map %s has no layout in pkg/datapath/migrate.go", name)
	}
	return ls[len(ls)-1], ls, nil
}

// currentLayout is the layout of name this binary's objects declare; spec
// is the objects' own, which must be it.
func currentLayout(name string, spec *ebpf.MapSpec) (layout, []layout, error) {
	cur, ls, err := newestLayout(name)
	if err != nil {
		return layout{}, nil, err
	}
	if cur.shape != specShape(spec) {
		return layout{}, nil, fmt.Errorf("map %s in bpf/lib/maps.h is %+v, its newest layout %+v: add a layout to pkg/datapath/migrate.go", name, specShape(spec), cur.shape)
	}
	return cur, ls, nil
}

// pinnedMaps yields the datapath's pinned maps in one object's spec: every
// map except the object's own .data/.rodata/.bss.
func pinnedMaps(spec *ebpf.CollectionSpec) map[string]*ebpf.MapSpec {
	out := make(map[string]*ebpf.MapSpec)
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			out[name] = m
		}
	}
	return out
}

// openPin opens the map pinned at path; nil without an error if none is.
func openPin(path string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	return m, nil
}

// movedTo returns the version a tombstone says its map moved to, or 0 if m
// is a real map.
func movedTo(m *ebpf.Map) int {
	if shapeOf(m) != specShape(&tombstone) {
		return 0
	}
	var v uint32
	if err := m.Lookup(uint32(0), &v); err != nil || v == 0 {
		return -1
	}
	return int(v)
}

// errLayout explains a pinned map this binary cannot use.
func errLayout(name, pin string, m *ebpf.Map, cur layout) error {
	if v := movedTo(m); v != 0 {
		return fmt.Errorf("map %s was migrated to layout version %d by a newer patchcord, this one knows up to version %d: run the newer version (README: Upgrading)", name, v, cur.version)
	}
	return fmt.Errorf("map %s pinned at %s is %+v, which no layout of this patchcord has (newest %+v): it was made by another patchcord version (README: Upgrading)", name, pin, shapeOf(m), cur.shape)
}

// openCurrent opens name at its current layout's pin, for readers that must
// not change anything. Where only an older layout is pinned it says so.
func openCurrent(dir, name string) (*ebpf.Map, error) {
	cur, ls, err := newestLayout(name)
	if err != nil {
		return nil, err
	}
	pin := pinPath(dir, name, cur.version)
	m, err := openPin(pin)
	if err != nil {
		return nil, err
	}
	if m != nil && cur.fits(shapeOf(m)) {
		return m, nil
	}
	if m != nil {
		defer m.Close()
		return nil, errLayout(name, pin, m, cur)
	}
	for _, l := range ls[:len(ls)-1] {
		if old, _ := openPin(pinPath(dir, name, l.version)); old != nil {
			old.Close()
			return nil, fmt.Errorf("map %s under %s has layout version %d, this patchcord's is %d: run this version's agent or CNI plugin once to migrate it", name, dir, l.version, cur.version)
		}
	}
	return nil, fmt.Errorf("map %s is not pinned at %s: %w", name, pin, fs.ErrNotExist)
}

// pinnedMap is one map as the loader found it and leaves it.
type pinnedMap struct {
	name    string
	version int
	pin     string
	cur     *ebpf.Map
	fresh   bool      // cur is not pinned yet
	old     *ebpf.Map // the older layout cur was filled from
	oldFrom int       // its version
	settle  func() error
	// superseded are the pins of older versions, where tombstones go.
	superseded []string
}

func (p *pinnedMap) close() {
	if p.cur != nil {
		p.cur.Close()
	}
	if p.old != nil {
		p.old.Close()
	}
}

// resolveMap finds the pin of name that holds its entries and opens it, or
// fills a new map from it where it has an older layout, or makes an empty
// one where none is pinned. The oldest real pin holds the entries: a newer
// pin beside it is a migration that did not finish, or that an older binary
// has run past since.
func resolveMap(dir, name string, spec *ebpf.MapSpec) (*pinnedMap, error) {
	cur, ls, err := currentLayout(name, spec)
	if err != nil {
		return nil, err
	}
	p := &pinnedMap{name: name, version: cur.version, pin: pinPath(dir, name, cur.version)}
	for _, l := range ls[:len(ls)-1] {
		p.superseded = append(p.superseded, pinPath(dir, name, l.version))
	}
	for _, l := range ls {
		pin := pinPath(dir, name, l.version)
		m, err := openPin(pin)
		if err != nil {
			return nil, err
		}
		if m == nil {
			continue
		}
		if !l.fits(shapeOf(m)) {
			if movedTo(m) != 0 && l.version < cur.version {
				m.Close()
				continue
			}
			defer m.Close()
			return nil, errLayout(name, pin, m, cur)
		}
		if l.version == cur.version {
			p.cur = m
			return p, nil
		}
		return p, p.migrate(m, l.version, cur, spec)
	}
	m, err := ebpf.NewMap(unpinned(spec))
	if err != nil {
		return nil, fmt.Errorf("create map %s: %w", name, err)
	}
	p.cur, p.fresh = m, true
	return p, nil
}

func unpinned(spec *ebpf.MapSpec) *ebpf.MapSpec {
	s := spec.Copy()
	s.Pinning = ebpf.PinNone
	return s
}

// migrate fills a new map of layout cur from old, of version from.
func (p *pinnedMap) migrate(old *ebpf.Map, from int, cur layout, spec *ebpf.MapSpec) error {
	m, err := ebpf.NewMap(unpinned(spec))
	if err != nil {
		old.Close()
		return fmt.Errorf("create map %s version %d: %w", p.name, cur.version, err)
	}
	p.cur, p.fresh, p.old, p.oldFrom = m, true, old, from
	settle, err := cur.from(old, m)
	if err != nil {
		return fmt.Errorf("migrate map %s from layout version %d to %d: %w", p.name, from, cur.version, err)
	}
	p.settle = settle
	return nil
}

// commit pins what resolveMap made, once the programs use it: the new map,
// then what the old programs counted meanwhile, then the tombstones.
func (p *pinnedMap) commit(log *slog.Logger) error {
	if !p.fresh {
		return nil
	}
	if err := replacePin(p.cur, p.pin); err != nil {
		return fmt.Errorf("pin map %s: %w", p.name, err)
	}
	if p.settle != nil {
		if err := p.settle(); err != nil {
			return fmt.Errorf("migrate map %s: %w", p.name, err)
		}
	}
	for _, pin := range p.superseded {
		if err := pinTombstone(pin, p.version); err != nil {
			return fmt.Errorf("retire %s: %w", pin, err)
		}
	}
	if p.old != nil {
		log.Info("migrated map", "map", p.name, "from_version", p.oldFrom, "to_version", p.version, "pin", p.pin)
	}
	return nil
}

// pinTombstone replaces whatever is pinned at pin with a tombstone saying
// the map moved to version.
func pinTombstone(pin string, version int) error {
	m, err := ebpf.NewMap(&tombstone)
	if err != nil {
		return fmt.Errorf("create tombstone: %w", err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), uint32(version)); err != nil {
		return fmt.Errorf("write tombstone: %w", err)
	}
	return replacePin(m, pin)
}

// mapSet is every pinned map of one load, by name.
type mapSet map[string]*pinnedMap

// resolveMaps resolves every pinned map of spec, which declares all of them
// (the programs share one set: Maps is from_pod's).
func resolveMaps(dir string, spec *ebpf.CollectionSpec) (mapSet, error) {
	set := make(mapSet)
	for name, ms := range pinnedMaps(spec) {
		p, err := resolveMap(dir, name, ms)
		if p != nil {
			set[name] = p
		}
		if err != nil {
			set.close()
			return nil, err
		}
	}
	return set, nil
}

// replacements are the maps one object's programs are loaded against.
func (s mapSet) replacements(spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, error) {
	out := make(map[string]*ebpf.Map)
	for name := range pinnedMaps(spec) {
		p, ok := s[name]
		if !ok {
			return nil, fmt.Errorf("map %s is not among from_pod's maps, which every object shares", name)
		}
		out[name] = p.cur
	}
	return out, nil
}

// usedBy reports whether a pinned program (old) uses every map of the set
// that a fresh load of it (cur) uses.
func (s mapSet) usedBy(old, cur *ebpf.ProgramInfo) bool {
	oldIDs, ok1 := old.MapIDs()
	curIDs, ok2 := cur.MapIDs()
	if !ok1 || !ok2 {
		return false
	}
	ours := make(map[ebpf.MapID]bool)
	for _, p := range s {
		if info, err := p.cur.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ours[id] = true
			}
		}
	}
	have := make(map[ebpf.MapID]bool)
	for _, id := range oldIDs {
		have[id] = true
	}
	for _, id := range curIDs {
		if ours[id] && !have[id] {
			return false
		}
	}
	return true
}

func (s mapSet) commit(log *slog.Logger) error {
	for _, p := range s {
		if err := p.commit(log); err != nil {
			return err
		}
	}
	return nil
}

func (s mapSet) close() {
	for _, p := range s {
		p.close()
	}
}

// ErrMapsReplaced means a newer binary migrated maps this handle still has
// open: what it wrote would be lost with them. Open the datapath again.
var ErrMapsReplaced = errors.New("maps replaced by a migration")

// endpointMaps are the maps LockEndpoints guards.
var endpointMaps = []string{"endpoints", "ep_by_ifindex", "ep_meta"}

// pinInodes are the inodes of the endpoint maps' current pins. A migration
// pins a new map by a rename, which changes the inode. Taken before the maps
// are opened: a pin replaced in between then reads as replaced, never the
// other way round. stat(2), not bpf(2): cheap on every ADD, and it leaves
// the plugin's bpf() calls as they were.
func (d *Datapath) pinInodes() map[string]uint64 {
	out := make(map[string]uint64)
	for _, name := range endpointMaps {
		ls := layouts[name]
		var st unix.Stat_t
		if err := unix.Stat(pinPath(d.mapDir(), name, ls[len(ls)-1].version), &st); err == nil {
			out[name] = st.Ino
		}
	}
	return out
}

// endpointMapsCurrent checks that the endpoint maps of d are still the
// pinned ones, for writers that opened d before another binary migrated
// them.
func (d *Datapath) endpointMapsCurrent() error {
	now := d.pinInodes()
	for _, name := range endpointMaps {
		if ino, ok := d.inodes[name]; !ok || now[name] != ino {
			return fmt.Errorf("map %s under %s: %w: open the datapath again", name, d.mapDir(), ErrMapsReplaced)
		}
	}
	return nil
}
