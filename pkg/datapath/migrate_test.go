package datapath_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// v010 are the layouts v0.1.0 pinned the maps in that have changed since.
var v010 = map[string]*ebpf.MapSpec{
	"stats":  {Name: "stats", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: 14, Pinning: ebpf.PinByName},
	"config": {Name: "config", Type: ebpf.Array, KeySize: 4, ValueSize: 28, MaxEntries: 1, Pinning: ebpf.PinByName},
}

// pinV010 pins stats and config as v0.1.0 made them: counter id holds id+1
// packets on every CPU, config a node IP, uplink, MAC, port, VNI and MTU.
func pinV010(t *testing.T, root string) {
	t.Helper()
	dir := filepath.Join(root, "maps")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	maps := map[string]*ebpf.Map{}
	for name, spec := range v010 {
		os.Remove(filepath.Join(dir, name)) // a tombstone
		m, err := ebpf.NewMapWithOptions(spec, ebpf.MapOptions{PinPath: dir})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		maps[name] = m
	}
	for id := range uint32(14) {
		v := make([]datapath.StatCounter, ebpf.MustPossibleCPU())
		for c := range v {
			v[c] = datapath.StatCounter{Packets: uint64(id) + 1, Bytes: 1000 * (uint64(id) + 1)}
		}
		if err := maps["stats"].Put(id, v); err != nil {
			t.Fatal(err)
		}
	}
	// node_config of v0.1.0: node_ip, uplink_ifindex, uplink_mac[6],
	// vxlan_port, vni, mtu, flags.
	cfg := []byte{198, 18, 0, 1, 7, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0xb5, 0x12, 1, 0, 0, 0, 0xaa, 5, 0, 0, 0, 0, 0, 0}
	if err := maps["config"].Put(uint32(0), cfg); err != nil {
		t.Fatal(err)
	}
}

func TestMigrateFromRelease(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	pinV010(t, root)
	start := time.Now()
	d, err := datapath.Open(root, datapathtest.Logger(t))
	if err != nil {
		t.Fatalf("open over v0.1.0's maps: %v", err)
	}
	defer d.Close()
	t.Logf("open with the migration: %v", time.Since(start))

	if n := d.Maps.Stats.MaxEntries(); n != 128 {
		t.Errorf("stats has %d entries, want 128 spare slots", n)
	}
	for id := range uint32(128) {
		var v []datapath.StatCounter
		if err := d.Maps.Stats.Lookup(id, &v); err != nil {
			t.Fatal(err)
		}
		want := uint64(0)
		if id < 14 {
			want = uint64(id) + 1
		}
		if v[0].Packets != want || v[0].Bytes != 1000*want {
			t.Errorf("counter %d after the migration: %+v, want %d packets", id, v[0], want)
		}
	}
	var cfg datapath.NodeConfig
	if err := d.Maps.Config.Lookup(uint32(0), &cfg); err != nil {
		t.Fatal(err)
	}
	want := datapath.NodeConfig{NodeIp: 0x010012c6, UplinkIfindex: 7, UplinkMac: [6]uint8{2, 0, 0, 0, 0, 1}, VxlanPort: 0x12b5, Vni: 1, Mtu: 1450}
	if cfg != want {
		t.Errorf("config after the migration: %+v, want %+v", cfg, want)
	}
	requireTombstones(t, root)
	requireUses(t, d, filepath.Join(root, "maps", "stats_v2"))
}

// requireTombstones checks that v0.1.0's pins of the migrated maps hold what
// v0.1.0 refuses as incompatible, before it changes anything.
func requireTombstones(t *testing.T, root string) {
	t.Helper()
	for name, spec := range v010 {
		_, err := ebpf.NewMapWithOptions(spec, ebpf.MapOptions{PinPath: filepath.Join(root, "maps")})
		if !errors.Is(err, ebpf.ErrMapIncompatible) {
			t.Errorf("map %s as v0.1.0 opens it: %v, want ErrMapIncompatible", name, err)
		}
	}
}

// requireUses checks that every program uses the map pinned at pin.
func requireUses(t *testing.T, d *datapath.Datapath, pin string) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	mi, _ := m.Info()
	want, _ := mi.ID()
	for _, p := range datapath.Programs() {
		prog, err := d.Program(p.Name)
		if err != nil {
			t.Fatal(err)
		}
		pi, _ := prog.Info()
		ids, _ := pi.MapIDs()
		found := false
		for _, id := range ids {
			found = found || id == want
		}
		if !found {
			t.Errorf("%s uses maps %v, not %s (id %d)", p.Name, ids, pin, want)
		}
	}
}

// A migration cut short leaves the old pin real beside the new one; the next
// Open migrates from the old pin again, and reloads programs of unchanged
// code because they ran on the other map.
func TestMigrateAgainAfterInterruption(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	d := mustOpenAt(t, root)
	d.Close()
	pinV010(t, root) // real v1 maps over the tombstones
	d = mustOpenUnmarked(t, root)
	var v []datapath.StatCounter
	if err := d.Maps.Stats.Lookup(uint32(13), &v); err != nil || v[0].Packets != 14 {
		t.Errorf("counter 13 after the second migration: %v %v, want 14 packets from the old pin", v, err)
	}
	requireTombstones(t, root)
	requireUses(t, d, filepath.Join(root, "maps", "stats_v2"))
}

// A map a newer binary moved on is refused, naming the versions, before
// anything changes.
func TestOpenRefusesNewerLayout(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	mustOpenAt(t, root).Close()
	pin := filepath.Join(root, "maps", "stats_v2")
	tomb, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer tomb.Close()
	if err := tomb.Put(uint32(0), uint32(3)); err != nil {
		t.Fatal(err)
	}
	os.Remove(pin)
	if err := tomb.Pin(pin); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(root, "build"))
	_, err = datapath.Open(root, datapathtest.Logger(t))
	if err == nil || !strings.Contains(err.Error(), "migrated to layout version 3 by a newer patchcord") {
		t.Fatalf("open after a newer binary: %v, want a refusal naming version 3", err)
	}
	if _, err := datapath.OpenPinned(root); err == nil {
		t.Errorf("OpenPinned after a newer binary: no error")
	}
}

// A writer whose endpoint maps a migration replaced is stopped at the lock:
// what it wrote would be lost with the old map.
func TestLockEndpointsAfterReplacement(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	d := mustOpenAt(t, root)
	defer d.Close()
	pin := filepath.Join(root, "maps", "endpoints")
	info, err := d.Maps.Endpoints.Info()
	if err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: info.Type, KeySize: info.KeySize, ValueSize: info.ValueSize, MaxEntries: info.MaxEntries})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	os.Remove(pin)
	if err := m.Pin(pin); err != nil {
		t.Fatal(err)
	}
	if _, err := d.LockEndpoints(); !errors.Is(err, datapath.ErrMapsReplaced) {
		t.Errorf("lock with replaced maps: %v, want ErrMapsReplaced", err)
	}
	fresh := mustOpenAt(t, root)
	defer fresh.Close()
	unlock, err := fresh.LockEndpoints()
	if err != nil {
		t.Fatalf("lock with current maps: %v", err)
	}
	unlock()
}

func mustOpenAt(t *testing.T, root string) *datapath.Datapath {
	t.Helper()
	d, err := datapath.Open(root, datapathtest.Logger(t))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return d
}
