// containerd as an emulated node's container runtime: Debian's containerd and runc run in
// the node's network namespace, with their own config, root, state and socket below the
// lab's directory, and the node's conflists and the plugins under test in their CNI dirs,
// so that pod sandboxes made with crictl go through patchcord-cni exactly as on a real
// node. No registry is reachable: the sandbox ("pause") image is built here from a tiny
// static binary and imported with ctr.
//
// containerd keeps some paths of its own whatever its config says: the shims' sockets in
// /run/containerd/s and libcni's result cache in /var/lib/cni. So it runs in a mount
// namespace of its own, held open by a sleeping process, where /run is an empty tmpfs and
// /var/lib/cni is a directory of the lab: nothing lands in the root's /run, /var/lib or
// /opt. The sandboxes' network namespaces are mounted under containerd's state directory
// (netns_mounts_under_state_dir), so they, like the sandboxes' rootfs and shm mounts,
// exist only in that mount namespace and vanish with it. Pods are reached through the
// sandbox process (/proc/PID/ns/net). Containers are put in cgroups below
// /<node netns name>, which Close (and, for crashed runs, the next StartContainerd)
// empties and removes.
package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PauseImage is the name the sandbox image is imported under, and containerd's
// sandbox_image.
const PauseImage = "patchcord.test/pause:lab"

// CNIPluginNames are the reference plugins linked into every containerd's CNI bin dir,
// beside patchcord-cni.
var CNIPluginNames = []string{"host-local", "ptp", "bridge", "loopback", "portmap", "bandwidth", "tuning"}

// cgroupRoot is where the cgroup hierarchies are mounted (v1 controllers and, in hybrid
// mode, the unified one); containers' cgroups are below each.
const cgroupRoot = "/sys/fs/cgroup"

// ContainerdOptions configure StartContainerd.
type ContainerdOptions struct {
	// Crictl is the crictl binary; empty means "crictl" from PATH.
	Crictl string
	// LogLevel is containerd's log level, "info" if empty; the log is one of the lab's
	// process logs.
	LogLevel string
	// HostPaths makes the node's mount namespace look like a Kubernetes node's to what
	// runs there (kubelet, and hostPath volumes): /etc, /opt and /var are overlays whose
	// changes stay in the lab (kubelet writes below /var/lib/kubelet whatever its root
	// dir), /sys/fs/bpf is a bpffs of its own, shared for Bidirectional volumes, and the
	// CRI's CNI dirs are /etc/cni/net.d and /opt/cni/bin, empty until something (a
	// DaemonSet) installs a network there; so StartContainerd does not wait for the
	// network to be ready.
	HostPaths bool
}

// Containerd is a containerd daemon serving one node. Create it with
// Node.StartContainerd; Close removes its pods, processes, mounts and cgroups (the lab's
// Close removes its directory).
type Containerd struct {
	Node *Node
	// Dir holds the config, the socket, containerd's root and state, the CNI bin dir and
	// the CNI cache.
	Dir string
	// Socket is containerd's gRPC socket (for crictl and ctr).
	Socket string
	// CNIBinDir is the CRI plugin's CNI bin_dir: symlinks to patchcord-cni and the
	// reference plugins. A test may put a wrapper in place of one of them.
	CNIBinDir string
	// CNICacheDir is where libcni, in containerd's mount namespace, keeps the result of
	// every attachment (it is /var/lib/cni there).
	CNICacheDir string
	// CgroupParent is the cgroup (in every hierarchy) that holds the sandboxes' cgroups.
	CgroupParent string

	config, crictlConfig string
	crictl               string
	hostPaths            bool

	mu     sync.Mutex
	holder *Process // sleeps in the mount namespace, keeping it
	daemon *Process // containerd

	closeOnce sync.Once
	closeErr  error
}

