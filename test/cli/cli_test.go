// End-to-end tests of the debugging CLI: real traffic and real drops on a lab
// node, and what `bpf stats`, `monitor`, `status` and `bpf prog list` say
// about them. Each test makes its own lab, so they run in parallel.
package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/views"
)

// agentNode is node 1 of a lab of its own, with its agent and two pods, a and b.
type agentNode struct {
	l     *lab.Lab
	n     *lab.Node
	agent *lab.Process
	nodes string // the nodes file
	a, b  *lab.Pod
}

func newNode(t *testing.T, ctx context.Context) *agentNode {
	t.Helper()
	l := e2e.NewLab(t)
	n := e2e.AddNodes(t, l, 1)[0]
	c := &agentNode{l: l, n: n, nodes: filepath.Join(l.Dir, "nodes.json")}
	e2e.WriteNodes(t, c.nodes, e2e.EntryOf(n))
	c.agent = e2e.StartAgent(t, ctx, n, c.nodes)
	e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
	c.a = e2e.AddPod(t, ctx, n, "a", "patchcord")
	c.b = e2e.AddPod(t, ctx, n, "b", "patchcord")
	return c
}

// endpoint reads a pod's endpoint through the CLI.
func (c *agentNode) endpoint(t *testing.T, ctx context.Context, p *lab.Pod) views.Endpoint {
	t.Helper()
	out, err := c.n.CLI(ctx, "bpf", "endpoint", "get", p.IP.String(), "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var eps []views.Endpoint
	if err := json.Unmarshal(out, &eps); err != nil || len(eps) != 1 {
		t.Fatalf("endpoint get %s: %v\n%s", p.IP, err, out)
	}
	return eps[0]
}

// status runs `status -o json` and returns what it printed and whether it
// exited 0. Its stdout is the JSON; an unhealthy status adds its error on
// stderr after it, which the decoder leaves alone.
func (c *agentNode) status(t *testing.T, ctx context.Context) (views.Status, bool) {
	t.Helper()
	out, err := c.n.CLI(ctx, "status", "-o", "json")
	var st views.Status
	if derr := json.NewDecoder(bytes.NewReader(out)).Decode(&st); derr != nil {
		t.Fatalf("status -o json: %v (exit: %v)\n%s", derr, err, out)
	}
	if (err == nil) != st.Healthy {
		t.Errorf("status exit %v but healthy %v:\n%s", err, st.Healthy, out)
	}
	return st, err == nil
}

func (c *agentNode) progs(t *testing.T, ctx context.Context) []views.Prog {
	t.Helper()
	out, err := c.n.CLI(ctx, "bpf", "prog", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var rows []views.Prog
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("prog list: %v\n%s", err, out)
	}
	return rows
}

// monitorEvents waits for a monitor started with --count to exit and
// returns the events it printed.
func monitorEvents(t *testing.T, ctx context.Context, p *lab.Process) []e2e.MonitorEvent {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	select {
	case <-p.Done():
	case <-wctx.Done():
		out, _ := p.Output()
		p.Stop()
		t.Fatalf("monitor did not exit after its --count events:\n%s", out)
	}
	out, _ := p.Output()
	if err := p.Wait(); err != nil {
		t.Fatalf("monitor: %v\n%s", err, out)
	}
	return e2e.ParseEvents(t, out)
}

// wantEvents checks that evs are n drops or traces matching want, field by
// field where want sets one.
func wantEvents(t *testing.T, evs []e2e.MonitorEvent, n int, want e2e.MonitorEvent) {
	t.Helper()
	if len(evs) != n {
		t.Fatalf("got %d events, want %d: %+v", len(evs), n, evs)
	}
	for i, ev := range evs {
		diffs := setFieldDiffs(ev, want)
		if ev.Message == "" || ev.Time.IsZero() || time.Since(ev.Time) > time.Minute || ev.Len == 0 {
			diffs = append(diffs, fmt.Sprintf("message %q, time %s, len %d", ev.Message, ev.Time, ev.Len))
		}
		if len(diffs) > 0 {
			t.Errorf("event %d: %s", i, strings.Join(diffs, "; "))
		}
	}
}

// setFieldDiffs names each field that want sets (non-zero) and got has
// otherwise.
func setFieldDiffs[T any](got, want T) []string {
	var diffs []string
	g, w := reflect.ValueOf(got), reflect.ValueOf(want)
	for i := range w.NumField() {
		f := w.Field(i)
		if f.IsZero() || f.Kind() == reflect.Pointer || !f.Comparable() || g.Field(i).Equal(f) {
			continue
		}
		diffs = append(diffs, fmt.Sprintf("%s %v, want %v", w.Type().Field(i).Name, g.Field(i), f))
	}
	return diffs
}

// counterDelta is how many packets a counter gained.
func counterDelta(before, after map[string]e2e.Counter, name string) uint64 {
	return after[name].Packets - before[name].Packets
}

// TestSpoofedDrops: a pod sending from an address that is not its own is
// dropped; stats, monitor and status each report exactly those drops, with
// the pod's host veth and the packets' 5-tuple.
func TestSpoofedDrops(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	c := newNode(t, ctx)
	ep := c.endpoint(t, ctx, c.a)
	const spoofed = "10.244.1.200"
	// The gateway's MAC is fixed first: resolving it from the spoofed
	// address would add a spoofed ARP to the drops.
	for _, cmd := range [][]string{
		{"ip", "neigh", "replace", "169.254.1.1", "lladdr", ep.HostMAC, "dev", "eth0", "nud", "permanent"},
		{"ip", "addr", "add", spoofed + "/32", "dev", "eth0"},
	} {
		if _, err := c.a.Exec(ctx, cmd[0], cmd[1:]...); err != nil {
			t.Fatal(err)
		}
	}

	before := e2e.Stats(t, ctx, c.n)
	mon := e2e.StartMonitor(t, ctx, c.n, "--type", "drop", "-o", "json", "--count", "3")
	// Every echo request is dropped: ping fails, as it should.
	c.a.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", spoofed, c.b.IP.String())
	evs := monitorEvents(t, ctx, mon)
	after := e2e.Stats(t, ctx, c.n)

	wantEvents(t, evs, 3, e2e.MonitorEvent{
		Kind: "drop", Program: "from_pod", Ifindex: ep.Ifindex, Ifname: ep.Ifname, Reason: "drop_spoofed",
		EthProto: "ipv4", Proto: "icmp", Src: spoofed, Dst: c.b.IP.String(),
	})
	for _, name := range []string{"drop_spoofed", "drop_malformed", "drop_unregistered", "local_redirect"} {
		want := uint64(0)
		if name == "drop_spoofed" {
			want = 3
		}
		if d := counterDelta(before, after, name); d != want {
			t.Errorf("bpf stats: %s grew by %d, want %d", name, d, want)
		}
	}
	st, ok := c.status(t, ctx)
	if !ok || st.Drops["drop_spoofed"] != 3 || st.DropTotal != 3 {
		t.Errorf("status: healthy %v, drops %v (total %d), want drop_spoofed 3 only; problems %q", ok, st.Drops, st.DropTotal, st.Problems)
	}
}

// TestTunnelDrops: VXLAN to node 1 from a stranger (198.18.0.99, a lab
// node without patchcord, through a kernel vxlan device) is dropped as
// drop_unknown_tunnel; once the stranger is a listed node, VXLAN with the
// wrong VNI is dropped as drop_bad_vni. The monitor names the uplink and the
// outer 5-tuple.
func TestTunnelDrops(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	c := newNode(t, ctx)
	stranger := e2e.AddNodes(t, c.l, 99)[0]
	// IPv6 off before any vxlan device exists: its router solicitations
	// and MLD reports would be tunnelled to node 1 and dropped too.
	if _, err := stranger.Exec(ctx, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
		t.Fatal(err)
	}
	// tunnel makes vx, the only route toward node 1's pods, with VNI vni
	// and a fixed inner MAC for pod b (no ARP through the tunnel either).
	tunnel := func(vni int) {
		t.Helper()
		stranger.Exec(ctx, "ip", "link", "del", "vx")
		for _, cmd := range [][]string{
			{"ip", "link", "add", "vx", "type", "vxlan", "id", fmt.Sprint(vni), "local", stranger.IP.String(),
				"remote", c.n.IP.String(), "dstport", "4789", "dev", "eth0", "nolearning"},
			{"ip", "addr", "add", "10.244.99.1/32", "dev", "vx"},
			{"ip", "link", "set", "vx", "up"},
			{"ip", "route", "add", c.n.PodCIDR.String(), "dev", "vx", "src", "10.244.99.1"},
			{"ip", "neigh", "add", c.b.IP.String(), "lladdr", "02:00:00:00:00:01", "dev", "vx", "nud", "permanent"},
		} {
			if _, err := stranger.Exec(ctx, cmd[0], cmd[1:]...); err != nil {
				t.Fatal(err)
			}
		}
	}
	// dropped sends three pings through the tunnel and checks that stats,
	// monitor and status show exactly three drops for reason.
	dropped := func(reason string) {
		t.Helper()
		before := e2e.Stats(t, ctx, c.n)
		stBefore, _ := c.status(t, ctx)
		mon := e2e.StartMonitor(t, ctx, c.n, "--type", "drop", "-o", "json", "--count", "3")
		stranger.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "1", c.b.IP.String())
		evs := monitorEvents(t, ctx, mon)
		wantEvents(t, evs, 3, e2e.MonitorEvent{
			Kind: "drop", Program: "from_uplink", Ifname: "eth0", Reason: reason,
			EthProto: "ipv4", Proto: "udp", Src: stranger.IP.String(), Dst: c.n.IP.String(), Dport: 4789,
		})
		after := e2e.Stats(t, ctx, c.n)
		for _, name := range []string{"drop_unknown_tunnel", "drop_bad_vni", "drop_no_endpoint", "drop_malformed", "decap"} {
			want := uint64(0)
			if name == reason {
				want = 3
			}
			if d := counterDelta(before, after, name); d != want {
				t.Errorf("bpf stats: %s grew by %d, want %d", name, d, want)
			}
		}
		st, _ := c.status(t, ctx)
		if d := st.Drops[reason] - stBefore.Drops[reason]; d != 3 || st.DropTotal-stBefore.DropTotal != 3 {
			t.Errorf("status: %s grew by %d, all drops by %d; want 3", reason, d, st.DropTotal-stBefore.DropTotal)
		}
	}

	t.Run("unknown source", func(t *testing.T) {
		tunnel(1)
		dropped("drop_unknown_tunnel")
	})
	t.Run("bad vni", func(t *testing.T) {
		e2e.WriteNodes(t, c.nodes, e2e.EntryOf(c.n), e2e.EntryOf(stranger))
		err := lab.WaitFor(ctx, "agent to list node 99", func(ctx context.Context) error {
			out, err := c.n.CLI(ctx, "bpf", "node", "list", "-o", "json")
			if err != nil {
				return err
			}
			if !bytes.Contains(out, []byte(stranger.IP.String())) {
				return fmt.Errorf("not listed: %s", out)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		tunnel(2)
		dropped("drop_bad_vni")
	})
}

// TestTraces: a trace monitor sees one local_redirect per forwarded
// packet, with both veths, and tracing is off again once it exits; with two
// trace monitors it stays on until the last one exits.
func TestTraces(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	c := newNode(t, ctx)
	epA, epB := c.endpoint(t, ctx, c.a), c.endpoint(t, ctx, c.b)
	tracing := func(want bool, what string) {
		t.Helper()
		st, _ := c.status(t, ctx)
		if st.Tracing != want || st.Monitoring != want {
			t.Errorf("%s: tracing %v, monitoring %v; want %v", what, st.Tracing, st.Monitoring, want)
		}
	}
	tracing(false, "before any monitor")
	// Resolve the gateway first, so that the pings are all there is.
	e2e.Ping(t, ctx, c.a, c.b.IP.String(), "-c", "1")

	t.Run("one monitor", func(t *testing.T) {
		mon := e2e.StartMonitor(t, ctx, c.n, "--type", "trace", "-o", "json", "--count", "6")
		tracing(true, "while a monitor runs")
		e2e.Ping(t, ctx, c.a, c.b.IP.String())
		evs := monitorEvents(t, ctx, mon)
		var requests, replies []e2e.MonitorEvent
		for _, ev := range evs {
			if ev.Src == c.a.IP.String() {
				requests = append(requests, ev)
			} else {
				replies = append(replies, ev)
			}
		}
		wantEvents(t, requests, 3, e2e.MonitorEvent{
			Kind: "trace", Program: "from_pod", Reason: "local_redirect", Ifname: epA.Ifname, Ifindex: epA.Ifindex,
			Target: epB.Ifindex, TargetIfname: epB.Ifname, Proto: "icmp", Src: c.a.IP.String(), Dst: c.b.IP.String(),
		})
		wantEvents(t, replies, 3, e2e.MonitorEvent{
			Kind: "trace", Program: "from_pod", Reason: "local_redirect", Ifname: epB.Ifname, Ifindex: epB.Ifindex,
			Target: epA.Ifindex, TargetIfname: epA.Ifname, Proto: "icmp", Src: c.b.IP.String(), Dst: c.a.IP.String(),
		})
		tracing(false, "after the monitor exited")
	})

	t.Run("two monitors", func(t *testing.T) {
		first := e2e.StartMonitor(t, ctx, c.n, "--type", "trace")
		second := e2e.StartMonitor(t, ctx, c.n, "--type", "all")
		tracing(true, "while two monitors run")
		if err := first.Stop(); err != nil {
			t.Fatal(err)
		}
		tracing(true, "after the first monitor exited")
		if err := second.Stop(); err != nil {
			t.Fatal(err)
		}
		tracing(false, "after both monitors exited")
		// With nobody tracing, forwarding adds no events.
		mon := e2e.StartMonitor(t, ctx, c.n, "--type", "drop", "-o", "json")
		e2e.Ping(t, ctx, c.a, c.b.IP.String())
		if err := mon.Stop(); err != nil {
			t.Fatal(err)
		}
		out, _ := mon.Output()
		if evs := e2e.ParseEvents(t, out); len(evs) != 0 {
			t.Errorf("events without tracing: %+v", evs)
		}
	})
}

// TestStatusAndProgList: status is healthy on a node with its agent and
// pods, and `bpf prog list` shows every attachment; a pod that loses its
// from_pod, or a stopped agent, makes status fail, and a restarted agent
// repairs both.
func TestStatusAndProgList(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	c := newNode(t, ctx)
	epA, epB := c.endpoint(t, ctx, c.a), c.endpoint(t, ctx, c.b)

	st, ok := c.status(t, ctx)
	if !ok || !st.Loaded || !st.AgentRunning || st.Endpoints != 2 || st.Nodes != 0 || len(st.Problems) != 0 {
		t.Errorf("healthy node: ok %v, status %+v", ok, st)
	}
	if cfg := st.Config; cfg == nil || !cfg.Configured || cfg.NodeIP != c.n.IP.String() || cfg.Uplink != "eth0" || cfg.VNI != 1 || cfg.VXLANPort != 4789 || cfg.PodMTU != 1450 {
		t.Errorf("node config: %+v", cfg)
	}
	if len(st.Programs) != len(datapath.Programs()) || slices.ContainsFunc(st.Programs, func(p views.Program) bool { return p.ID == 0 || len(p.Tag) != 16 }) {
		t.Errorf("programs: %+v", st.Programs)
	}
	if out, err := c.n.CLI(ctx, "status"); err != nil || !bytes.Contains(out, []byte("Status       OK")) {
		t.Errorf("status table: %v\n%s", err, out)
	}

	type key struct{ prog, ifname, dir, status string }
	want := []key{
		{"from_pod", epA.Ifname, "ingress", "ok"},
		{"from_pod", epB.Ifname, "ingress", "ok"},
		{"from_uplink", "eth0", "ingress", "ok"},
		{"to_uplink", "eth0", "egress", "ok"},
		{"from_tunnel", agent.GRODevice, "ingress", "ok"},
	}
	slices.SortFunc(want[:2], func(a, b key) int { return strings.Compare(a.ifname, b.ifname) })
	progKeys := func(rows []views.Prog) []key {
		var ks []key
		for _, r := range rows {
			ks = append(ks, key{r.Program, r.Ifname, r.Direction, r.Status})
			if r.Status == "ok" && (r.ProgID == 0 || r.LinkID == 0 || len(r.Tag) != 16 || r.Ifindex == 0 ||
				r.Pin != filepath.Join(c.n.BpffsRoot, "links", r.Program, r.Ifname)) {
				t.Errorf("prog list row: %+v", r)
			}
		}
		return ks
	}
	rows := c.progs(t, ctx)
	if got := progKeys(rows); !slices.Equal(got, want) {
		t.Errorf("prog list:\n got %v\nwant %v", got, want)
	}

	// The agent restores a lost attachment within 10 s: stop it first, so
	// that what follows is not a race with its repair.
	if err := c.agent.Stop(); err != nil {
		t.Fatal(err)
	}
	st, ok = c.status(t, ctx)
	if ok || st.AgentRunning || !slices.ContainsFunc(st.Problems, func(p string) bool { return strings.HasPrefix(p, "agent not running") }) {
		t.Errorf("agent stopped: ok %v, problems %q", ok, st.Problems)
	}

	if err := os.Remove(filepath.Join(c.n.BpffsRoot, "links", "from_pod", epA.Ifname)); err != nil {
		t.Fatal(err)
	}
	st, ok = c.status(t, ctx)
	lost := fmt.Sprintf("from_pod is not attached to %s (pod %s)", epA.Ifname, c.a.IP)
	if ok || !slices.ContainsFunc(st.Problems, func(p string) bool { return strings.HasPrefix(p, lost) }) {
		t.Errorf("from_pod detached: ok %v, problems %q", ok, st.Problems)
	}
	want[0].status = "missing"
	if epA.Ifname > epB.Ifname {
		want[0].status, want[1].status = "ok", "missing"
	}
	rows = c.progs(t, ctx)
	got := progKeys(rows)
	if !slices.Equal(got, want) {
		t.Errorf("prog list after detach:\n got %v\nwant %v", got, want)
	}
	for _, r := range rows {
		if r.Status == "missing" && (r.PodIP != c.a.IP.String() || r.Ifindex != epA.Ifindex || r.Pin != "" || r.ProgID != 0) {
			t.Errorf("missing row: %+v", r)
		}
	}
	if out, err := c.n.CLI(ctx, "status"); err == nil || !bytes.Contains(out, []byte("BROKEN")) || !bytes.Contains(out, []byte(lost)) {
		t.Errorf("status table after detach: exit %v\n%s", err, out)
	}

	// A new agent reattaches at start, before it reports ready.
	c.agent = e2e.StartAgent(t, ctx, c.n, c.nodes)
	if st, ok := c.status(t, ctx); !ok {
		t.Errorf("after the agent restarted: problems %q", st.Problems)
	}
	want[0].status, want[1].status = "ok", "ok"
	if got := progKeys(c.progs(t, ctx)); !slices.Equal(got, want) {
		t.Errorf("prog list after repair:\n got %v\nwant %v", got, want)
	}
}

// TestNotLoaded: on a node where nothing is pinned, every command says
// what to do, and status fails.
func TestNotLoaded(t *testing.T) {
	t.Parallel()
	l := e2e.NewLab(t)
	ctx := e2e.Ctx(t)
	n := e2e.AddNodes(t, l, 1)[0]
	for _, args := range [][]string{{"status"}, {"bpf", "prog", "list"}, {"monitor"}, {"bpf", "stats"}} {
		out, err := n.CLI(ctx, args...)
		if err == nil || !bytes.Contains(out, []byte("is the agent or the CNI plugin installed?")) {
			t.Errorf("%v on an empty node: exit %v\n%s", args, err, out)
		}
	}
}
