// Under a container runtime: Debian's containerd and runc on emulated nodes (internal/lab's
// StartContainerd), with the primary example conflist, driven by crictl as a kubelet would.
// Sandboxes get addresses and reach each other on the node and across nodes, hostPorts
// work, stopp and rmp release everything, and a containerd restart with pods running
// loses no packet. Fifty sandboxes made and removed at once leave nothing behind. A
// plugin SIGKILLed at each step of ADD leaves state that the runtime's DEL, or else GC,
// removes entirely.
package runtime

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// exampleConflist is the conflist the runtime tests install: what the README tells users to
// drop into /etc/cni/net.d.
const exampleConflist = "05-patchcord.conflist"

// startContainerd starts containerd on n; it is closed before the lab.
func startContainerd(t *testing.T, ctx context.Context, n *lab.Node) *lab.Containerd {
	t.Helper()
	for _, bin := range []string{"containerd", "runc", "ctr"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found: run `make deps` (apt-get install containerd runc)", bin)
		}
	}
	c, err := n.StartContainerd(ctx, lab.ContainerdOptions{Crictl: e2e.Crictl(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close containerd: %v", err)
		}
	})
	return c
}

// runPods runs sandboxes with the given specs, all at once.
func runPods(t *testing.T, ctx context.Context, c *lab.Containerd, specs ...lab.SandboxSpec) []*lab.Sandbox {
	t.Helper()
	pods := make([]*lab.Sandbox, len(specs))
	e2e.InParallel(t, len(specs), func(i int) (err error) {
		pods[i], err = c.RunPod(ctx, specs[i])
		return err
	})
	return pods
}

// assertReleased checks that the runtime holds nothing of sandboxes beyond keep: no
// cached CNI result, no netns mount in containerd's mount namespace, no sandbox cgroup.
func assertReleased(t *testing.T, c *lab.Containerd, keep ...*lab.Sandbox) {
	t.Helper()
	var ids []string
	for _, s := range keep {
		ids = append(ids, s.ID)
	}
	results, _ := os.ReadDir(filepath.Join(c.CNICacheDir, "results"))
	for _, e := range results {
		if !slices.ContainsFunc(ids, func(id string) bool { return strings.Contains(e.Name(), id) }) {
			t.Errorf("cached CNI result %s left", e.Name())
		}
	}
	mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", c.Daemon().Pid()))
	if err != nil {
		t.Fatal(err)
	}
	var netns int
	for line := range strings.Lines(string(mounts)) {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], c.Dir+"/") && strings.Contains(f[4], "/netns/") {
			netns++
		}
	}
	if netns != len(keep) {
		t.Errorf("%d sandbox netns mounts in containerd's mount namespace, want %d", netns, len(keep))
	}
	// A v1 controller's hierarchy where there is one, else the unified one.
	var cgroups []os.DirEntry
	for _, h := range []string{"pids", "memory", ""} {
		if entries, err := os.ReadDir(filepath.Join("/sys/fs/cgroup", h, c.CgroupParent)); err == nil {
			cgroups = entries
			break
		}
	}
	var dirs int
	for _, e := range cgroups {
		if e.IsDir() {
			dirs++
		}
	}
	if dirs != len(keep) {
		t.Errorf("%d sandbox cgroups below %s, want %d", dirs, c.CgroupParent, len(keep))
	}
}