// StartContainerd builds the pause image, starts containerd in the node's namespace and
// returns once its CRI service reports the runtime and the network ready (so a conflist
// must be in the node's ConfDir first; containerd uses the first by file name) and the
// pause image is imported. On error nothing of it keeps running.
func (n *Node) StartContainerd(ctx context.Context, opts ContainerdOptions) (_ *Containerd, err error) {
	l := n.Lab
	c := &Containerd{
		Node:         n,
		Dir:          filepath.Join(l.Dir, fmt.Sprintf("n%d", n.Index), "containerd"),
		CgroupParent: "/" + n.NetNS,
		crictl:       opts.Crictl,
		hostPaths:    opts.HostPaths,
	}
	c.Socket = filepath.Join(c.Dir, "containerd.sock")
	c.CNIBinDir = filepath.Join(c.Dir, "cni-bin")
	c.CNICacheDir = filepath.Join(c.Dir, "cni-cache")
	c.config = filepath.Join(c.Dir, "config.toml")
	c.crictlConfig = filepath.Join(c.Dir, "crictl.yaml")
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("start containerd on node %d: %w", n.Index, err), c.Close())
		}
	}()
	if err := c.findTools(); err != nil {
		return nil, err
	}
	// Cgroups of labs whose process died before Close hold live sandboxes: they would
	// never be freed.
	if err := sweepCgroups(); err != nil {
		l.log.Warn("sweep cgroups of dead labs", "err", err)
	}
	if err := c.writeFiles(opts); err != nil {
		return nil, err
	}
	archive, err := buildPauseImage(ctx, c.Dir)
	if err != nil {
		return nil, err
	}
	if err := c.startHolder(ctx); err != nil {
		return nil, err
	}
	if err := c.startDaemon(ctx); err != nil {
		return nil, err
	}
	if err := c.importPause(ctx, archive); err != nil {
		return nil, err
	}
	l.log.Info("containerd started", "node", n.Index, "socket", c.Socket)
	return c, nil
}

// findTools finds crictl, unless given, and checks for the other programs.
func (c *Containerd) findTools() error {
	if c.crictl == "" {
		var err error
		if c.crictl, err = exec.LookPath("crictl"); err != nil {
			return errors.New("no crictl: set ContainerdOptions.Crictl or go install sigs.k8s.io/cri-tools/cmd/crictl")
		}
	}
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("needs %s (apt-get install containerd runc util-linux): %w", bin, err)
		}
	}
	return nil
}

// importPause imports the pause image archive and waits until CRI lists it.
func (c *Containerd) importPause(ctx context.Context, archive string) error {
	return c.ImportImage(ctx, archive, PauseImage)
}

// ImportImage imports an image archive (see Image.WriteArchive) into the CRI's
// namespace and waits until CRI lists it under name.
func (c *Containerd) ImportImage(ctx context.Context, archive, name string) error {
	if out, err := c.run(ctx, "ctr", "--address", c.Socket, "--namespace", "k8s.io", "images", "import", archive); err != nil {
		return fmt.Errorf("import image %s: %w: %s", name, err, out)
	}
	return WaitFor(ctx, name+" in the CRI image list", func(ctx context.Context) error {
		out, err := c.Crictl(ctx, "images", "-q", name)
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(out)) == 0 {
			return errors.New("not listed yet")
		}
		return nil
	})
}

