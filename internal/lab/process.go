// Commands inside the lab's namespaces: one-shot (Exec) and background (Start).
//
// They run under `nsenter --net=`, not `ip netns exec`: the latter gives the command a
// fresh mount namespace with /sys remounted, which hides the root's mounts made later
// and the cgroup tree; nsenter only switches the network namespace.
package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopTimeout is how long Stop waits after SIGTERM before SIGKILL.
const stopTimeout = 5 * time.Second

// command prepares name args... to run in the named namespace.
func (l *Lab) command(ctx context.Context, netns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + filepath.Join(netnsDir, netns), "--", name}, args...)...)
	// Children die with the lab's process even when it cannot clean up (a go test timeout
	// panics without running t.Cleanup). See startCmd for why this holds.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

func cmdline(name string, args []string) string {
	return strings.Join(append([]string{filepath.Base(name)}, args...), " ")
}

func (l *Lab) exec(ctx context.Context, netns, name string, args ...string) ([]byte, error) {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("run %s in %s: %w", cmdline(name, args), netns, ErrClosed)
	}
	out, _, err := run(l.command(ctx, netns, name, args...), true)
	if err != nil {
		return out, fmt.Errorf("run %s in %s: %w: %s", cmdline(name, args), netns, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// run runs cmd to its end with stdout and stderr (one file if combined) in unlinked
// temporary files, not pipes: a command that leaves a daemon behind (`setsid -f`, a
// forking server) hands it the pipe, and Wait would block for as long as the daemon lives.
func run(cmd *exec.Cmd, combined bool) (stdout, stderr []byte, err error) {
	outf, err := tempFile()
	if err != nil {
		return nil, nil, err
	}
	defer outf.Close()
	errf := outf
	if !combined {
		if errf, err = tempFile(); err != nil {
			return nil, nil, err
		}
		defer errf.Close()
	}
	cmd.Stdout, cmd.Stderr = outf, errf
	err = startCmd(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	stdout, rerr := readAll(outf)
	if err == nil {
		err = rerr
	}
	if !combined {
		stderr, rerr = readAll(errf)
		if err == nil {
			err = rerr
		}
	}
	return stdout, stderr, err
}

func tempFile() (*os.File, error) {
	f, err := os.CreateTemp("", NamePrefix+"out-*")
	if err != nil {
		return nil, fmt.Errorf("capture output: %w", err)
	}
	// Unlinked at once: nothing to clean up whatever happens next.
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("capture output: %w", err)
	}
	return f, nil
}

func readAll(f *os.File) ([]byte, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("read output: %w", err)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("read output: %w", err)
	}
	return b, nil
}

// spawn owns one goroutine locked to one OS thread for good, which starts every command.
// The kernel sends Pdeathsig when the thread that forked a child exits, not the process;
// the Go runtime ends a thread whenever a goroutine locked to it returns (ns.Do does that
// when it cannot switch back), so a child forked from an arbitrary thread could be killed
// at random. This thread lives as long as the process.
var spawn struct {
	once sync.Once
	reqs chan spawnReq
}

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func startCmd(cmd *exec.Cmd) error {
	spawn.once.Do(func() {
		spawn.reqs = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked, see above
			for r := range spawn.reqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, done: make(chan error, 1)}
	spawn.reqs <- r
	return <-r.done
}

// Process is a background command started in a lab namespace.
type Process struct {
	// Name is the command line, for messages.
	Name string
	// NetNS is the namespace it runs in.
	NetNS string
	// LogPath holds its stdout and stderr; it is removed with the lab's Dir.
	LogPath string

	lab  *Lab
	cmd  *exec.Cmd
	done chan struct{}
	err  error // from Wait, set before done closes

	mu   sync.Mutex
	sent map[syscall.Signal]bool // signals we sent: dying of one is no failure
}

func (l *Lab) start(ctx context.Context, netns, name string, args ...string) (*Process, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, fmt.Errorf("start %s in %s: %w", cmdline(name, args), netns, ErrClosed)
	}
	l.procSeq++
	seq := l.procSeq
	l.mu.Unlock()

	f, logPath, err := l.createLog(netns, name, seq)
	if err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", cmdline(name, args), netns, err)
	}
	defer f.Close() // the child holds its own descriptor

	// The process outlives this call: its lifetime is managed below, not by exec's ctx.
	cmd := l.command(context.Background(), netns, name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// A group of its own: Ctrl-C on the terminal reaches only the lab, which stops
	// processes in order, and Stop reaches whatever the process forked.
	cmd.SysProcAttr.Setpgid = true
	if err := startCmd(cmd); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", cmdline(name, args), netns, err)
	}
	p := &Process{
		Name:    cmdline(name, args),
		NetNS:   netns,
		LogPath: logPath,
		lab:     l,
		cmd:     cmd,
		done:    make(chan struct{}),
		sent:    map[syscall.Signal]bool{},
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		_ = p.Kill()
		return nil, fmt.Errorf("start %s in %s: %w", p.Name, netns, ErrClosed)
	}
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				_ = p.Stop()
			case <-p.done:
			}
		}()
	}
	l.log.Debug("process started", "netns", netns, "cmd", p.Name, "pid", cmd.Process.Pid, "log", logPath)
	return p, nil
}