// TestContainerd runs sandboxes a and web (hostPort 8081 to its port 80) on node
// 1 and c on node 2, each node with its agent and its own containerd.
func TestContainerd(t *testing.T) {
	ctx := e2e.Ctx(t)
	cl := e2e.NewCluster(t, ctx, exampleConflist, 2)
	n1, n2 := cl.Nodes[0], cl.Nodes[1]
	cds := []*lab.Containerd{startContainerd(t, ctx, n1), startContainerd(t, ctx, n2)}
	cd1, cd2 := cds[0], cds[1]
	images, err := cd1.Crictl(ctx, "images")
	if err != nil || !strings.Contains(string(images), strings.Split(lab.PauseImage, ":")[0]) {
		t.Fatalf("crictl images does not list %s: %v\n%s", lab.PauseImage, err, images)
	}

	pods1 := runPods(t, ctx, cd1, lab.SandboxSpec{Name: "a"},
		lab.SandboxSpec{Name: "web", PortMappings: []lab.PortMapping{{ContainerPort: 80, HostPort: 8081}}})
	a, web := pods1[0], pods1[1]
	c := runPods(t, ctx, cd2, lab.SandboxSpec{Name: "c"})[0]
	e2e.AssertRegistered(t, ctx, n1, "", e2e.RefOfSandbox(a), e2e.RefOfSandbox(web))
	e2e.AssertRegistered(t, ctx, n2, "", e2e.RefOfSandbox(c))

	t.Run("reach", func(t *testing.T) {
		e2e.PingRedirected(t, ctx, n1, a, web.IP, 10)
		e2e.Ping(t, ctx, a, c.IP.String())
		e2e.Ping(t, ctx, c, web.IP.String())
		e2e.Ping(t, ctx, n1, a.IP.String())
		e2e.Ping(t, ctx, a, n1.IP.String())
		if st := e2e.Stats(t, ctx, n2); st["encap"].Packets == 0 || st["decap"].Packets == 0 {
			t.Errorf("node 2 neither encapsulated nor decapsulated: %+v", st)
		}
	})

	t.Run("hostport", func(t *testing.T) {
		e2e.IperfServer(t, ctx, web, 80)
		for _, from := range []e2e.Execer{n1, n2} {
			if _, err := e2e.IperfErr(ctx, from, n1.IP.String(), 8081, "-n", "256K"); err != nil {
				t.Errorf("hostPort %s:8081 of sandbox web: %v", n1.IP, err)
			}
		}
	})

	t.Run("restart", func(t *testing.T) {
		// Pings run across the restart; not one may go missing.
		const count = 80
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, dst := range []*lab.Sandbox{web, c} {
			wg.Go(func() { errs[i] = e2e.PingErr(ctx, a, dst.IP.String(), count, "-i", "0.05") })
		}
		pid := cd1.Daemon().Pid()
		if err := cd1.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		if cd1.Daemon().Pid() == pid {
			t.Fatal("containerd was not restarted")
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Errorf("during the restart: %v", err)
			}
		}
		for _, s := range []*lab.Sandbox{a, web} {
			ip := s.IP
			if err := s.Inspect(ctx); err != nil || s.IP != ip {
				t.Errorf("sandbox %s after the restart: %v, address %s (was %s)", s.Name, err, s.IP, ip)
			}
		}
		e2e.AssertRegistered(t, ctx, n1, "", e2e.RefOfSandbox(a), e2e.RefOfSandbox(web))
		e2e.Ping(t, ctx, a, web.IP.String())
		e2e.Ping(t, ctx, c, a.IP.String())
	})

	t.Run("stopp", func(t *testing.T) {
		if err := web.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		// CNI DEL ran: nothing of web is left but its stopped sandbox.
		e2e.AssertClean(t, ctx, n1, cl.Network, "", a.IP)
		out, err := cd1.Crictl(ctx, "pods", "-q", "--state", "notready")
		if err != nil || strings.TrimSpace(string(out)) != web.ID {
			t.Errorf("not-ready sandboxes: %v %q, want web's %s", err, out, web.ID)
		}
		if err := web.Remove(ctx); err != nil {
			t.Fatal(err)
		}
		out, err = cd1.Crictl(ctx, "pods", "-q")
		if err != nil || strings.TrimSpace(string(out)) != a.ID {
			t.Errorf("sandboxes after rmp: %v %q, want only a's %s", err, out, a.ID)
		}
		assertReleased(t, cd1, a)
		e2e.Ping(t, ctx, a, c.IP.String())
	})

	t.Run("rmp", func(t *testing.T) {
		for _, s := range []*lab.Sandbox{a, c} {
			if err := s.Remove(ctx); err != nil {
				t.Fatal(err)
			}
		}
		for i, n := range cl.Nodes {
			e2e.AssertClean(t, ctx, n, cl.Network, "")
			assertReleased(t, cds[i])
		}
	})
}

