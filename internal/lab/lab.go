// Package lab builds throwaway network topologies out of namespaces on one machine, so that
// end-to-end tests, `make demo` and `make bench` can run several emulated Kubernetes nodes
// and their pods without touching the host's own network.
//
// A lab is a fabric namespace holding a bridge (the physical switch), one namespace per node
// with an uplink veth into the fabric and its own bpffs, and one namespace per pod, wired by
// the CNI plugin under test through cnitool. Every name a lab creates starts with its Prefix
// ("pclab-<id>"), and everything it creates lives in those namespaces or below its Dir:
// nothing is added to the root namespace. Close removes it all, also on SIGINT and SIGTERM;
// Sweep removes what a crashed run left behind.
package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// NamePrefix starts every namespace and directory name a lab creates, so that Sweep can
// recognise leftovers of any lab without a registry.
const NamePrefix = "pclab-"

// netnsDir is where `ip netns add` bind-mounts named namespaces; cnitool and the plugins
// open them by these paths.
const netnsDir = "/var/run/netns"

// ErrClosed is what a closed lab answers when asked to create or run something.
var ErrClosed = errors.New("lab closed")

// Options configure New. Only the fields a topology uses need to be set: a lab without
// pods needs neither CNI paths nor cnitool.
type Options struct {
	// Name, if set, replaces the random part of the prefix ("pclab-<Name>"), so that a demo
	// prints namespace names people can type. At most 12 characters of [a-z0-9]. Two live
	// labs with one Name conflict: tests leave it empty.
	Name string
	// Log receives what the lab does; nil means slog.Default().
	Log *slog.Logger
	// BinDir holds the patchcord and patchcord-cni binaries under test.
	BinDir string
	// CNIPath lists directories with the reference plugins (ptp, host-local, ...);
	// empty means /opt/cni/bin.
	CNIPath []string
	// CNITool is the cnitool binary; empty means "cnitool" from PATH, then
	// $HOME/go/bin/cnitool where `go install` puts it.
	CNITool string
}

// Lab owns every namespace, mount and process it creates, and removes them in Close.
type Lab struct {
	// Prefix starts the name of every namespace of this lab: "<Prefix>-fabric",
	// "<Prefix>-n1", "<Prefix>-n1-<pod>".
	Prefix string
	// Dir holds the nodes' bpffs mounts, conflists, IPAM state and process logs.
	Dir string

	log  *slog.Logger
	opts Options

	fabricMu sync.Mutex // held while the fabric is made

	mu      sync.Mutex
	closed  bool            // set by Close: what would create or start answers ErrClosed
	fabric  string          // fabric netns name, "" until the first AddNode
	nodes   map[int]*Node   // by index
	pods    map[string]*Pod // by netns name
	netns   []string        // every netns created and not yet deleted, in creation order
	mounts  []string        // bpffs mount points, in creation order
	procs   []*Process      // started by Start, stopped in Close
	procSeq int             // numbers log files

	closeOnce sync.Once
	closeErr  error
}

var labName = regexp.MustCompile(`^[a-z0-9]{1,12}$`)

// New creates an empty lab: its directory and prefix, and the signal handling that tears
// it down on SIGINT and SIGTERM. Nodes come with AddNode.
func New(opts Options) (*Lab, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if len(opts.CNIPath) == 0 {
		opts.CNIPath = []string{"/opt/cni/bin"}
	}
	id := opts.Name
	if id == "" {
		b := make([]byte, 3)
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("new lab: %w", err)
		}
		id = hex.EncodeToString(b)
	} else if !labName.MatchString(id) {
		return nil, fmt.Errorf("new lab: name %q: want 1-12 characters of [a-z0-9]", id)
	}
	prefix := NamePrefix + id
	if _, err := exec.LookPath("nsenter"); err != nil {
		return nil, fmt.Errorf("new lab %s: needs nsenter (util-linux): %w", prefix, err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("new lab %s: needs ip (iproute2): %w", prefix, err)
	}
	// A named lab may collide with a leftover of a crashed run; a random one practically
	// never does, but both checks are cheap.
	if left, err := netnsWithPrefix(prefix + "-"); err != nil {
		return nil, fmt.Errorf("new lab %s: %w", prefix, err)
	} else if len(left) > 0 {
		return nil, fmt.Errorf("new lab %s: namespaces %v exist (left by a crashed run? lab.Sweep removes them)", prefix, left)
	}
	dir := filepath.Join(os.TempDir(), prefix)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("new lab %s: %w (left by a crashed run? lab.Sweep removes it)", prefix, err)
	}
	if err := writeOwner(dir); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("new lab %s: %w", prefix, err)
	}
	l := &Lab{
		Prefix: prefix,
		Dir:    dir,
		log:    opts.Log.With("lab", prefix),
		opts:   opts,
		nodes:  map[int]*Node{},
		pods:   map[string]*Pod{},
	}
	track(l)
	l.log.Info("lab created", "dir", dir)
	return l, nil
}

// Bin returns the path of a binary under test, e.g. l.Bin("patchcord").
func (l *Lab) Bin(name string) string {
	return filepath.Join(l.opts.BinDir, name)
}

