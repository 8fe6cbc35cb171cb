package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/internal/packet"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/patchcord/patchcord/pkg/events"
)

// BPF_PROG_RUN runs tc programs on the loopback device of the test's
// network namespace, so the sending pod is registered on ifindex 1; the
// receiving pod's ifindex is only recorded as the redirect target.
var (
	podA = bpfmaps.EndpointInfo{
		IP: netip.MustParseAddr("10.244.1.5"), Ifindex: 1,
		MAC: net.HardwareAddr{2, 0, 0x0a, 0xf4, 1, 5}, HostMAC: net.HardwareAddr{0xee, 0xee, 0, 0, 0, 1},
	}
	podB = bpfmaps.EndpointInfo{
		IP: netip.MustParseAddr("10.244.1.6"), Ifindex: 42,
		MAC: net.HardwareAddr{2, 0, 0x0a, 0xf4, 1, 6}, HostMAC: net.HardwareAddr{0xee, 0xee, 0, 0, 0, 0x2a},
	}
)

// udpFrame is what podA sends: Ethernet/IPv4/UDP with a valid header checksum.
func udpFrame(src, dst netip.Addr, sport, dport uint16) []byte {
	return packet.UDP(podA.HostMAC, podA.MAC, src, dst, sport, dport, make([]byte, 4))
}

type testDatapath struct {
	*datapath.Datapath
	t *testing.T
}

func newTestDatapath(t *testing.T) testDatapath {
	d := datapathtest.MustOpen(t)
	eps := bpfmaps.NewEndpoints(&d.Maps)
	for _, ep := range []bpfmaps.EndpointInfo{podA, podB} {
		if err := eps.Put(ep); err != nil {
			t.Fatal(err)
		}
	}
	return testDatapath{d, t}
}

func (d testDatapath) send(frame []byte) {
	d.t.Helper()
	p, err := d.Program(datapath.FromPod)
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := p.Run(&ebpf.RunOptions{Data: frame}); err != nil {
		d.t.Fatal(err)
	}
}

func (d testDatapath) tracing() bool {
	d.t.Helper()
	cfg, err := bpfmaps.NewConfig(&d.Maps).Get()
	if err != nil {
		d.t.Fatal(err)
	}
	return cfg.Trace
}

// monitorRun is runMonitor in a goroutine, its output line by line.
type monitorRun struct {
	lines chan string
	done  chan error
}

