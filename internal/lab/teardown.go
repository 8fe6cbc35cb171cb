// Teardown: what Close and Sweep share (killing what runs in a namespace, unmounting,
// dropping cnitool's cache), the SIGINT/SIGTERM handler, and Sweep for crashed runs.
package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// cniResultsDir is where cnitool (libcni's default cache dir) keeps each attachment's
// result, keyed by network name and netns path, outside any lab directory.
const cniResultsDir = "/var/lib/cni/results"

func (l *Lab) mountBpffs(dir string) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.mounts = append(l.mounts, dir)
	l.mu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	if err := unix.Mount("bpffs", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return nil
}

func (l *Lab) unmountBpffs(dir string) error {
	if err := unmount(dir); err != nil {
		return err
	}
	l.mu.Lock()
	l.mounts = slices.DeleteFunc(l.mounts, func(m string) bool { return m == dir })
	l.mu.Unlock()
	return nil
}

// unmount takes down a mount, lazily if something still uses it (the objects pinned in a
// bpffs go when its last user does); a path that is no mount point is fine.
func unmount(path string) error {
	err := unix.Unmount(path, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(path, unix.MNT_DETACH)
	}
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("unmount %s: %w", path, err)
}

func unmountDetach(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("unmount %s: %w", path, err)
}

// killInNetns SIGKILLs every process whose network namespace is one of the named ones.
// Deleting a namespace's name does not end it while a process lives in it, and its veths
// would live on with it.
func killInNetns(names []string) error {
	type nsID struct{ dev, ino uint64 }
	want := map[nsID]string{}
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(netnsDir, n), &st); err != nil {
			continue // gone or never made: nothing can be inside
		}
		want[nsID{st.Dev, st.Ino}] = n
	}
	if len(want) == 0 {
		return nil
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("kill processes in lab netns: %w", err)
	}
	self := os.Getpid()
	var errs []error
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
			continue // exited meanwhile, or a kernel thread
		}
		if ns, ok := want[nsID{st.Dev, st.Ino}]; ok {
			if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("kill pid %d in %s: %w", pid, ns, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeCNICache deletes cnitool's cached results for pods in namespaces whose names
// start with labPrefix: a pod the lab drops without CNI DEL would leave them forever.
func removeCNICache(labPrefix string) error {
	entries, err := os.ReadDir(cniResultsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list cni cache: %w", err)
	}
	nsPrefix := filepath.Join(netnsDir, labPrefix) + "-"
	var errs []error
	for _, e := range entries {
		path := filepath.Join(cniResultsDir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var c struct {
			NetNS string `json:"netns"`
		}
		if json.Unmarshal(b, &c) != nil || !strings.HasPrefix(c.NetNS, nsPrefix) {
			continue
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cni cache: %w", err))
		}
	}
	return errors.Join(errs...)
}

// live holds the open labs, for the signal handler.
var live struct {
	sync.Mutex
	labs map[*Lab]bool
	sigs chan os.Signal
}

// track registers an open lab; the first one installs the SIGINT/SIGTERM handler, because
// by default Go dies of those signals without running deferred calls or t.Cleanup.
func track(l *Lab) {
	live.Lock()
	defer live.Unlock()
	if live.labs == nil {
		live.labs = map[*Lab]bool{}
	}
	if len(live.labs) == 0 {
		live.sigs = make(chan os.Signal, 1)
		signal.Notify(live.sigs, syscall.SIGINT, syscall.SIGTERM)
		go onSignal(live.sigs)
	}
	live.labs[l] = true
}

// untrack drops a closed lab; the last one removes the handler, so a program without open
// labs gets its signals as before.
func untrack(l *Lab) {
	live.Lock()
	defer live.Unlock()
	if !live.labs[l] {
		return
	}
	delete(live.labs, l)
	if len(live.labs) == 0 {
		signal.Stop(live.sigs)
		close(live.sigs)
		live.sigs = nil
	}
}

func onSignal(sigs chan os.Signal) {
	for sig := range sigs {
		live.Lock()
		var labs []*Lab
		for l := range live.labs {
			labs = append(labs, l)
		}
		live.Unlock()
		for _, l := range labs {
			l.log.Warn("closing lab on signal", "signal", sig)
			_ = l.Close() // logs its own errors
		}
		// With our handler gone, the signal does what it would have done without us:
		// end the process, unless the program handles it itself.
		signal.Stop(sigs)
		s, _ := sig.(syscall.Signal)
		_ = syscall.Kill(os.Getpid(), s)
		return
	}
}

// writeOwner records which process owns a lab directory, so that Sweep never removes a
// lab that is alive in another process (go test runs packages in parallel).
func writeOwner(dir string) error {
	pid := os.Getpid()
	start, err := procStart(pid)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "owner"), fmt.Appendf(nil, "%d %d\n", pid, start), 0o644)
}

// procStart returns a process's start time in clock ticks since boot, which tells a live
// owner from a later process that got its pid.
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name in parentheses may hold spaces; fields after it are plain.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22 of stat(5); f[0] is field 3
}

