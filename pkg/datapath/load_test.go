package datapath_test

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

func TestOpenPinsAndReuses(t *testing.T) {
	d := datapathtest.MustOpen(t)
	root := d.Root
	for _, pin := range []string{"progs/from_pod", "progs/from_uplink", "progs/to_uplink", "maps/endpoints", "maps/nodes", "maps/stats_v2", "maps/config_v2", "maps/events"} {
		if _, err := os.Stat(filepath.Join(root, pin)); err != nil {
			t.Errorf("expected pin %s: %v", pin, err)
		}
	}
	first := progID(t, d, datapath.FromPod)

	again, err := datapath.Open(root, datapathtest.Logger(t))
	if err != nil {
		t.Fatalf("second open: %v", err)
	}
	defer again.Close()
	if id := progID(t, again, datapath.FromPod); id != first {
		t.Errorf("second open loaded a new program (id %d), want the pinned one (id %d)", id, first)
	}
}

func TestOpenParallel(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			d, err := datapath.Open(root, datapathtest.Logger(t))
			if err != nil {
				errs <- err
				return
			}
			d.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("parallel open: %v", err)
	}
}

func TestOpenRejectsNonBPFFS(t *testing.T) {
	datapathtest.RequireRoot(t)
	root := filepath.Join(t.TempDir(), "patchcord")
	_, err := datapath.Open(root, datapathtest.Logger(t))
	if err == nil || !strings.Contains(err.Error(), "mount -t bpf bpf") {
		t.Fatalf("open on tmpfs: got %v, want an error telling to mount bpffs", err)
	}
}

func TestOpenPinnedNotLoaded(t *testing.T) {
	root := datapathtest.MustBPFFS(t)
	_, err := datapath.OpenPinned(root)
	if err == nil || !strings.Contains(err.Error(), "not loaded") {
		t.Fatalf("OpenPinned on empty root: got %v, want ErrNotLoaded", err)
	}
}

func progID(t *testing.T, d *datapath.Datapath, name string) uint32 {
	t.Helper()
	p, err := d.Program(name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}

// The gateway Go hands to pods is the one from_pod answers ARP for: both
// come from POD_GATEWAY_IP, Go's through BTF.
func TestPodGatewayFromBTF(t *testing.T) {
	if got := datapath.PodGateway(); got != gatewayIP {
		t.Errorf("PodGateway() = %s, want %s", got, gatewayIP)
	}
}