// FabricNS returns the name of the fabric namespace (where br0 switches the nodes'
// uplinks, handy for tcpdump), or "" before the first AddNode.
func (l *Lab) FabricNS() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fabric
}

// Node returns the node with index i, or nil.
func (l *Lab) Node(i int) *Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nodes[i]
}

// Nodes returns the nodes ordered by index.
func (l *Lab) Nodes() []*Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ns []*Node
	for _, n := range l.nodes {
		if n != nil { // nil reserves an index while AddNode runs
			ns = append(ns, n)
		}
	}
	slices.SortFunc(ns, func(a, b *Node) int { return a.Index - b.Index })
	return ns
}

// Close stops the processes the lab started, kills whatever else still runs in its
// namespaces, deletes the namespaces (which takes every link, address, route, program
// attachment and iptables rule with them: no CNI DEL is run), unmounts the bpffs mounts and
// removes Dir. It carries on past errors, returning them all. It is idempotent: a later
// call (the signal handler's, during a test's) waits for the first to finish and returns
// its result.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.mu.Lock()
	l.closed = true
	procs := l.procs
	l.procs = nil
	l.mu.Unlock()
	defer untrack(l)

	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Go(func() {
			if err := p.Stop(); err != nil {
				l.log.Debug("stop process", "name", p.Name, "err", err)
			}
		})
	}
	wg.Wait()

	l.mu.Lock()
	netns := slices.Clone(l.netns)
	mounts := slices.Clone(l.mounts)
	l.mu.Unlock()

	errs := l.remove(netns, mounts)
	err := errors.Join(errs...)
	if err != nil {
		l.log.Error("lab close", "err", err)
	} else {
		l.log.Info("lab closed")
	}
	if err != nil {
		return fmt.Errorf("close lab %s: %w", l.Prefix, err)
	}
	return nil
}

// remove takes down the lab's namespaces and mounts and then its directory,
// returning what failed.
func (l *Lab) remove(netns, mounts []string) []error {
	var errs []error
	// Daemons the agent or a plugin forked, or a command still running from an Exec, would
	// keep a deleted namespace alive.
	if err := killInNetns(netns); err != nil {
		errs = append(errs, err)
	}
	if err := removeCNICache(l.Prefix); err != nil {
		errs = append(errs, err)
	}
	// Pods, then nodes, then the fabric: the reverse of creation.
	for _, name := range slices.Backward(netns) {
		if err := deleteNetns(name); err != nil {
			errs = append(errs, err)
		} else {
			l.forgetNetns(name)
		}
	}
	mounted := false
	for _, m := range slices.Backward(mounts) {
		if err := unmount(m); err != nil {
			errs = append(errs, err)
			mounted = true
		}
	}
	// RemoveAll would walk into a mount it failed to take down and delete what is pinned
	// there; leave the directory for Sweep instead.
	if mounted {
		errs = append(errs, fmt.Errorf("keep %s: mounts remain below it", l.Dir))
	} else if err := os.RemoveAll(l.Dir); err != nil {
		errs = append(errs, fmt.Errorf("remove lab dir: %w", err))
	}
	return errs
}

// addNetns creates a named namespace with lo up and records it for Close; on error
// nothing of it remains. The caller holds no lock: namespaces may be made concurrently
// (parallel AddPod).
func (l *Lab) addNetns(name string) (string, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return "", ErrClosed
	}
	// Recorded before it exists so that Close, racing with us, deletes it too.
	l.netns = append(l.netns, name)
	l.mu.Unlock()
	path := filepath.Join(netnsDir, name)
	out, err := exec.Command("ip", "netns", "add", name).CombinedOutput()
	if err != nil {
		l.forgetNetns(name)
		return "", fmt.Errorf("ip netns add %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	if err := linkUp(path, "lo"); err != nil {
		return "", errors.Join(err, l.removeNetns(name))
	}
	return path, nil
}

// removeNetns undoes addNetns for a namespace that is no longer wanted before Close.
func (l *Lab) removeNetns(name string) error {
	if err := killInNetns([]string{name}); err != nil {
		return err
	}
	if err := deleteNetns(name); err != nil {
		return err
	}
	l.forgetNetns(name)
	return nil
}

func (l *Lab) forgetNetns(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.netns = slices.DeleteFunc(l.netns, func(n string) bool { return n == name })
}

// deleteNetns does what `ip netns delete` does, but succeeds for a namespace that is
// half made or already gone.
func deleteNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	if err := unmountDetach(path); err != nil {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	return nil
}

// netnsWithPrefix lists named namespaces whose names start with prefix.
func netnsWithPrefix(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list netns: %w", err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// WaitFor polls cond until it returns nil, because readiness is signalled by a condition
// becoming true, never waited for with a sleep. Without a deadline on ctx it gives up after
// 10s; the error names what was awaited and carries cond's last error.
func WaitFor(ctx context.Context, what string, cond func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last: %w)", what, ctx.Err(), err)
		case <-tick.C:
		}
	}
}
