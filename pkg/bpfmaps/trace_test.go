package bpfmaps_test

import (
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// TestTracingLastMonitorSwitchesOff runs two trace monitors' worth of
// StartTracing: traces stay on until both have stopped.
func TestTracingLastMonitorSwitchesOff(t *testing.T) {
	d := datapathtest.MustOpen(t)
	cfg := bpfmaps.NewConfig(&d.Maps)
	// The rest of the config must survive the flag going on and off.
	base := bpfmaps.Config{VNI: 7, VXLANPort: 8472, TunnelMTU: 1450}
	if err := cfg.Put(base); err != nil {
		t.Fatal(err)
	}
	want := func(trace, running bool) {
		t.Helper()
		got, err := cfg.Get()
		if err != nil {
			t.Fatal(err)
		}
		if got.Trace != trace || got.VNI != 7 || got.VXLANPort != 8472 || got.TunnelMTU != 1450 {
			t.Errorf("config: got %+v, want trace %v over %+v", got, trace, base)
		}
		if r, err := bpfmaps.TracersRunning(d.Root); err != nil || r != running {
			t.Errorf("TracersRunning: got %v, %v; want %v", r, err, running)
		}
	}
	want(false, false)

	stop1, err := bpfmaps.StartTracing(d.Root, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want(true, true)
	stop2, err := bpfmaps.StartTracing(d.Root, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	want(true, true)
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	want(false, false)

	// A new monitor after the last one left switches it on again.
	stop3, err := bpfmaps.StartTracing(d.Root, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want(true, true)
	if err := stop3(); err != nil {
		t.Fatal(err)
	}
	want(false, false)
}
