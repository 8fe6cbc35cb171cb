// Pods: a namespace each, wired by the CNI plugins under test through cnitool run inside
// the node's namespace, as a container runtime on that node would.
package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/types/create"
)

// Pod is a pod namespace attached to a node by CNI.
type Pod struct {
	Node *Node
	// Name is the pod's short name; NetNS ("<Prefix>-n<i>-<Name>") and NSPath name its
	// namespace. NSPath is also what cnitool derives the container ID from.
	Name, NetNS, NSPath string
	// IP is the first IPv4 address of the CNI result.
	IP netip.Addr
	// Network is the CNI network (conflist "name") the pod was added to.
	Network string
	// Result is cnitool's stdout: the CNI result JSON.
	Result []byte
}

var podName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// AddPod creates pod namespace "<Prefix>-n<i>-<name>" (lo up) and runs
// `cnitool add <network> <NSPath>` in the node's namespace with the lab's CNI_PATH
// (BinDir first) and the node's ConfDir. If that fails, the namespace is removed (no CNI
// DEL is run: a failed ADD must clean up after itself) and the error carries cnitool's
// stderr.
func (n *Node) AddPod(ctx context.Context, name, network string) (_ *Pod, err error) {
	l := n.Lab
	if !podName.MatchString(name) {
		return nil, fmt.Errorf("add pod %q on node %d: want a DNS label of at most 32 characters", name, n.Index)
	}
	p := &Pod{Node: n, Name: name, NetNS: n.NetNS + "-" + name, Network: network}
	p.NSPath = filepath.Join(netnsDir, p.NetNS)
	l.mu.Lock()
	if _, ok := l.pods[p.NetNS]; ok {
		l.mu.Unlock()
		return nil, fmt.Errorf("add pod %s on node %d: exists", name, n.Index)
	}
	l.pods[p.NetNS] = p // reserves the name; removed again on error
	l.mu.Unlock()
	defer func() {
		if err != nil {
			l.mu.Lock()
			delete(l.pods, p.NetNS)
			l.mu.Unlock()
			err = fmt.Errorf("add pod %s on node %d: %w", name, n.Index, err)
		}
	}()

	if _, err := l.addNetns(p.NetNS); err != nil {
		return nil, err
	}
	stdout, err := n.cnitool(ctx, "add", network, p.NSPath)
	if err != nil {
		return nil, errors.Join(err, l.removeNetns(p.NetNS))
	}
	ip, err := resultIPv4(stdout)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("cnitool add %s: %w: %s", network, err, stdout), l.removeNetns(p.NetNS))
	}
	p.IP, p.Result = ip, stdout
	l.log.Info("pod added", "node", n.Index, "pod", name, "network", network, "pod_ip", ip)
	return p, nil
}

// resultIPv4 returns the first IPv4 address of a CNI result of any version.
func resultIPv4(stdout []byte) (netip.Addr, error) {
	r, err := create.CreateFromBytes(stdout)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("parse result: %w", err)
	}
	res, err := types100.GetResult(r)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("convert result: %w", err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, errors.New("result has no IPv4 address")
}

// cnitool runs cnitool in the node's namespace and returns its stdout; the error carries
// its stderr, where cnitool prints the plugin's error.
func (n *Node) cnitool(ctx context.Context, verb, network, nsPath string) ([]byte, error) {
	l := n.Lab
	tool, err := l.cnitoolPath()
	if err != nil {
		return nil, err
	}
	cmd := l.command(ctx, n.NetNS, tool, verb, network, nsPath)
	cmd.Env = append(cniFreeEnv(),
		"CNI_PATH="+strings.Join(append(nonEmpty(l.opts.BinDir), l.opts.CNIPath...), ":"),
		"NETCONFPATH="+n.ConfDir,
		"CNI_IFNAME=eth0",
	)
	stdout, stderr, err := run(cmd, false)
	if err != nil {
		return stdout, fmt.Errorf("cnitool %s %s: %w: %s", verb, network, err, bytes.TrimSpace(stderr))
	}
	if len(stderr) > 0 {
		l.log.Debug("cnitool stderr", "verb", verb, "network", network, "stderr", string(stderr))
	}
	return stdout, nil
}

func (l *Lab) cnitoolPath() (string, error) {
	if l.opts.CNITool != "" {
		return l.opts.CNITool, nil
	}
	if p, err := exec.LookPath("cnitool"); err == nil {
		return p, nil
	}
	if home, err := os.UserHomeDir(); err == nil {
		p := filepath.Join(home, "go", "bin", "cnitool")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("no cnitool: set Options.CNITool or go install github.com/containernetworking/cni/cnitool@v1.3.0")
}

// cniFreeEnv is our environment without the variables cnitool or the plugins read, so
// that nothing from the caller's shell changes what a test runs.
func cniFreeEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "CNI_") || k == "NETCONFPATH" || k == "CAP_ARGS" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func nonEmpty(s ...string) []string {
	var out []string
	for _, v := range s {
		if v != "" {
			out = append(out, v)
		}
	}
	return out
}

// Exec runs a command in the pod's namespace; see Node.Exec.
func (p *Pod) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return p.Node.Lab.exec(ctx, p.NetNS, name, args...)
}

// Start runs a background command in the pod's namespace; see Node.Start.
func (p *Pod) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return p.Node.Lab.start(ctx, p.NetNS, name, args...)
}

// WaitListening returns once something listens on TCP port in the pod's namespace.
func (p *Pod) WaitListening(ctx context.Context, port int) error {
	return p.Node.Lab.waitListening(ctx, p.NetNS, port, nil)
}

// Check runs `cnitool check` for the pod.
func (p *Pod) Check(ctx context.Context) error {
	if _, err := p.Node.cnitool(ctx, "check", p.Network, p.NSPath); err != nil {
		return fmt.Errorf("check pod %s: %w", p.Name, err)
	}
	return nil
}

// Del runs `cnitool del` for the pod in the node's namespace, then deletes the pod's
// namespace. If DEL fails the pod stays as it was, so the test can look and retry.
func (p *Pod) Del(ctx context.Context) error {
	l := p.Node.Lab
	if _, err := p.Node.cnitool(ctx, "del", p.Network, p.NSPath); err != nil {
		return fmt.Errorf("del pod %s: %w", p.Name, err)
	}
	if err := l.removeNetns(p.NetNS); err != nil {
		return fmt.Errorf("del pod %s: %w", p.Name, err)
	}
	l.mu.Lock()
	delete(l.pods, p.NetNS)
	l.mu.Unlock()
	l.log.Info("pod deleted", "node", p.Node.Index, "pod", p.Name)
	return nil
}
