// This file tests the rate limit on drop events (bpf/lib/verdict.h:
// event_admit): a token bucket per CPU and per drop reason, configured by
// the node config's event rate and burst. Every drop is still counted; an
// event the bucket holds back counts events_suppressed instead.
//
// The buckets are per CPU, so every test pins itself to one CPU: a thread
// that migrated would find a second, full bucket. Time cannot be faked
// (bpf_ktime_get_ns), so the tests bound what may refill while they run by
// the time they measured, and prove refill by getting more events than the
// burst allows.
package datapath_test

import (
	"math"
	"math/bits"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"golang.org/x/sys/unix"
)

// mustPinCPU keeps the calling goroutine on one OS thread bound to one CPU
// until the test ends.
func mustPinCPU(tb testing.TB) {
	tb.Helper()
	runtime.LockOSThread()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		runtime.UnlockOSThread()
		tb.Fatalf("read CPU affinity: %v", err)
	}
	var one unix.CPUSet
	for cpu := 0; cpu < len(old)*bits.UintSize; cpu++ {
		if old.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		runtime.UnlockOSThread()
		tb.Fatalf("pin to one CPU: %v", err)
	}
	tb.Cleanup(func() {
		if err := unix.SchedSetaffinity(0, &old); err != nil {
			tb.Errorf("restore CPU affinity: %v", err)
		}
		runtime.UnlockOSThread()
	})
}

// mustRunRepeat runs prog repeat times on one skb, in one BPF_PROG_RUN,
// and wants every run to end in verdict.
func mustRunRepeat(tb testing.TB, prog *ebpf.Program, in []byte, repeat int, verdict uint32) {
	tb.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: in, Repeat: uint32(repeat)})
	if err != nil {
		tb.Fatalf("run %s %d times on a %d-byte frame: %v", prog, repeat, len(in), err)
	}
	wantVerdict(tb, ret, verdict)
}

// limitedNode is podA's node with drop events limited to rate per second
// and burst (0: the datapath's defaults), and the calling test on one CPU.
func limitedNode(tb testing.TB, rate, burst uint32) *testNode {
	tb.Helper()
	mustPinCPU(tb)
	n := newPodNode(tb)
	cfg := defaultConfig()
	cfg.EventRate, cfg.EventBurst = rate, burst
	n.configure(cfg)
	return n
}

// byReason counts drop events by reason.
func byReason(evs []datapath.Event) map[string]int {
	m := map[string]int{}
	for _, ev := range evs {
		if ev.Kind == datapath.EventDrop {
			m[ev.Reason.String()]++
		}
	}
	return m
}

// admittedAtMost is how many events a full bucket of burst may let through
// in elapsed: the burst and what refills meanwhile.
func admittedAtMost(burst, rate uint32, elapsed time.Duration) int {
	return int(burst) + int(math.Ceil(elapsed.Seconds()*float64(rate)))
}

// counter reads one counter.
func (n *testNode) counter(name string) bpfmaps.Counter {
	n.tb.Helper()
	got, err := bpfmaps.NewStats(&n.d.Maps).Read()
	if err != nil {
		n.tb.Fatal(err)
	}
	return got[name]
}

// A flood of one reason gets the burst's events and no more, every packet
// is counted, and the rest count as suppressed: with the configured limit
// and with the defaults a zero config stands for.
func TestDropEventsLimited(t *testing.T) {
	tests := []struct {
		name                string
		rate, burst         uint32 // as configured
		wantRate, wantBurst uint32 // in effect
	}{
		{"configured", 1, 5, 1, 5},
		{"zero is the defaults", 0, 0, datapath.EventRateDefault, datapath.EventBurstDefault},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := limitedNode(t, tt.rate, tt.burst)
			in := fromPod(udpPacket(peerPodIP, podB.IP)) // a forged source
			flood := int(tt.wantBurst) + 50

			start := time.Now()
			mustRunRepeat(t, n.prog(datapath.FromPod), in, flood, tcActShot)
			elapsed := time.Since(start)

			got := byReason(n.events())["drop_spoofed"]
			if most := admittedAtMost(tt.wantBurst, tt.wantRate, elapsed); got < int(tt.wantBurst) || got > most {
				t.Errorf("drop_spoofed events: got %d of %d drops, want %d (at most %d after %v)", got, flood, tt.wantBurst, most, elapsed)
			}
			n.wantCounters(map[string]bpfmaps.Counter{
				"drop_spoofed":      {Packets: uint64(flood), Bytes: uint64(flood * len(in))},
				"events_suppressed": {Packets: uint64(flood - got)},
			})
		})
	}
}

