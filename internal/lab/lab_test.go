// Tests of the lab itself: a two-node fabric that passes traffic, and teardown that leaves
// nothing behind after success, partial failure, a signal or a crash. Root only.
package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// rootState is what the lab must never change in the root namespace.
func rootState(tb testing.TB) []string {
	tb.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		tb.Fatalf("list root links: %v", err)
	}
	var s []string
	for _, l := range links {
		s = append(s, "link "+l.Attrs().Name)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		tb.Fatalf("list root addrs: %v", err)
	}
	for _, a := range addrs {
		s = append(s, "addr "+a.IPNet.String())
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		tb.Fatalf("list root routes: %v", err)
	}
	for _, r := range routes {
		s = append(s, "route "+r.String())
	}
	slices.Sort(s)
	return s
}

// assertGone checks that nothing of the lab with this prefix and dir is left.
func assertGone(tb testing.TB, prefix, dir string) {
	tb.Helper()
	left, err := netnsWithPrefix(prefix + "-")
	if err != nil {
		tb.Fatal(err)
	}
	if len(left) > 0 {
		tb.Errorf("namespaces left: %v", left)
	}
	mps, err := mountPoints()
	if err != nil {
		tb.Fatal(err)
	}
	for _, m := range mps {
		if strings.HasPrefix(m, dir+"/") {
			tb.Errorf("mount left: %s", m)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		tb.Errorf("lab dir left: %s (stat: %v)", dir, err)
	}
}

// pidsInNetns lists the processes living in a namespace.
func pidsInNetns(tb testing.TB, path string) []int {
	tb.Helper()
	var want unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		tb.Fatalf("stat %s: %v", path, err)
	}
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			pids = append(pids, pid)
		}
	}
	return pids
}

func alive(pid int) bool {
	// A zombie still answers kill(0); only a running process counts.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z"
}

func mustAddNode(tb testing.TB, l *Lab, i int) *Node {
	tb.Helper()
	n, err := l.AddNode(i)
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

func TestTwoNodes(t *testing.T) {
	RequireRoot(t)
	before := rootState(t)
	l := NewForTest(t, Options{})
	n1 := mustAddNode(t, l, 1)
	n2 := mustAddNode(t, l, 2)
	ctx := t.Context()

	t.Run("addresses", func(t *testing.T) { twoNodesAddresses(t, ctx, l, n1, n2) })

	t.Run("ping", func(t *testing.T) { twoNodesPing(t, ctx, l, n1, n2) })

	// The same path without any tool: a socket made inside a namespace stays in it.
	t.Run("tcp", func(t *testing.T) { twoNodesTCP(t, ctx, l, n1, n2) })

	t.Run("bpffs", func(t *testing.T) { twoNodesBpffs(t, ctx, l, n1, n2) })

	t.Run("conflists", func(t *testing.T) { twoNodesConflists(t, ctx, l, n1, n2) })

	t.Run("wait listening", func(t *testing.T) { twoNodesWaitListening(t, ctx, l, n1, n2) })

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	assertGone(t, l.Prefix, l.Dir)
	if _, err := l.AddNode(3); err == nil {
		t.Errorf("AddNode after Close succeeded")
	}
	if after := rootState(t); !slices.Equal(before, after) {
		t.Errorf("root namespace changed:\nbefore %q\nafter  %q", before, after)
	}
}

// twoNodesAddresses is the addresses step of TestTwoNodes.
func twoNodesAddresses(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	if got, want := n2.IP.String(), "198.18.0.2"; got != want {
		t.Errorf("node 2 IP = %s, want %s", got, want)
	}
	if got, want := n2.PodCIDR.String(), "10.244.2.0/24"; got != want {
		t.Errorf("node 2 pod CIDR = %s, want %s", got, want)
	}
	out, err := n1.Exec(ctx, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "198.18.0.1/24") {
		t.Errorf("eth0 in node 1: %s", out)
	}
	out, err = n1.Exec(ctx, "cat", "/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(out)) != "1" {
		t.Errorf("ip_forward in node 1 = %q, want 1", out)
	}
}

// twoNodesPing is the ping step of TestTwoNodes.
func twoNodesPing(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	if out, err := n1.Exec(ctx, "ping", "-c1", "-W1", n2.IP.String()); err != nil {
		t.Fatalf("node 1 cannot ping node 2: %v\n%s", err, out)
	}
}

// twoNodesTCP is the tcp step of TestTwoNodes.
func twoNodesTCP(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	var ln net.Listener
	err := ns.WithNetNSPath(n2.NSPath, func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp4", n2.IP.String()+":0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, _ = io.WriteString(c, "hello from node 2")
			c.Close()
		}
	}()
	var got []byte
	err = ns.WithNetNSPath(n1.NSPath, func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp4", ln.Addr().String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		got, err = io.ReadAll(c)
		return err
	})
	if err != nil || string(got) != "hello from node 2" {
		t.Fatalf("node 1 -> node 2 tcp: %q, %v", got, err)
	}
}