// TestParallel makes fifty sandboxes at once on a node whose datapath is not loaded
// yet, then removes them all at once.
func TestParallel(t *testing.T) {
	const count = 50
	ctx := e2e.Ctx(t)
	cl := e2e.NewCluster(t, ctx, exampleConflist, 1)
	n := cl.Nodes[0]
	c := startContainerd(t, ctx, n)
	specs := make([]lab.SandboxSpec, count)
	for i := range specs {
		specs[i] = lab.SandboxSpec{Name: fmt.Sprintf("p%02d", i)}
	}
	pods := runPods(t, ctx, c, specs...)
	seen := map[netip.Addr]string{}
	for _, s := range pods {
		if other, dup := seen[s.IP]; dup {
			t.Errorf("sandboxes %s and %s both got %s", other, s.Name, s.IP)
		}
		seen[s.IP] = s.Name
	}
	e2e.AssertRegistered(t, ctx, n, "", e2e.SandboxRefs(pods)...)
	if eps := e2e.Endpoints(t, ctx, n); len(eps) != count {
		t.Errorf("%d endpoints, want %d", len(eps), count)
	}
	e2e.Ping(t, ctx, pods[0], pods[count-1].IP.String())

	e2e.InParallel(t, count, func(i int) error { return pods[i].Remove(ctx) })
	e2e.AssertClean(t, ctx, n, cl.Network, "")
	assertReleased(t, c)
}

// addKiller wraps patchcord-cni and host-local in dir (scripts calling the real binaries),
// so that an ADD can be SIGKILLed at a chosen step. The step is read from a control file
// at each call:
//
//	""       run the real plugin;
//	"trace"  record patchcord-cni's bpf() calls (strace) to the trace file;
//	"ipam"   host-local leases an address, then kills its caller, patchcord-cni;
//	"bpf=N"  strace kills patchcord-cni at its Nth bpf() call (SIGKILL on syscall entry).
type addKiller struct {
	control, trace string
}