func startMonitor(t *testing.T, ctx context.Context, root string, o monitorOpts) *monitorRun {
	t.Helper()
	o.readyFile = filepath.Join(t.TempDir(), "ready")
	pr, pw := io.Pipe()
	m := &monitorRun{lines: make(chan string, 100), done: make(chan error, 1)}
	go func() {
		s := bufio.NewScanner(pr)
		for s.Scan() {
			m.lines <- s.Text()
		}
		close(m.lines)
	}()
	g := &globals{root: root, output: "json"}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	go func() {
		err := runMonitor(ctx, g, pw, log, o)
		pw.Close()
		m.done <- err
	}()
	// Readiness is the ready file, or the monitor failing first.
	deadline := time.After(10 * time.Second)
	for {
		if _, err := os.Stat(o.readyFile); err == nil {
			return m
		}
		select {
		case err := <-m.done:
			t.Fatalf("monitor exited before it was ready: %v", err)
		case <-deadline:
			t.Fatal("monitor not ready after 10s")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (m *monitorRun) next(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-m.lines:
		if !ok {
			t.Fatal("monitor output ended")
		}
		return l
	case <-time.After(10 * time.Second):
		t.Fatal("no monitor output after 10s")
	}
	return ""
}

func (m *monitorRun) wait(t *testing.T) {
	t.Helper()
	select {
	case err := <-m.done:
		if err != nil {
			t.Fatalf("monitor: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("monitor did not exit within 10s")
	}
}

func decodeLine(t *testing.T, line string) events.Decoded {
	t.Helper()
	var d events.Decoded
	if err := json.Unmarshal([]byte(line), &d); err != nil {
		t.Fatalf("%v: %s", err, line)
	}
	return d
}

// TestMonitorAll streams a drop and a trace, then checks that leaving
// switches tracing off.
func TestMonitorAll(t *testing.T) {
	d := newTestDatapath(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := startMonitor(t, ctx, d.Root, monitorOpts{typ: "all"})
	if !d.tracing() {
		t.Fatal("tracing off while a trace monitor runs")
	}

	spoofed := netip.MustParseAddr("10.244.1.200")
	d.send(udpFrame(spoofed, podB.IP, 1000, 53))
	d.send(udpFrame(podA.IP, podB.IP, 2000, 53))

	drop := decodeLine(t, m.next(t))
	if drop.Kind != "drop" || drop.Reason != "drop_spoofed" || drop.Program != "from_pod" || drop.Ifname != "lo" ||
		drop.Src != spoofed.String() || drop.Dst != podB.IP.String() || drop.Proto != "udp" || drop.Sport != 1000 || drop.Dport != 53 {
		t.Errorf("drop: %+v", drop)
	}
	trace := decodeLine(t, m.next(t))
	if trace.Kind != "trace" || trace.Reason != "local_redirect" || trace.Target != podB.Ifindex ||
		trace.Src != podA.IP.String() || trace.Sport != 2000 {
		t.Errorf("trace: %+v", trace)
	}

	cancel()
	m.wait(t)
	if d.tracing() {
		t.Error("tracing still on after the monitor exited")
	}
	d.send(udpFrame(podA.IP, podB.IP, 3000, 53))
	if l, ok := <-m.lines; ok {
		t.Errorf("output after exit: %s", l)
	}
}

// TestMonitorDropsOnlyCount: --type drop leaves tracing alone, skips traces
// and exits after --count events.
func TestMonitorDropsOnlyCount(t *testing.T) {
	d := newTestDatapath(t)
	// Set by someone else (a trace monitor): a drop monitor must keep it.
	if err := bpfmaps.NewConfig(&d.Maps).SetTrace(true); err != nil {
		t.Fatal(err)
	}
	m := startMonitor(t, context.Background(), d.Root, monitorOpts{typ: "drop", count: 2})
	d.send(udpFrame(podA.IP, podB.IP, 1, 53)) // a trace: not shown
	for port := range uint16(3) {
		d.send(udpFrame(netip.MustParseAddr("10.244.1.200"), podB.IP, 100+port, 53))
	}
	var got []uint16
	for l := range m.lines {
		ev := decodeLine(t, l)
		if ev.Kind != "drop" {
			t.Errorf("not a drop: %s", l)
		}
		got = append(got, ev.Sport)
	}
	m.wait(t)
	if !slices.Equal(got, []uint16{100, 101}) {
		t.Errorf("drops by source port: got %v, want [100 101]", got)
	}
	if !d.tracing() {
		t.Error("a drop monitor switched tracing off")
	}
}

// setCounter sets counter name to n packets, as the datapath would.
func (d testDatapath) setCounter(name string, n uint64) {
	d.t.Helper()
	id := slices.Index(datapath.StatNames(), name)
	perCPU := make([]datapath.StatCounter, ebpf.MustPossibleCPU())
	perCPU[0].Packets = n
	if err := d.Maps.Stats.Put(uint32(id), perCPU); err != nil {
		d.t.Fatal(err)
	}
}

// TestMonitorReportsLost moves the events_lost counter as a full ring
// buffer would, and expects {"lost": N} for the increase only.
func TestMonitorReportsLost(t *testing.T) {
	d := newTestDatapath(t)
	d.setCounter("events_lost", 10) // lost before the monitor: not reported
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := startMonitor(t, ctx, d.Root, monitorOpts{typ: "drop"})
	d.setCounter("events_lost", 17)
	wantCount(t, m.next(t), "lost", 7)
	cancel()
	m.wait(t)
}

// TestMonitorReportsSuppressed floods drops past the rate limit and expects
// the burst's events, then {"suppressed": N} for the rest, counted since the
// monitor started.
func TestMonitorReportsSuppressed(t *testing.T) {
	d := newTestDatapath(t)
	if err := bpfmaps.NewConfig(&d.Maps).Put(bpfmaps.Config{EventRate: 1, EventBurst: 1}); err != nil {
		t.Fatal(err)
	}
	d.setCounter("events_suppressed", 5) // before the monitor: not reported
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := startMonitor(t, ctx, d.Root, monitorOpts{typ: "drop"})
	p, err := d.Program(datapath.FromPod)
	if err != nil {
		t.Fatal(err)
	}
	// One run of 11 on one skb stays on one CPU: one event, ten held back.
	frame := udpFrame(netip.MustParseAddr("10.244.1.200"), podB.IP, 1000, 53)
	if _, err := p.Run(&ebpf.RunOptions{Data: frame, Repeat: 11}); err != nil {
		t.Fatal(err)
	}
	if ev := decodeLine(t, m.next(t)); ev.Reason != "drop_spoofed" {
		t.Errorf("first line: %+v, want the drop_spoofed event", ev)
	}
	wantCount(t, m.next(t), "suppressed", 10)
	cancel()
	m.wait(t)
}

// wantCount fails unless line is {"name":n}, the one-field line the monitor
// prints for events lost (events.Lost) or held back (events.Suppressed).
func wantCount(t *testing.T, line, name string, n uint64) {
	t.Helper()
	var got map[string]uint64
	if err := json.Unmarshal([]byte(line), &got); err != nil || len(got) != 1 || got[name] != n {
		t.Errorf("got %s, want {%q:%d}", line, name, n)
	}
}

func TestMonitorBadType(t *testing.T) {
	err := runMonitor(context.Background(), &globals{root: t.TempDir()}, io.Discard, slog.Default(), monitorOpts{typ: "drops"})
	if err == nil || !strings.Contains(err.Error(), "drop, trace, all") {
		t.Errorf("got %v, want an error listing the types", err)
	}
}