func ownerAlive(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "owner"))
	if err != nil {
		return false
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil {
		return false
	}
	now, err := procStart(pid)
	return err == nil && now == start
}

// labOf returns the lab prefix a name under a lab belongs to: "pclab-ab12cd" for
// "pclab-ab12cd-n1-web".
func labOf(name string) string {
	rest := strings.TrimPrefix(name, NamePrefix)
	if i := strings.IndexByte(rest, '-'); i >= 0 {
		rest = rest[:i]
	}
	return NamePrefix + rest
}

// Sweep removes what crashed runs left: for every lab whose prefix starts with prefix
// ("" or NamePrefix for all labs) and whose owning process is gone, it kills the processes
// in its namespaces, deletes them, drops its cnitool cache entries, unmounts everything
// below its directory in os.TempDir() and removes that directory. Labs whose owner still
// runs are left alone, so it is safe to call at the start of any test binary.
func Sweep(prefix string) error {
	if prefix == "" {
		prefix = NamePrefix
	}
	if !strings.HasPrefix(prefix, NamePrefix) {
		return fmt.Errorf("sweep %q: lab prefixes start with %q", prefix, NamePrefix)
	}
	labs := map[string]bool{}
	nsNames, err := netnsWithPrefix(prefix)
	if err != nil {
		return fmt.Errorf("sweep %s: %w", prefix, err)
	}
	for _, n := range nsNames {
		labs[labOf(n)] = true
	}
	tmp := os.TempDir()
	dirs, _ := filepath.Glob(filepath.Join(tmp, prefix+"*"))
	for _, d := range dirs {
		labs[labOf(filepath.Base(d))] = true
	}
	mounts, err := mountPoints()
	if err != nil {
		return fmt.Errorf("sweep %s: %w", prefix, err)
	}
	for _, m := range mounts {
		if rel, err := filepath.Rel(tmp, m); err == nil && strings.HasPrefix(rel, prefix) {
			labs[labOf(strings.SplitN(rel, "/", 2)[0])] = true
		}
	}

	var errs []error
	for lp := range labs {
		dir := filepath.Join(tmp, lp)
		if ownerAlive(dir) {
			continue
		}
		var names []string
		for _, n := range nsNames {
			if labOf(n) == lp {
				names = append(names, n)
			}
		}
		if err := sweepLab(dir, names, mounts); err != nil {
			errs = append(errs, fmt.Errorf("sweep lab %s: %w", lp, err))
		}
	}
	return errors.Join(errs...)
}

// sweepLab removes one dead lab: what runs in its namespaces names, its CNI
// cache, the namespaces, its mounts among mounts and its directory dir.
func sweepLab(dir string, names, mounts []string) error {
	lp := filepath.Base(dir)
	var lerrs []error
	if err := killInNetns(names); err != nil {
		lerrs = append(lerrs, err)
	}
	if err := removeCNICache(lp); err != nil {
		lerrs = append(lerrs, err)
	}
	// Reverse name order deletes pods ("-n1-x") before nodes ("-n1") before the fabric;
	// any order would do once nothing runs inside.
	slices.Sort(names)
	for _, n := range slices.Backward(names) {
		if err := deleteNetns(n); err != nil {
			lerrs = append(lerrs, err)
		}
	}
	mounted := false
	for _, m := range slices.Backward(mounts) { // innermost first
		if m == dir || strings.HasPrefix(m, dir+"/") {
			if err := unmount(m); err != nil {
				lerrs = append(lerrs, err)
				mounted = true
			}
		}
	}
	if !mounted {
		if err := os.RemoveAll(dir); err != nil {
			lerrs = append(lerrs, err)
		}
	}
	return errors.Join(lerrs...)
}

// mountPoints lists this mount namespace's mount points in mount order.
func mountPoints() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var mps []string
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mps = append(mps, unescapeMount(f[4]))
	}
	return mps, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
