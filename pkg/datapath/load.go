package datapath

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sync"

	"github.com/cilium/ebpf"
)

// ErrNotLoaded means nothing is pinned under the root yet.
var ErrNotLoaded = errors.New("datapath not loaded")

// Maps are the datapath's maps; every program shares this one set.
type Maps = fromPodMaps

// Datapath is an open handle on a node's pinned datapath. Closing it closes
// the handles only: pinned programs, maps and links stay in the kernel.
type Datapath struct {
	Root string
	Maps Maps

	progs map[string]*ebpf.Program
	// inodes are the endpoint maps' pins as Maps was opened from them.
	inodes map[string]uint64
}

// Open returns the datapath pinned under root, loading and pinning it first
// where it is missing or its code differs from this binary's (the upgrade
// path: attached links are moved to the new programs atomically). Parallel
// callers serialise on a lock on root. It refuses a kernel that lacks a
// feature the datapath needs (see features.go).
func Open(root string, log *slog.Logger) (*Datapath, error) {
	return open(root, log, kernelFeatures)
}

// open is Open with the feature probe given, so that tests load either mode.
func open(root string, log *slog.Logger, probe func(*slog.Logger) (Features, error)) (*Datapath, error) {
	if err := prepareRoot(root); err != nil {
		return nil, err
	}
	unlock, err := lockRoot(root)
	if err != nil {
		return nil, err
	}
	defer unlock()

	// Loading runs the verifier, ~100 ms for the three programs on a busy
	// node: too much for every CNI ADD. What this binary pinned before is
	// known by its build ID, so the usual case only opens pins.
	if d, err := OpenPinned(root); err == nil {
		// The marker is written last, after every link was moved to this
		// build's programs, so it also says no link runs older code.
		if _, err := os.Stat(d.buildMarker()); err == nil && len(d.progs) == len(Programs()) {
			return d, nil
		}
		d.Close()
	}

	feats, err := probe(log)
	if err != nil {
		return nil, err
	}
	return load(root, log, feats)
}