func newKiller(t *testing.T, dir, patchcord, hostLocal string) *addKiller {
	t.Helper()
	if _, err := exec.LookPath("strace"); err != nil {
		t.Fatal("strace not found: run `make deps`")
	}
	k := &addKiller{control: filepath.Join(dir, "kill-at"), trace: filepath.Join(dir, "bpf.trace")}
	scripts := map[string]string{
		"patchcord-cni": fmt.Sprintf(`#!/bin/sh
at=$(cat %[1]q 2>/dev/null)
if [ "$CNI_COMMAND" = ADD ]; then
	case "$at" in
	trace) exec strace -f -qq -e trace=bpf -o %[2]q %[3]q ;;
	bpf=*) exec strace -f -qq -e trace=bpf -e inject=bpf:signal=KILL:when=${at#bpf=} -o /dev/null %[3]q ;;
	esac
fi
exec %[3]q
`, k.control, k.trace, patchcord),
		"host-local": fmt.Sprintf(`#!/bin/sh
at=$(cat %[1]q 2>/dev/null)
%[2]q
rc=$?
if [ "$CNI_COMMAND" = ADD ] && [ "$at" = ipam ]; then
	kill -KILL $PPID
fi
exit $rc
`, k.control, hostLocal),
	}
	for name, body := range scripts {
		path := filepath.Join(dir, name)
		os.Remove(path) // a symlink to the real plugin, in a runtime's bin dir
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

func (k *addKiller) set(t *testing.T, at string) {
	t.Helper()
	if err := os.WriteFile(k.control, []byte(at), 0o644); err != nil {
		t.Fatal(err)
	}
}

// killPoint is a step of ADD at which the plugin dies, with what must exist then
// beyond what existed before: address leases, pod veths and the entries of each map.
type killPoint struct {
	name string
	// bpf is the bpf() call, counted from the plugin's start, at whose entry strace
	// kills it; 0 for the kill by host-local.
	bpf  int
	left map[string]int
}

// at is the killer's control value.
func (p killPoint) at() string {
	if p.bpf == 0 {
		return "ipam"
	}
	return fmt.Sprintf("bpf=%d", p.bpf)
}

var bpfCall = regexp.MustCompile(`^(\d+) +bpf\((\w+)`)

// killPoints reads a trace of one complete ADD and places the kills: once IPAM has
// leased (the veth, made before IPAM, is there), then at the registration's first map
// write (nothing registered; from_pod is attached but unrecorded, so a tcx link died
// with the process and a tc filter went with nothing that names it), its second (only
// the owner entry written) and third (the anti-spoofing entry too), and at the pin that
// records the attachment (every entry written; with tcx nothing attached any more, with
// tc the filter is in and works, its record missing). The points are in ADD's order:
// each leaves a superset of what the one before leaves.
func killPoints(t *testing.T, trace string) []killPoint {
	t.Helper()
	f, err := os.Open(trace)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type call struct{ tid, cmd string }
	var calls []call
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := bpfCall.FindStringSubmatch(sc.Text()); m != nil {
			calls = append(calls, call{m[1], m[2]})
		}
	}
	// strace counts calls per thread: keep the thread that records the
	// attachment, the last pin of ADD.
	const record = "BPF_OBJ_PIN"
	var tid string
	for _, c := range calls {
		if c.cmd == record {
			tid = c.tid
		}
	}
	var cmds []string
	for _, c := range calls {
		if c.tid == tid {
			cmds = append(cmds, c.cmd)
		}
	}
	pin := slices.Index(cmds, record)
	var updates []int
	for i := pin - 1; i >= 0 && len(updates) < 3; i-- {
		if cmds[i] == "BPF_MAP_UPDATE_ELEM" {
			updates = append([]int{i}, updates...)
		}
	}
	if pin < 0 || len(updates) != 3 || updates[2]-updates[0] != 2 {
		t.Fatalf("ADD's bpf() calls are not what the kill points assume (three map writes, then %s): %v", record, cmds)
	}
	registering := map[string]int{"lease": 1, "veth": 1}
	return []killPoint{
		{"ipam", 0, registering},
		{"veth", updates[0] + 1, registering},
		{"owner", updates[1] + 1, map[string]int{"lease": 1, "veth": 1, "ep_meta": 1}},
		{"antispoof", updates[2] + 1, map[string]int{"lease": 1, "veth": 1, "ep_meta": 1, "ep_by_ifindex": 1}},
		{"endpoint", pin + 1, map[string]int{"lease": 1, "veth": 1, "ep_meta": 1, "ep_by_ifindex": 1, "endpoints": 1}},
	}
}

// killLevel tells which kill point left delta: its index, len(points) if ADD got further
// than the last (a pinned link), -1 if delta is no point's.
func killLevel(points []killPoint, delta map[string]int) int {
	for i, p := range points {
		if maps.Equal(delta, p.left) {
			return i
		}
	}
	if delta["pin"] > 0 {
		return len(points)
	}
	return -1
}

// mapCounts counts what pods hold on a node: leases of network, veths named prefix*,
// entries of each endpoint map, pinned from_pod links.
func mapCounts(t *testing.T, ctx context.Context, n *lab.Node, network, prefix string) map[string]int {
	t.Helper()
	counts := map[string]int{}
	leases, _ := os.ReadDir(filepath.Join(n.IPAMDir, network))
	for _, e := range leases {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			counts["lease"]++
		}
	}
	var links []struct {
		Ifname string `json:"ifname"`
	}
	e2e.IPJSON(t, ctx, n, &links, "link", "show", "type", "veth")
	for _, l := range links {
		if strings.HasPrefix(l.Ifname, prefix) {
			counts["veth"]++
		}
	}
	for _, m := range []string{"endpoints", "ep_by_ifindex", "ep_meta"} {
		keys, err := e2e.MapKeys(filepath.Join(n.BpffsRoot, "maps", m))
		if err != nil {
			t.Fatal(err)
		}
		counts[m] = len(keys)
	}
	pins, _ := os.ReadDir(filepath.Join(n.BpffsRoot, "links", "from_pod"))
	counts["pin"] = len(pins)
	return counts
}

