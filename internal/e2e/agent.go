// Starting patchcord on a lab node and waiting for its --ready-file: the
// error-returning core serves the bench, the testing wrappers the tests.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/views"
)

// ReadyFile is where the agent on n signals its first sync.
func ReadyFile(n *lab.Node) string {
	return filepath.Join(n.Lab.Dir, fmt.Sprintf("n%d.ready", n.Index))
}

// AgentArgs are the arguments of `patchcord agent` on n; extra come last, so
// they override the defaults (e.g. "--log-level", "warn").
func AgentArgs(n *lab.Node, nodesFile string, extra ...string) []string {
	args := []string{"agent",
		"--uplink", "eth0", "--node-ip", n.IP.String(), "--pod-cidr", n.PodCIDR.String(),
		"--nodes", nodesFile, "--ready-file", ReadyFile(n), "--log-level", "debug"}
	if mode := os.Getenv(lab.AttachModeEnv); mode != "" {
		args = append(args, "--attach-mode", mode)
	}
	return append(args, extra...)
}

// Launch runs `patchcord --bpffs-root <n's> args...` on n in the background
// and returns once it writes ready. It polls every 5 ms (the bench times
// agent syncs with it) and stops waiting at once if the process dies, e.g. on
// a flag error; the error then carries its log.
func Launch(ctx context.Context, n *lab.Node, what, ready string, timeout time.Duration, args ...string) (*lab.Process, error) {
	if err := os.Remove(ready); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	p, err := n.Start(ctx, n.Lab.Bin("patchcord"), append([]string{"--bpffs-root", n.BpffsRoot}, args...)...)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, slowTimeout(timeout))
	defer cancel()
	err = Poll(wctx, what+" on "+n.NetNS+" ready", func() error {
		select {
		case <-p.Done():
			return ErrExited
		default:
		}
		_, err := os.Stat(ready)
		return err
	})
	if err != nil {
		out, _ := os.ReadFile(p.LogPath)
		return nil, fmt.Errorf("%w\n%s log:\n%s", err, what, out)
	}
	return p, nil
}

// ErrExited, from a condition, ends a Poll at once: the process that was to
// make it true is gone.
var ErrExited = errors.New("process exited")

// Poll checks cond every 5 ms until it holds, returns ErrExited or ctx ends.
func Poll(ctx context.Context, what string, cond func() error) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if errors.Is(err, ErrExited) {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last: %w)", what, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// StartAgent runs `patchcord agent` on n and returns once it has synced.
func StartAgent(t *testing.T, ctx context.Context, n *lab.Node, nodesFile string, extra ...string) *lab.Process {
	t.Helper()
	return StartReady(t, ctx, n, "agent", ReadyFile(n), AgentArgs(n, nodesFile, extra...)...)
}

// AssertUplinkBackend is AssertAttachBackend for the agent's programs on
// the uplink. It runs tc and bpftool: not while a test times traffic.
func AssertUplinkBackend(t *testing.T, ctx context.Context, n *lab.Node) {
	t.Helper()
	AssertAttachBackend(t, ctx, n, "from_uplink", "eth0", "ingress")
	AssertAttachBackend(t, ctx, n, "to_uplink", "eth0", "egress")
}

// AttachMode is n's attach backend: the one the lab forces
// (lab.AttachModeEnv), or else the one the node chose for its kernel, as
// `patchcord bpf prog list` shows it.
func AttachMode(t *testing.T, ctx context.Context, n *lab.Node) string {
	t.Helper()
	if mode := os.Getenv(lab.AttachModeEnv); mode != "" {
		return mode
	}
	var progs []views.Prog
	cliJSON(t, ctx, n, &progs, "bpf", "prog", "list")
	for _, p := range progs {
		if p.Mode != "" {
			return p.Mode
		}
	}
	return ""
}

// AssertAttachBackend checks that prog runs on ifname of n through the
// node's backend (AttachMode), as the kernel tools see it: in tc mode our
// cls_bpf filter in `tc filter show` and `bpftool net`, and a program, not a
// link, at the pin; in tcx mode a link at the pin. A pin that is a directory is a yielded tc
// attachment (datapath.AttachYielding): no filter of ours may be there.
func AssertAttachBackend(t *testing.T, ctx context.Context, n *lab.Node, prog, ifname, hook string) {
	t.Helper()
	mode := AttachMode(t, ctx, n)
	pin := filepath.Join(n.BpffsRoot, "links", prog, ifname)
	filters, _ := n.Exec(ctx, "tc", "filter", "show", "dev", ifname, hook)
	ours := strings.Contains(string(filters), "patchcord:"+prog)
	if st, err := os.Stat(pin); err == nil && st.IsDir() {
		if ours {
			t.Errorf("%s on %s is yielded, but a patchcord filter is there:\n%s", prog, ifname, filters)
		}
		return
	}
	kind, args := "link", []string{"link", "show", "pinned", pin}
	if mode == "tc" {
		kind, args = "prog", []string{"prog", "show", "pinned", pin}
		net, _ := n.Exec(ctx, "bpftool", "net", "show", "dev", ifname)
		if !ours || !strings.Contains(string(net), "patchcord:"+prog) {
			t.Errorf("tc mode: %s on %s not seen by the kernel tools:\ntc filter show:\n%s\nbpftool net:\n%s", prog, ifname, filters, net)
		}
	}
	if out, err := n.Exec(ctx, "bpftool", args...); err != nil {
		t.Errorf("%s mode: %s is not a pinned %s: %v\n%s", mode, pin, kind, err, out)
	}
}

// StartReady is Launch that fails the test; it waits up to 30 s.
func StartReady(t *testing.T, ctx context.Context, n *lab.Node, what, ready string, args ...string) *lab.Process {
	t.Helper()
	p, err := Launch(ctx, n, what, ready, 30*time.Second, args...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