// createLog creates the log file of the seq'th process the lab starts,
// named by its namespace and program.
func (l *Lab) createLog(netns, name string, seq int) (*os.File, string, error) {
	logDir := filepath.Join(l.Dir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, "", err
	}
	short := strings.TrimPrefix(netns, l.Prefix+"-")
	logPath := filepath.Join(logDir, fmt.Sprintf("%s.%s.%d.log", short, filepath.Base(name), seq))
	f, err := os.Create(logPath)
	return f, logPath, err
}

// Pid returns the process id (also its process group id).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns what exec.Cmd.Wait returned.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Output returns what the process wrote so far to stdout and stderr.
func (p *Process) Output() ([]byte, error) {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return nil, fmt.Errorf("read output of %s: %w", p.Name, err)
	}
	return b, nil
}

// Stop sends SIGTERM to the process group and waits; after stopTimeout it sends SIGKILL.
// It returns nil if the process exits cleanly or of the SIGTERM, the exit error if it
// fails (also when it had exited before Stop), and an error if it had to be killed.
func (p *Process) Stop() error {
	select {
	case <-p.done:
		return p.exitErr()
	default:
	}
	p.signal(syscall.SIGTERM)
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	select {
	case <-p.done:
		return p.exitErr()
	case <-t.C:
	}
	p.signal(syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("stop %s: still running %s after SIGTERM, killed", p.Name, stopTimeout)
}

// Kill sends SIGKILL to the process group and waits for the process to exit, e.g. to
// emulate an agent crash.
func (p *Process) Kill() error {
	p.signal(syscall.SIGKILL)
	<-p.done
	return p.exitErr()
}

func (p *Process) signal(sig syscall.Signal) {
	p.mu.Lock()
	p.sent[sig] = true
	p.mu.Unlock()
	// ESRCH: already gone, which is what we want.
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
}

func (p *Process) exitErr() error {
	if p.err == nil {
		return nil
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			p.mu.Lock()
			ours := p.sent[ws.Signal()]
			p.mu.Unlock()
			if ours {
				return nil
			}
		}
	}
	return fmt.Errorf("%s in %s: %w", p.Name, p.NetNS, p.err)
}

// WaitListening returns once something listens on TCP port in the process's namespace,
// e.g. an iperf3 server; it fails at once if the process exits first.
func (p *Process) WaitListening(ctx context.Context, port int) error {
	return p.lab.waitListening(ctx, p.NetNS, port, p)
}

// waitListening polls `ss` in the namespace; p, if set, is the process meant to listen.
func (l *Lab) waitListening(ctx context.Context, netns string, port int, p *Process) error {
	what := fmt.Sprintf("tcp port %d to listen in %s", port, netns)
	if p != nil {
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		go func() {
			select {
			case <-p.done:
				cancel(fmt.Errorf("%s exited: %v", p.Name, p.err))
			case <-ctx.Done():
			}
		}()
		if err := l.waitListening(ctx, netns, port, nil); err != nil {
			if cause := context.Cause(ctx); cause != nil && cause != ctx.Err() {
				return fmt.Errorf("wait for %s: %w", what, cause)
			}
			return err
		}
		return nil
	}
	return WaitFor(ctx, what, func(ctx context.Context) error {
		out, err := l.exec(ctx, netns, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(out)) == 0 {
			return errors.New("not listening")
		}
		return nil
	})
}