// load loads this binary's objects under root, set up for the kernel's
// features, keeping what is pinned where it is current and migrating the
// maps whose layout is older. The caller holds the root's lock.
func load(root string, log *slog.Logger, feats Features) (*Datapath, error) {
	// Endpoint writers wait while maps may be copied: an entry written to
	// an old map after its copy would be lost with it.
	unlock, err := lockEndpoints(root)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d := &Datapath{Root: root, progs: make(map[string]*ebpf.Program)}
	// Whatever build's marker is there stops vouching for the pins before
	// they change, so a load killed halfway is finished by the next Open.
	if err := os.RemoveAll(filepath.Dir(d.buildMarker())); err != nil {
		return nil, fmt.Errorf("clear build marker: %w", err)
	}
	specs, err := objectSpecs(feats)
	if err != nil {
		return nil, err
	}
	maps, err := resolveMaps(d.mapDir(), specs[0])
	if err != nil {
		return nil, err
	}
	defer maps.close()
	for _, spec := range specs {
		if err := d.loadObject(spec, maps, log); err != nil {
			d.Close()
			return nil, err
		}
	}
	if err := maps.commit(log); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.openMaps(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.markBuild(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// variant names a build whose programs differ from the objects' (see
// variant.go, a test-only build); editSpec makes the difference.
var (
	variant  string
	editSpec = func(*ebpf.CollectionSpec) error { return nil }
)

// objectSpecs parses the embedded objects, from_pod's first, set up for the
// kernel's features.
func objectSpecs(feats Features) ([]*ebpf.CollectionSpec, error) {
	var specs []*ebpf.CollectionSpec
	for _, o := range objects {
		spec, err := o.load()
		if err == nil {
			err = setFeatures(spec, feats)
		}
		if err == nil {
			err = editSpec(spec)
		}
		if err != nil {
			return nil, fmt.Errorf("parse embedded object: %w", err)
		}
		specs = append(specs, spec)
	}
	return specs, nil
}

// buildID names this binary's BPF objects: a hash of their bytes.
var buildID = sync.OnceValue(func() string {
	h := sha256.New()
	for _, o := range objects {
		h.Write(o.bytes)
	}
	h.Write([]byte(variant))
	return hex.EncodeToString(h.Sum(nil))[:16]
})

// buildMarker is an empty directory (bpffs holds no files) saying which
// build's programs are pinned.
func (d *Datapath) buildMarker() string {
	return filepath.Join(d.Root, "build", buildID()+ctMarker())
}

// markBuild records that this build's programs are pinned, replacing the
// marker of whichever build pinned them before.
func (d *Datapath) markBuild() error {
	dir := filepath.Dir(d.buildMarker())
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("clear build marker %s: %w", dir, err)
	}
	if err := os.MkdirAll(d.buildMarker(), 0o700); err != nil {
		return fmt.Errorf("write build marker: %w", err)
	}
	return nil
}

// OpenPinned opens what is pinned under root without loading anything, for
// readers such as the CLI. It returns ErrNotLoaded when nothing is there.
func OpenPinned(root string) (*Datapath, error) {
	d := &Datapath{Root: root, progs: make(map[string]*ebpf.Program)}
	if _, err := os.Stat(filepath.Join(d.mapDir(), "endpoints")); err != nil {
		return nil, fmt.Errorf("%w under %s: is the agent or the CNI plugin installed? (%v)", ErrNotLoaded, root, err)
	}
	if err := d.openMaps(); err != nil {
		return nil, err
	}
	for _, name := range programNames() {
		p, err := ebpf.LoadPinnedProgram(d.progPin(name), nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open pinned program %s: %w", name, err)
		}
		d.progs[name] = p
	}
	return d, nil
}

// Close releases the handles; the datapath stays.
func (d *Datapath) Close() error {
	for _, p := range d.progs {
		p.Close()
	}
	d.progs = nil
	return d.Maps.Close()
}

// Program returns a loaded program by name (FromPod, FromUplink, ToUplink).
func (d *Datapath) Program(name string) (*ebpf.Program, error) {
	p, ok := d.progs[name]
	if !ok {
		return nil, fmt.Errorf("program %s is not loaded under %s", name, d.Root)
	}
	return p, nil
}

func (d *Datapath) mapDir() string             { return filepath.Join(d.Root, "maps") }
func (d *Datapath) progPin(name string) string { return filepath.Join(d.Root, "progs", name) }

// openMaps opens every map at the pin of its current layout. It reads the
// layouts from the layout table, not from the embedded object: parsing that
// costs ≈2 ms, on every CNI call, and TestLayoutsMatchObjects holds the
// table's newest layouts equal to what the objects declare.
func (d *Datapath) openMaps() error {
	d.inodes = d.pinInodes()
	fields := reflect.ValueOf(&d.Maps).Elem()
	for i := range fields.NumField() {
		name := fields.Type().Field(i).Tag.Get("ebpf")
		m, err := openCurrent(d.mapDir(), name)
		if err != nil {
			d.Maps.Close()
			return fmt.Errorf("open maps under %s: %w", d.mapDir(), err)
		}
		fields.Field(i).Set(reflect.ValueOf(m))
	}
	return nil
}

// loadObject loads the object against maps and keeps, for each program, the
// pinned one if it runs the same code on the same maps (the kernel's tag of
// both is equal, and the pinned one uses maps' maps), or pins the new one
// over it and moves existing attachments to it. The tag is only known after
// a load: cilium/ebpf's ProgramSpec.Tag differs from the kernel's once maps
// are passed by fd array. A load costs the verifier ~5 ms per program.
func (d *Datapath) loadObject(spec *ebpf.CollectionSpec, maps mapSet, log *slog.Logger) error {
	repl, err := maps.replacements(spec)
	if err != nil {
		return err
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load programs: %+v", ve)
		}
		return fmt.Errorf("load programs: %w", err)
	}
	defer coll.Close()

	for name := range spec.Programs {
		fresh := coll.DetachProgram(name)
		pinned, err := samePinned(d.progPin(name), fresh, maps)
		if err != nil {
			fresh.Close()
			return err
		}
		p := pinned
		if pinned != nil {
			fresh.Close()
		} else {
			if err := replacePin(fresh, d.progPin(name)); err != nil {
				fresh.Close()
				return fmt.Errorf("pin program %s: %w", name, err)
			}
			p = fresh
			log.Debug("pinned program", "prog", name, "pin", d.progPin(name))
		}
		d.progs[name] = p
		// Where the pinned program is kept, a load killed between pinning
		// it and moving its links left them on older code.
		if err := d.updateLinks(name, p, log); err != nil {
			return err
		}
	}
	return nil
}

// samePinned returns the program pinned at path if its code equals fresh's
// and it uses maps: the tag does not cover which maps a program uses, and a
// program on a migrated map's old copy would run on in it.
func samePinned(path string, fresh *ebpf.Program, maps mapSet) (*ebpf.Program, error) {
	pinned, err := ebpf.LoadPinnedProgram(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned program %s: %w", path, err)
	}
	old, err := pinned.Info()
	if err != nil {
		pinned.Close()
		return nil, fmt.Errorf("inspect pinned program %s: %w", path, err)
	}
	cur, err := fresh.Info()
	if err != nil {
		pinned.Close()
		return nil, fmt.Errorf("inspect program %s: %w", path, err)
	}
	if old.Tag != cur.Tag || !maps.usedBy(old, cur) {
		pinned.Close()
		return nil, nil
	}
	return pinned, nil
}

type pinner interface{ Pin(string) error }

// replacePin pins obj at path, atomically replacing what was there.
func replacePin(obj pinner, path string) error {
	// bpffs refuses names with dots in them.
	tmp := path + "~"
	os.Remove(tmp)
	if err := obj.Pin(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