// twoNodesBpffs is the bpffs step of TestTwoNodes.
func twoNodesBpffs(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	for _, n := range []*Node{n1, n2} {
		var st unix.Statfs_t
		mnt := filepath.Dir(n.BpffsRoot)
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		if st.Type != unix.BPF_FS_MAGIC {
			t.Errorf("%s: fs magic %#x, want bpffs %#x", mnt, st.Type, unix.BPF_FS_MAGIC)
		}
	}
	var st1, st2 unix.Stat_t
	_ = unix.Stat(filepath.Dir(n1.BpffsRoot), &st1)
	_ = unix.Stat(filepath.Dir(n2.BpffsRoot), &st2)
	if st1.Dev == st2.Dev {
		t.Errorf("nodes 1 and 2 share one bpffs")
	}
}

// twoNodesConflists is the conflists step of TestTwoNodes.
func twoNodesConflists(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	for name, conf := range map[string][]byte{"primary": n2.PrimaryConflist(), "chained": n2.ChainedPTPConflist()} {
		if err := n2.WriteConflist(name, conf); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(filepath.Join(n2.ConfDir, "chained.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"cniVersion":"1.1.0","name":"patchcord-ptp","plugins":[{"type":"ptp","ipMasq":false,"mtu":1450,` +
		`"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.2.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"` + n2.IPAMDir + `"}},` +
		`{"type":"patchcord-cni","bpffsRoot":"` + n2.BpffsRoot + `"}]}`
	if string(got) != want {
		t.Errorf("chained conflist:\n got %s\nwant %s", got, want)
	}
	want = `{"cniVersion":"1.1.0","name":"patchcord","plugins":[{"type":"patchcord-cni","bpffsRoot":"` + n2.BpffsRoot + `",` +
		`"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.2.0/24"}]],"dataDir":"` + n2.IPAMDir + `"}}]}`
	if got := string(n2.PrimaryConflist()); got != want {
		t.Errorf("primary conflist:\n got %s\nwant %s", got, want)
	}
}

// twoNodesWaitListening is the wait listening step of TestTwoNodes.
func twoNodesWaitListening(t *testing.T, ctx context.Context, l *Lab, n1, n2 *Node) {
	srv, err := n2.Start(ctx, "iperf3", "-s", "-1", "-p", "5201")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.WaitListening(ctx, 5201); err != nil {
		out, _ := srv.Output()
		t.Fatalf("%v\n%s", err, out)
	}
	if err := n2.WaitListening(ctx, 5201); err != nil {
		t.Fatal(err)
	}
	if out, err := n1.Exec(ctx, "iperf3", "-c", n2.IP.String(), "-p", "5201", "-n", "1M"); err != nil {
		t.Fatalf("iperf3 node 1 -> node 2: %v\n%s", err, out)
	}
	if err := srv.Wait(); err != nil {
		t.Errorf("iperf3 server: %v", err)
	}
	// A server that dies is reported at once, not after the timeout.
	dead, err := n2.Start(ctx, "false")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := dead.WaitListening(ctx, 5202); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("WaitListening on a dead process: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("dead process noticed after %s", d)
	}
}

func TestCloseAfterPartialFailure(t *testing.T) {
	RequireRoot(t)
	l := NewForTest(t, Options{})
	n1 := mustAddNode(t, l, 1)
	// A file where node 2's directory goes makes AddNode fail after its namespace and
	// uplink exist.
	if err := os.WriteFile(filepath.Join(l.Dir, "n2"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddNode(2); err == nil {
		t.Fatal("AddNode(2) succeeded over a file")
	} else {
		t.Logf("AddNode(2): %v", err)
	}
	if left, _ := netnsWithPrefix(l.Prefix + "-n2"); len(left) > 0 {
		t.Errorf("failed AddNode left %v", left)
	}
	for _, i := range []int{0, 255, 1} {
		if _, err := l.AddNode(i); err == nil {
			t.Errorf("AddNode(%d) succeeded", i)
		}
	}
	if got := l.Nodes(); len(got) != 1 || got[0] != n1 {
		t.Errorf("Nodes() = %v, want only node 1", got)
	}
	if _, err := n1.Exec(t.Context(), "true"); err != nil {
		t.Errorf("node 1 broken by node 2's failure: %v", err)
	}
	// Node 2 can be added once the obstacle is gone.
	if err := os.Remove(filepath.Join(l.Dir, "n2")); err != nil {
		t.Fatal(err)
	}
	mustAddNode(t, l, 2)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, l.Prefix, l.Dir)
}

func TestProcesses(t *testing.T) {
	RequireRoot(t)
	l := NewForTest(t, Options{})
	n := mustAddNode(t, l, 1)
	ctx := t.Context()

	p, err := n.Start(ctx, "sleep", "infinity")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(); err != nil {
		t.Errorf("Stop: %v", err)
	}
	p, err = n.Start(ctx, "sh", "-c", "echo out; echo err >&2; exit 3")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(); err == nil {
		t.Errorf("Wait of exit 3 = nil")
	}
	if out, _ := p.Output(); string(out) != "out\nerr\n" {
		t.Errorf("output %q", out)
	}
	if err := p.Stop(); err == nil {
		t.Errorf("Stop of a failed process = nil")
	}
	if _, err := n.Exec(ctx, "false"); err == nil {
		t.Errorf("Exec(false) = nil")
	}

	// A process that ignores SIGTERM is killed, and Stop says so.
	p, err = n.Start(ctx, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	if err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(ctx, "trap installed", func(context.Context) error {
		if out, _ := p.Output(); !strings.Contains(string(out), "ready") {
			return fmt.Errorf("no output yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.Stop(); err == nil {
		t.Errorf("Stop of a SIGTERM-immune process = nil")
	}
	if d := time.Since(start); d < stopTimeout {
		t.Errorf("killed after %s, before the %s grace", d, stopTimeout)
	}

	// What Close must end: a process it started, and a daemon it did not.
	running, err := n.Start(ctx, "sleep", "infinity")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.Exec(ctx, "setsid", "-f", "sleep", "infinity"); err != nil {
		t.Fatal(err)
	}
	// Start returns once nsenter runs; it joins the namespace a moment later
	// (CI saw only the daemon there once, on a loaded machine).
	var pids []int
	if err := WaitFor(ctx, "sleep and the daemon in the node's namespace", func(context.Context) error {
		if pids = pidsInNetns(t, n.NSPath); len(pids) != 2 {
			return fmt.Errorf("processes there: %v", pids)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-running.Done():
	default:
		t.Errorf("process still running after Close")
	}
	for _, pid := range pids {
		if err := WaitFor(ctx, "pid to exit", func(context.Context) error {
			if alive(pid) {
				return fmt.Errorf("pid %d alive", pid)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	}
	assertGone(t, l.Prefix, l.Dir)
}

// TestHelperProcess is the lab owner in the crash and signal tests, run as a child.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv("PCLAB_HELPER")
	if mode == "" {
		return // only a helper for the crash and signal tests
	}
	l, err := New(Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	n, err := l.AddNode(1)
	if err == nil {
		_, err = n.Start(context.Background(), "sleep", "infinity")
	}
	if err == nil {
		// A daemon: outlives its parent, so only a sweep of the namespace ends it.
		_, err = n.Exec(context.Background(), "setsid", "-f", "sleep", "infinity")
	}
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("lab", l.Prefix, l.Dir)
	switch mode {
	case "crash":
		os.Exit(0) // no Close: as if killed
	case "signal":
		select {} // until the parent's signal
	}
}

// startHelper runs TestHelperProcess in mode and returns its lab's prefix and dir.
func startHelper(t *testing.T, mode string) (*exec.Cmd, string, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.v")
	cmd.Env = append(os.Environ(), "PCLAB_HELPER="+mode)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "lab" {
			go func() { _, _ = io.Copy(io.Discard, out) }()
			return cmd, f[1], f[2]
		}
		if len(f) > 0 && f[0] == "error" {
			t.Fatalf("helper: %s", sc.Text())
		}
	}
	_ = cmd.Wait()
	t.Fatalf("helper printed no lab")
	return nil, "", ""
}

func TestSweepAfterCrash(t *testing.T) {
	RequireRoot(t)
	// A live lab in this process, which Sweep must not touch.
	mine := NewForTest(t, Options{})
	mustAddNode(t, mine, 1)

	cmd, prefix, dir := startHelper(t, "crash")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	left, _ := netnsWithPrefix(prefix + "-")
	if len(left) == 0 {
		t.Fatalf("crashed helper left nothing to sweep")
	}
	nodeNS := filepath.Join(netnsDir, prefix+"-n1")
	// Pdeathsig ended the started sleep with the helper; the daemon lives on.
	var daemons []int
	if err := WaitFor(t.Context(), "only the daemon left", func(context.Context) error {
		daemons = pidsInNetns(t, nodeNS)
		if len(daemons) != 1 {
			return fmt.Errorf("processes %v", daemons)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	if err := Sweep(""); err != nil {
		t.Fatalf("Sweep: %v", err)
	}
	assertGone(t, prefix, dir)
	if err := WaitFor(t.Context(), "daemon killed", func(context.Context) error {
		if alive(daemons[0]) {
			return fmt.Errorf("pid %d alive", daemons[0])
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if left, _ := netnsWithPrefix(mine.Prefix + "-"); len(left) != 2 {
		t.Errorf("Sweep touched a live lab: %v left of its fabric and node", left)
	}
	if err := Sweep("other-"); err == nil {
		t.Errorf("Sweep accepted a prefix outside %s", NamePrefix)
	}
}

func TestSignalClosesLab(t *testing.T) {
	RequireRoot(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd, prefix, dir := startHelper(t, "signal")
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			err := cmd.Wait()
			ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != sig {
				t.Errorf("helper exit: %v, want death by %s after cleanup", err, sig)
			}
			// Also the daemon is gone: otherwise its namespace would outlive the lab.
			assertGone(t, prefix, dir)
		})
	}
}

func TestNamedLab(t *testing.T) {
	RequireRoot(t)
	name := fmt.Sprintf("t%d", os.Getpid())
	l := NewForTest(t, Options{Name: name})
	if want := NamePrefix + name; l.Prefix != want {
		t.Errorf("prefix %s, want %s", l.Prefix, want)
	}
	if _, err := New(Options{Name: name}); err == nil {
		t.Errorf("second lab named %s created", name)
	}
	for _, bad := range []string{"has-dash", "UPPER", "waytoolongname"} {
		if _, err := New(Options{Name: bad}); err == nil {
			t.Errorf("lab named %q created", bad)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	again := NewForTest(t, Options{Name: name})
	mustAddNode(t, again, 7)
}