// countDelta is after minus before, without zeros.
func countDelta(before, after map[string]int) map[string]int {
	d := map[string]int{}
	for k := range maps.Keys(after) {
		if v := after[k] - before[k]; v != 0 {
			d[k] = v
		}
	}
	return d
}

// TestKillMidAdd SIGKILLs patchcord-cni (primary mode) at each step of ADD: the
// runtime's DEL must then remove everything the dead ADD made (through cnitool and through
// containerd), and so must GC when no DEL comes. A live pod stays untouched throughout.
func TestKillMidAdd(t *testing.T) {
	t.Run("cnitool", killMidAddCnitool)

	t.Run("containerd", killMidAddContainerd)
}

// killMidAddCnitool is TestKillMidAdd through cnitool.
func killMidAddCnitool(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	cl := e2e.NewCluster(t, ctx, exampleConflist, 1)
	n := cl.Nodes[0]
	dir := filepath.Join(cl.Lab.Dir, "killer")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k := newKiller(t, dir, filepath.Join(e2e.BinDir(), "patchcord-cni"), filepath.Join(e2e.CNIPath(t)[0], "host-local"))
	cniPathKill := dir + ":" + strings.Join(e2e.CNIPathWithPlugin(t), ":")
	add := func(name string) (*e2e.CNIPod, error) {
		p := e2e.NewCNIPod(t, n, name, cl.Network, nil)
		p.CNIPath = cniPathKill
		out, err := p.CNI(ctx, "add")
		if err != nil {
			return p, fmt.Errorf("%w\n%s", err, out)
		}
		p.ReadAddr(t, ctx)
		return p, nil
	}

	live, err := add("live")
	if err != nil {
		t.Fatal(err)
	}
	k.set(t, "trace")
	cal, err := add("cal")
	if err != nil {
		t.Fatal(err)
	}
	k.set(t, "")
	cal.Del(t, ctx)
	points := killPoints(t, k.trace)

	// killAt makes pods whose ADD is killed at points[i] until one dies there: the
	// count of bpf() calls before a step varies now and then between runs, so what
	// a killed ADD left says where it died, and a kill that came early or late is
	// moved a call and tried again (at most four times). After each attempt, then
	// cleans up (or not).
	killAt := func(t *testing.T, i int, prefix string, then func(*e2e.CNIPod)) {
		t.Helper()
		pt := &points[i]
		for attempt := range 4 {
			before := mapCounts(t, ctx, n, cl.Network, "pc")
			k.set(t, pt.at())
			p, err := add(fmt.Sprintf("%s-%s-%d", prefix, pt.name, attempt))
			k.set(t, "")
			delta := countDelta(before, mapCounts(t, ctx, n, cl.Network, "pc"))
			level := len(points)
			if err != nil {
				level = killLevel(points, delta)
				// Nothing left at all: the kill came before IPAM, earlier
				// than any step (Go moves syscalls between threads, so the
				// per-thread count drifts): one later.
				if len(delta) == 0 && i > 0 {
					level = 0
				}
			}
			then(p)
			switch {
			// Two points may leave the same: it is this one's.
			case level == i || err != nil && maps.Equal(delta, pt.left):
				return
			case level < 0:
				t.Fatalf("%s: the killed ADD left %v, which is no step of ADD's", pt.name, delta)
			case pt.bpf == 0:
				t.Fatalf("%s: the killed ADD left %v, want %v", pt.name, delta, pt.left)
			case level > i:
				t.Logf("%s: kill at bpf() call %d came late (left %v): one earlier", pt.name, pt.bpf, delta)
				pt.bpf--
			default:
				t.Logf("%s: kill at bpf() call %d came early (left %v): one later", pt.name, pt.bpf, delta)
				pt.bpf++
			}
		}
		t.Errorf("%s: no kill left %v", pt.name, pt.left)
	}

	// Whatever a killed ADD left, DEL removes it.
	t.Run("del", func(t *testing.T) {
		for i := range points {
			killAt(t, i, "del", func(p *e2e.CNIPod) {
				if out, err := p.CNI(ctx, "del"); err != nil {
					t.Errorf("%s: DEL after the killed ADD: %v\n%s", p.Name, err, out)
				}
				p.RemoveNS()
				e2e.AssertClean(t, ctx, n, cl.Network, "", live.IP)
			})
		}
	})

	// No DEL comes (the runtime went away): GC, told only of the live pod,
	// removes what every killed ADD left (and any that got through).
	t.Run("gc", func(t *testing.T) {
		for i := range points {
			killAt(t, i, "gc", func(*e2e.CNIPod) {})
		}
		liveEP, ok := e2e.Endpoints(t, ctx, n)[live.IP.String()]
		if !ok {
			t.Fatal("the live pod lost its endpoint")
		}
		conflist, err := os.ReadFile(filepath.Join(n.ConfDir, cl.Network+".conflist"))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("before GC: %v", mapCounts(t, ctx, n, cl.Network, "pc"))
		e2e.GC(t, ctx, n, conflist, [][2]string{{liveEP.ContainerID, "eth0"}})
		t.Logf("after GC: %v", mapCounts(t, ctx, n, cl.Network, "pc"))
		e2e.AssertClean(t, ctx, n, cl.Network, "", live.IP)
	})

	e2e.Ping(t, ctx, live, n.IP.String())
	if out, err := live.CNI(ctx, "check"); err != nil {
		t.Errorf("check of the live pod: %v\n%s", err, out)
	}
}

