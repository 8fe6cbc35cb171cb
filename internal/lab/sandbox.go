// Pod sandboxes of a lab containerd, driven through crictl as kubelet drives CRI.
package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// SandboxSpec is what RunPod puts in the PodSandboxConfig.
type SandboxSpec struct {
	Name        string
	Annotations map[string]string
	// PortMappings become the CNI portMappings capability (hostPort to containerPort).
	PortMappings []PortMapping
}

// PortMapping is one CRI port mapping (TCP).
type PortMapping struct {
	ContainerPort, HostPort int
}

// Sandbox is a pod sandbox of a Containerd.
type Sandbox struct {
	C    *Containerd
	Name string
	ID   string
	// IP is the address CRI reports (the CNI result's).
	IP netip.Addr
	// Pid is the sandbox (pause) process in the root pid namespace.
	Pid int
	// NetNS is the network namespace's path as containerd and the plugins see it (inside
	// containerd's mount namespace); use NetNSPath from the root.
	NetNS string
}

// NetNSPath reaches the sandbox's network namespace from the root namespace.
func (s *Sandbox) NetNSPath() string { return fmt.Sprintf("/proc/%d/ns/net", s.Pid) }

// RunPod runs `crictl runp` and returns the sandbox as `crictl inspectp` shows it.
func (c *Containerd) RunPod(ctx context.Context, spec SandboxSpec) (*Sandbox, error) {
	if !podName.MatchString(spec.Name) {
		return nil, fmt.Errorf("run pod %q: want a DNS label of at most 32 characters", spec.Name)
	}
	type portMapping struct {
		Protocol      int `json:"protocol"`
		ContainerPort int `json:"container_port"`
		HostPort      int `json:"host_port"`
	}
	cfg := struct {
		Metadata struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
			UID       string `json:"uid"`
		} `json:"metadata"`
		Hostname     string            `json:"hostname"`
		LogDirectory string            `json:"log_directory"`
		Annotations  map[string]string `json:"annotations,omitempty"`
		PortMappings []portMapping     `json:"port_mappings,omitempty"`
		Linux        struct {
			CgroupParent string `json:"cgroup_parent"`
		} `json:"linux"`
	}{Hostname: spec.Name, Annotations: spec.Annotations}
	cfg.Metadata.Name, cfg.Metadata.Namespace, cfg.Metadata.UID = spec.Name, "default", c.Node.NetNS+"-"+spec.Name
	cfg.LogDirectory = filepath.Join(c.Dir, "pods", spec.Name)
	cfg.Linux.CgroupParent = c.CgroupParent
	for _, pm := range spec.PortMappings {
		cfg.PortMappings = append(cfg.PortMappings, portMapping{ContainerPort: pm.ContainerPort, HostPort: pm.HostPort})
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(c.Dir, "pods", spec.Name+".json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return nil, err
	}
	out, err := c.Crictl(ctx, "runp", path)
	if err != nil {
		return nil, fmt.Errorf("run pod %s: %w", spec.Name, err)
	}
	s := &Sandbox{C: c, Name: spec.Name, ID: strings.TrimSpace(string(out))}
	if err := s.Inspect(ctx); err != nil {
		return nil, err
	}
	c.Node.Lab.log.Info("sandbox running", "node", c.Node.Index, "pod", s.Name, "id", s.ID[:12], "pod_ip", s.IP, "pid", s.Pid)
	return s, nil
}

// Inspect refreshes IP, Pid and NetNS from `crictl inspectp`.
func (s *Sandbox) Inspect(ctx context.Context) error {
	out, err := s.C.Crictl(ctx, "inspectp", "-o", "json", s.ID)
	if err != nil {
		return fmt.Errorf("inspect pod %s: %w", s.Name, err)
	}
	var v struct {
		Status struct {
			State   string `json:"state"`
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			Pid         int `json:"pid"`
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		return fmt.Errorf("inspect pod %s: %w\n%s", s.Name, err, out)
	}
	if v.Status.State != "SANDBOX_READY" {
		return fmt.Errorf("inspect pod %s: state %s", s.Name, v.Status.State)
	}
	ip, err := netip.ParseAddr(v.Status.Network.IP)
	if err != nil {
		return fmt.Errorf("inspect pod %s: ip: %w", s.Name, err)
	}
	if v.Info.Pid == 0 {
		return fmt.Errorf("inspect pod %s: no pid", s.Name)
	}
	s.IP, s.Pid = ip, v.Info.Pid
	for _, ns := range v.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			s.NetNS = ns.Path
		}
	}
	return nil
}

// Exec runs a command in the sandbox's network namespace (with the root's mounts, so
// the host's tools).
func (s *Sandbox) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + s.NetNSPath(), "--", name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, _, err := run(cmd, true)
	if err != nil {
		return out, fmt.Errorf("run %s in pod %s: %w: %s", cmdline(name, args), s.Name, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Start runs a background command in the sandbox's network namespace (stopped when ctx
// ends or the lab closes).
func (s *Sandbox) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return s.C.Node.Start(ctx, "nsenter", append([]string{"--net=" + s.NetNSPath(), "--", name}, args...)...)
}

// Stop runs `crictl stopp`: CNI DEL, then the sandbox process is killed.
func (s *Sandbox) Stop(ctx context.Context) error {
	if _, err := s.C.Crictl(ctx, "stopp", s.ID); err != nil {
		return fmt.Errorf("stop pod %s: %w", s.Name, err)
	}
	return nil
}

// Remove runs `crictl rmp` (stopping the sandbox first if needed).
func (s *Sandbox) Remove(ctx context.Context) error {
	if _, err := s.C.Crictl(ctx, "rmp", "--force", s.ID); err != nil {
		return fmt.Errorf("remove pod %s: %w", s.Name, err)
	}
	return nil
}