// writeFiles makes the directories, the CNI bin dir and the config files.
func (c *Containerd) writeFiles(opts ContainerdOptions) error {
	for _, d := range []string{c.Dir, c.CNIBinDir, c.CNICacheDir, filepath.Join(c.Dir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	binDir, confDir := c.CNIBinDir, c.Node.ConfDir
	if c.hostPaths {
		binDir, confDir = hostCNIBinDir, hostCNIConfDir
	} else if err := c.linkCNIPlugins(); err != nil {
		return err
	}
	level := opts.LogLevel
	if level == "" {
		level = "info"
	}
	q := strconv.Quote
	cfg := fmt.Sprintf(containerdConfig, q(filepath.Join(c.Dir, "root")), q(filepath.Join(c.Dir, "state")), q(c.Socket), q(c.Socket+".ttrpc"),
		q(level), q(PauseImage), q(filepath.Join(c.Dir, "state", "runc")), q(binDir), q(confDir))
	if err := os.WriteFile(c.config, []byte(cfg), 0o644); err != nil {
		return err
	}
	// Each CRI call has this long: parallel sandboxes on a busy machine take a while.
	crictlCfg := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 180\npull-image-on-create: false\n", c.Socket, c.Socket)
	return os.WriteFile(c.crictlConfig, []byte(crictlCfg), 0o644)
}

// linkCNIPlugins links the lab's patchcord-cni and the reference plugins the
// tests chain into the node's CNI bin dir.
func (c *Containerd) linkCNIPlugins() error {
	l := c.Node.Lab
	links := map[string]string{}
	if l.opts.BinDir != "" {
		links["patchcord-cni"] = l.Bin("patchcord-cni")
	}
	for _, name := range CNIPluginNames {
		for _, dir := range l.opts.CNIPath {
			if p := filepath.Join(dir, name); cdExists(p) {
				links[name] = p
				break
			}
		}
		if links[name] == "" {
			return fmt.Errorf("CNI plugin %s not in %v", name, l.opts.CNIPath)
		}
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(c.CNIBinDir, name)); err != nil {
			return fmt.Errorf("link CNI plugin: %w", err)
		}
	}
	return nil
}

// containerdConfig is a node's config.toml; writeFiles fills in root, state,
// the sockets, the log level, the pause image, runc's root and the CNI dirs.
const containerdConfig = `version = 2
root = %s
state = %s
# Plugins that would create directories outside root and state (opt: /opt/containerd)
# or probe for storage we do not use.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = %s

[ttrpc]
  address = %s

[debug]
  level = %s

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %s
  # This machine refuses oom_score_adj -998 for sandboxes; runc then fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Sandbox netns mounts below state (in containerd's mount namespace), not /run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %s

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %s
    conf_dir = %s
    max_conf_num = 1
`

// holderScript prepares containerd's mount namespace ($1 the lab dir, $2 the CNI cache,
// $3 the ready file, $4 the temp dir) and then keeps it. The namespace starts as a copy of
// the root's mounts, and a copy keeps what it mounts alive: the nsfs mounts of /run/netns
// would keep every lab's namespaces (and their veths) after `ip netns del`, and other labs'
// bpffs would outlive their unmount. Those go first, and so does /run/netns itself, a
// shared mount that would go on copying new namespaces in.
const holderScript = `set -e
awk -v lab="$1" -v tmp="$4" '{
	fs = ""
	for (i = 7; i <= NF; i++) if ($i == "-") { fs = $(i + 1); break }
	if ($5 == lab || index($5, lab "/") == 1) next
	if (fs == "nsfs" || fs == "bpf" || index($5, "/run/") == 1 || index($5, tmp "/pclab-") == 1) print $5
}' /proc/self/mountinfo | sort -r | while read -r mp; do
	umount -l "$mp" 2>/dev/null || true
done
mount -t tmpfs -o mode=0755,size=64m pclab-run /run
mkdir -p /run/containerd
if [ -n "$5" ]; then
	mkdir -p "$5"
	mount -t tmpfs -o mode=0755 pclab-over "$5"
	for d in etc opt var; do
		mkdir -p "$5/$d/upper" "$5/$d/work"
		mount -t overlay -o "lowerdir=/$d,upperdir=$5/$d/upper,workdir=$5/$d/work" "pclab-$d" "/$d"
	done
	mkdir -p /etc/cni/net.d /opt/cni/bin /var/lib/cni
	mount -t bpf bpffs /sys/fs/bpf
	mount --make-shared /sys/fs/bpf
fi
mount --bind "$2" /var/lib/cni
: > "$3"
exec sleep infinity
`

// The CRI's CNI dirs with HostPaths: where Kubernetes installers put them.
const (
	hostCNIBinDir  = "/opt/cni/bin"
	hostCNIConfDir = "/etc/cni/net.d"
)

func (c *Containerd) startHolder(ctx context.Context) error {
	n := c.Node
	// Bind-mounted over in the private namespace only; libcni makes it anyway.
	// With HostPaths it is made in the namespace's /var overlay.
	if !c.hostPaths {
		if err := os.MkdirAll("/var/lib/cni", 0o755); err != nil {
			return err
		}
	}
	ready := filepath.Join(c.Dir, "mntns.ready")
	overlays := ""
	if c.hostPaths {
		overlays = filepath.Join(c.Dir, "host-overlays")
	}
	p, err := n.Start(context.Background(), "unshare", "--mount", "--propagation", "slave", "--",
		"sh", "-c", holderScript, "holder", n.Lab.Dir, c.CNICacheDir, ready, os.TempDir(), overlays)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.holder = p
	c.mu.Unlock()
	return cdWaitProcess(ctx, p, "containerd's mount namespace", func(context.Context) error {
		_, err := os.Stat(ready)
		return err
	})
}

// mntNS is the path of containerd's mount namespace.
func (c *Containerd) mntNS() string {
	return fmt.Sprintf("/proc/%d/ns/mnt", c.holder.Pid())
}

// HostPath is where p of the node's mount namespace is seen from the test's.
func (c *Containerd) HostPath(p string) string {
	return fmt.Sprintf("/proc/%d/root%s", c.holder.Pid(), p)
}

// Start starts a program in the node's network and mount namespaces, beside
// containerd: kubelet, whose volumes containerd must see, and what shares
// its host paths. Close kills it with everything else there.
func (c *Containerd) Start(ctx context.Context, bin string, args ...string) (*Process, error) {
	return c.Node.Start(ctx, "nsenter", append([]string{"--mount=" + c.mntNS(), "--", bin}, args...)...)
}

func (c *Containerd) startDaemon(ctx context.Context) error {
	p, err := c.Node.Start(context.Background(), "nsenter", "--mount="+c.mntNS(), "--", "containerd", "--config", c.config)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.daemon = p
	c.mu.Unlock()
	return cdWaitProcess(ctx, p, "containerd's CRI runtime and network ready", func(ctx context.Context) error {
		out, err := c.Crictl(ctx, "info")
		if err != nil {
			return err
		}
		var info struct {
			Status struct {
				Conditions []struct {
					Type    string `json:"type"`
					Status  bool   `json:"status"`
					Message string `json:"message"`
				} `json:"conditions"`
			} `json:"status"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			return fmt.Errorf("crictl info: %w", err)
		}
		var why []string
		for _, cond := range info.Status.Conditions {
			if !cond.Status && !(c.hostPaths && cond.Type == "NetworkReady") {
				why = append(why, cond.Type+": "+cond.Message)
			}
		}
		if len(info.Status.Conditions) == 0 || len(why) > 0 {
			return fmt.Errorf("not ready: %s", strings.Join(why, "; "))
		}
		return nil
	})
}

// cdWaitProcess waits for cond, failing at once with the process's log if it exits.
func cdWaitProcess(ctx context.Context, p *Process, what string, cond func(context.Context) error) error {
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-p.Done():
			cancel()
		case <-wctx.Done():
		}
	}()
	if err := WaitFor(wctx, what, cond); err != nil {
		out, _ := p.Output()
		if len(out) > 4096 {
			out = out[len(out)-4096:]
		}
		return fmt.Errorf("%w\n%s log:\n%s", err, p.Name, out)
	}
	return nil
}

// Restart stops containerd (SIGTERM, as systemd does) and starts it again; the shims and
// so the sandboxes keep running meanwhile.
func (c *Containerd) Restart(ctx context.Context) error {
	c.mu.Lock()
	d := c.daemon
	c.mu.Unlock()
	if d != nil {
		if err := d.Stop(); err != nil {
			return fmt.Errorf("restart containerd: %w", err)
		}
	}
	if err := c.startDaemon(ctx); err != nil {
		return fmt.Errorf("restart containerd: %w", err)
	}
	return nil
}

// Daemon is the running containerd process.
func (c *Containerd) Daemon() *Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.daemon
}

// run runs a client command (crictl, ctr) in the root namespace: it only talks to the
// socket. The error carries stderr.
func (c *Containerd) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, stderr, err := run(cmd, false)
	if err != nil {
		return stdout, fmt.Errorf("%s: %w: %s", cmdline(name, args), err, bytes.TrimSpace(stderr))
	}
	return stdout, nil
}

// Crictl runs crictl against this containerd and returns its stdout.
func (c *Containerd) Crictl(ctx context.Context, args ...string) ([]byte, error) {
	return c.run(ctx, c.crictl, append([]string{"--config", c.crictlConfig}, args...)...)
}

// Close removes every sandbox through CRI (so CNI DEL runs) while containerd is up, then
// stops containerd, kills what is left in its mount namespace (shims, plugins) and in its
// cgroups (sandbox processes), removes the cgroups and ends the mount namespace, which
// takes the sandboxes' netns, shm and rootfs mounts along. It is idempotent: a later
// call waits for the first to finish and returns its result.
func (c *Containerd) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Containerd) close() error {
	c.mu.Lock()
	holder, daemon := c.holder, c.daemon
	c.mu.Unlock()

	var errs []error
	if daemon != nil {
		select {
		case <-daemon.Done():
		default:
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			if _, err := c.Crictl(ctx, "rmp", "--all", "--force"); err != nil {
				errs = append(errs, err)
			}
			cancel()
		}
		if err := daemon.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if holder != nil {
		if err := killInMountNS(holder.Pid()); err != nil {
			errs = append(errs, err)
		}
	}
	if err := removeCgroup(c.CgroupParent); err != nil {
		errs = append(errs, err)
	}
	if holder != nil {
		if err := holder.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close containerd of node %d: %w", c.Node.Index, err)
	}
	return nil
}

// killInMountNS SIGKILLs every process but pid in pid's mount namespace, and waits until
// they are gone.
func killInMountNS(pid int) error {
	var want unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/mnt", pid), &want); err != nil {
		return nil // the holder is gone, and so the namespace
	}
	find := func() []int {
		var pids []int
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			p, err := strconv.Atoi(e.Name())
			if err != nil || p == pid {
				continue
			}
			var st unix.Stat_t
			if unix.Stat(fmt.Sprintf("/proc/%d/ns/mnt", p), &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
				pids = append(pids, p)
			}
		}
		return pids
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return WaitFor(ctx, "processes in containerd's mount namespace to die", func(context.Context) error {
		pids := find()
		for _, p := range pids {
			_ = unix.Kill(p, unix.SIGKILL)
		}
		if len(pids) > 0 {
			return fmt.Errorf("pids %v", pids)
		}
		return nil
	})
}

// cgroupHierarchies lists the mounted hierarchies (cpu, memory, ..., unified).
func cgroupHierarchies() []string {
	entries, err := os.ReadDir(cgroupRoot)
	if err != nil {
		return nil
	}
	var dirs []string
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join(cgroupRoot, e.Name()))
		}
	}
	return dirs
}

// removeCgroup kills every process in the cgroup (absolute, e.g. "/pclab-ab12cd-n1") and
// below, in every hierarchy, and removes the cgroups, innermost first.
func removeCgroup(cg string) error {
	var dirs []string // every cgroup dir, parents before children
	for _, h := range cgroupHierarchies() {
		_ = filepath.WalkDir(filepath.Join(h, cg), func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
	}
	if len(dirs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return WaitFor(ctx, "cgroup "+cg+" removed", func(context.Context) error {
		var left []string
		for _, d := range slices.Backward(dirs) {
			b, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			}
			if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
				left = append(left, d)
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("busy: %v", left)
		}
		return nil
	})
}

// sweepCgroups removes the top-level cgroups named after nodes of labs whose process is
// gone: a crashed run leaves its sandboxes running there.
func sweepCgroups() error {
	seen := map[string]bool{}
	var errs []error
	for _, h := range cgroupHierarchies() {
		entries, _ := os.ReadDir(h)
		for _, e := range entries {
			name := e.Name()
			if !e.IsDir() || !strings.HasPrefix(name, NamePrefix) || seen[name] {
				continue
			}
			seen[name] = true
			if ownerAlive(filepath.Join(os.TempDir(), labOf(name))) {
				continue
			}
			errs = append(errs, removeCgroup("/"+name))
		}
	}
	return errors.Join(errs...)
}

func cdExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// MakeCgroup creates cg (absolute, e.g. "/pclab-ab12cd-n1") in every hierarchy, for what
// insists that its parent cgroup exists (kubelet's cgroup root). Close removes it.
func MakeCgroup(cg string) error {
	for _, h := range cgroupHierarchies() {
		if err := os.MkdirAll(filepath.Join(h, cg), 0o755); err != nil {
			return fmt.Errorf("make cgroup %s: %w", cg, err)
		}
	}
	return nil
}