// killMidAddContainerd is TestKillMidAdd through containerd.
func killMidAddContainerd(t *testing.T) {
	t.Parallel()
	ctx := e2e.Ctx(t)
	cl := e2e.NewCluster(t, ctx, exampleConflist, 1)
	n := cl.Nodes[0]
	c := startContainerd(t, ctx, n)
	k := newKiller(t, c.CNIBinDir, filepath.Join(e2e.BinDir(), "patchcord-cni"), filepath.Join(e2e.CNIPath(t)[0], "host-local"))
	live := runPods(t, ctx, c, lab.SandboxSpec{Name: "live"})[0]
	k.set(t, "trace")
	cal := runPods(t, ctx, c, lab.SandboxSpec{Name: "cal"})[0]
	k.set(t, "")
	if err := cal.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	// containerd DELs at once: what the dead ADD left cannot be looked at, only
	// that the plugin died of the SIGKILL (a kill placed past the end, as the count
	// of bpf() calls varies, is moved a call earlier).
	for _, pt := range killPoints(t, k.trace) {
		for attempt := 0; ; attempt++ {
			k.set(t, pt.at())
			s, err := c.RunPod(ctx, lab.SandboxSpec{Name: fmt.Sprintf("kill-%s-%d", pt.name, attempt)})
			k.set(t, "")
			if err == nil && pt.bpf > 0 && attempt < 3 {
				if err := s.Remove(ctx); err != nil {
					t.Fatal(err)
				}
				pt.bpf--
				continue
			}
			if err == nil || !strings.Contains(err.Error(), "signal: killed") {
				t.Fatalf("%s: runp: want the plugin killed (signal: killed), got %v", pt.name, err)
			}
			break
		}
		// containerd ran DEL when ADD failed, and dropped the sandbox.
		e2e.AssertClean(t, ctx, n, cl.Network, "", live.IP)
		assertReleased(t, c, live)
	}
	after := runPods(t, ctx, c, lab.SandboxSpec{Name: "after"})[0]
	e2e.Ping(t, ctx, live, after.IP.String())
}