// While one reason floods, another still gets its events: the buckets are
// per reason.
func TestDropEventsPerReason(t *testing.T) {
	const rate, burst = 1, 3
	n := limitedNode(t, rate, burst)
	prog := n.prog(datapath.FromPod)
	spoofed := fromPod(udpPacket(peerPodIP, podB.IP))
	malformed := truncate(fromPod(udpPacket(podA.IP, podB.IP)), ethHdrLen+ipv4HdrLen+4)

	start := time.Now()
	mustRunRepeat(t, prog, spoofed, 100, tcActShot)
	mustRunRepeat(t, prog, malformed, 2, tcActShot)
	mustRunRepeat(t, prog, spoofed, 100, tcActShot)
	elapsed := time.Since(start)

	got := byReason(n.events())
	if got["drop_malformed"] != 2 {
		t.Errorf("drop_malformed events during a drop_spoofed flood: got %d, want 2", got["drop_malformed"])
	}
	if most := admittedAtMost(burst, rate, elapsed); got["drop_spoofed"] < burst || got["drop_spoofed"] > most {
		t.Errorf("drop_spoofed events: got %d of 200, want %d (at most %d after %v)", got["drop_spoofed"], burst, most, elapsed)
	}
	n.wantCounters(map[string]bpfmaps.Counter{
		"drop_spoofed":      {Packets: 200, Bytes: uint64(200 * len(spoofed))},
		"drop_malformed":    {Packets: 2, Bytes: uint64(2 * len(malformed))},
		"events_suppressed": {Packets: uint64(200 - got["drop_spoofed"])},
	})
}

// An empty bucket fills again as time passes. A burst of one at 1000 events
// a second refills within a millisecond: flooding until more than one event
// came proves the refill without timing anything.
func TestDropEventsRefill(t *testing.T) {
	const rate, burst, perRun = 1000, 1, 100
	n := limitedNode(t, rate, burst)
	prog := n.prog(datapath.FromPod)
	in := fromPod(udpPacket(peerPodIP, podB.IP))

	events, runs := 0, 0
	for deadline := time.Now().Add(10 * time.Second); events <= burst; runs++ {
		if time.Now().After(deadline) {
			t.Fatalf("%d drop events after %d drops in 10 s, want more than the burst of %d", events, runs*perRun, burst)
		}
		mustRunRepeat(t, prog, in, perRun, tcActShot)
		events += byReason(n.events())["drop_spoofed"]
	}
	drops := uint64(runs * perRun)
	if s := n.counter("events_suppressed").Packets; s != drops-uint64(events) || s == 0 {
		t.Errorf("events_suppressed: got %d, want %d drops less %d events, and some", s, drops, events)
	}
	if d := n.counter("drop_spoofed").Packets; d != drops {
		t.Errorf("drop_spoofed: got %d, want every one of %d drops", d, drops)
	}
}

// Traces are not limited: a trace monitor follows one flow among all, and a
// limit would hide it.
func TestTracesNotLimited(t *testing.T) {
	const sends = 20
	n := limitedNode(t, 1, 1)
	if err := bpfmaps.NewConfig(&n.d.Maps).SetTrace(true); err != nil {
		t.Fatal(err)
	}
	in := fromPod(udpPacket(podA.IP, podB.IP))
	// A redirected frame no longer passes anti-spoofing: one skb per send.
	for range sends {
		ret, _ := mustRun(t, n.prog(datapath.FromPod), in)
		wantVerdict(t, ret, tcActRedirect)
	}
	traces := 0
	for _, ev := range n.events() {
		if ev.Kind == datapath.EventTrace && ev.Reason.String() == "local_redirect" {
			traces++
		}
	}
	if traces != sends {
		t.Errorf("local_redirect traces: got %d, want %d", traces, sends)
	}
	if s := n.counter("events_suppressed"); s != (bpfmaps.Counter{}) {
		t.Errorf("events_suppressed: got %+v, want none", s)
	}
}

// BenchmarkDropEvent is the per-packet cost of a flood of forged packets
// from a pod (BPF_PROG_RUN, 200000 runs on one skb, CPU pinned): with the
// limit holding every event back, and with it admitting every event into a
// ring that no one reads and that is soon full.
func BenchmarkDropEvent(b *testing.B) {
	const repeat = 200000
	for _, bm := range []struct {
		name        string
		rate, burst uint32
	}{
		{"suppressed", 1, 1},
		{"admitted ring full", math.MaxUint32, math.MaxUint32},
	} {
		b.Run(bm.name, func(b *testing.B) {
			n := limitedNode(b, bm.rate, bm.burst)
			prog := n.prog(datapath.FromPod)
			in := fromPod(udpPacket(peerPodIP, podB.IP))
			mustRunRepeat(b, prog, in, repeat, tcActShot) // empties the bucket, fills the ring
			var total time.Duration
			for b.Loop() {
				ret, per, err := prog.Benchmark(in, repeat, nil)
				if err != nil || ret != tcActShot {
					b.Fatalf("run: verdict %d, %v", ret, err)
				}
				total += per
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
		})
	}
}
