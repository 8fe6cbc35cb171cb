package kubecluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Worker is a Kubernetes node of the lab: containerd, kubelet and
// kube-proxy in one lab node's network namespace and in a mount namespace
// laid out like a node's (lab.ContainerdOptions.HostPaths), so that a
// DaemonSet's hostPath volumes land in that node only.
type Worker struct {
	Node *lab.Node
	// Name is the Node object's name: the lab node's namespace name, as
	// the lab's other node sources use.
	Name       string
	Containerd *lab.Containerd
	Kubelet    *lab.Process
	KubeProxy  *lab.Process
}

// WorkerOptions configure StartWorker.
type WorkerOptions struct {
	// ProxyMode is kube-proxy's --proxy-mode: iptables or nftables.
	ProxyMode string
	// Images are imported before kubelet starts (no registry is reachable).
	Images []ImageArchive
	// Crictl is the crictl binary containerd's helpers use.
	Crictl string
}

// StartWorker starts containerd, kubelet and kube-proxy on n and waits
// until its Node object is registered; it is Ready only once a pod
// network is installed. Kubelet and kube-proxy stop before the lab closes
// containerd, so no pod is restarted while containerd removes them.
func (cp *ControlPlane) StartWorker(t *testing.T, ctx context.Context, n *lab.Node, opts WorkerOptions) *Worker {
	t.Helper()
	bin := Bin(t)
	w := &Worker{Node: n, Name: n.NetNS}
	// A real node's default route covers the Service range; a lab node has
	// none, and a connect to a ClusterIP would fail before kube-proxy's
	// DNAT (in OUTPUT, after routing) could turn it into a lab address.
	if out, err := n.Exec(ctx, "ip", "route", "add", ServiceCIDR, "dev", "eth0"); err != nil {
		t.Fatalf("route the Service range on %s: %v: %s", n.NetNS, err, out)
	}
	c, err := n.StartContainerd(ctx, lab.ContainerdOptions{Crictl: opts.Crictl, HostPaths: true})
	if err != nil {
		t.Fatal(err)
	}
	w.Containerd = c
	// Runs after kubelet has stopped: removes the pods through CRI (CNI
	// DEL), their processes and cgroups, and the mount namespace.
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, img := range opts.Images {
		if err := c.ImportImage(ctx, img.Path, img.Name); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(n.Lab.Dir, fmt.Sprintf("kubelet-n%d", n.Index))
	for _, d := range []string{dir, filepath.Join(dir, "root"), filepath.Join(dir, "pod-logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// kubelet refuses a cgroup root that is not there, in every hierarchy.
	if err := lab.MakeCgroup(c.CgroupParent); err != nil {
		t.Fatal(err)
	}
	resolv := filepath.Join(dir, "resolv.conf")
	// Pods with dnsPolicy Default get the node's resolver: none in the lab.
	if err := os.WriteFile(resolv, []byte("options ndots:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(config, []byte(kubeletConfig(c, n, dir, resolv)), 0o644); err != nil {
		t.Fatal(err)
	}
	kubeconfig := cp.CertKubeconfig(t, "system:node:"+w.Name, "system:nodes")
	w.Kubelet, err = c.Start(ctx, filepath.Join(bin, "kubelet"),
		"--config", config, "--kubeconfig", kubeconfig,
		"--root-dir", filepath.Join(dir, "root"),
		"--cert-dir", filepath.Join(dir, "pki"),
		"--hostname-override", w.Name, "--node-ip", n.IP.String(),
		"--v=1")
	if err != nil {
		t.Fatal(err)
	}
	w.KubeProxy, err = c.Start(ctx, filepath.Join(bin, "kube-proxy"), ProxyArgs(cp.Kubeconfig(t, ProxyUser), w.Name, opts.ProxyMode)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.KubeProxy.Kill()
		w.Kubelet.Kill()
	})
	cp.logOnFailure(t)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = lab.WaitFor(wctx, "kubelet on "+w.Name+" to register its node", func(ctx context.Context) error {
		select {
		case <-w.Kubelet.Done():
			out, _ := w.Kubelet.Output()
			return fmt.Errorf("kubelet exited: %s", tail(out))
		default:
		}
		_, err := cp.Admin.CoreV1().Nodes().Get(ctx, w.Name, metav1.GetOptions{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// ProxyArgs are kube-proxy's flags for a lab node: the mode asked for, and
// nothing changed that a network namespace cannot change or shares with the
// machine (the global conntrack table size and timeouts).
func ProxyArgs(kubeconfig, nodeName, mode string) []string {
	return []string{
		"--kubeconfig", kubeconfig, "--hostname-override", nodeName,
		"--proxy-mode", mode, "--cluster-cidr", ClusterCIDR,
		"--conntrack-max-per-core", "0",
		"--conntrack-tcp-timeout-established", "0", "--conntrack-tcp-timeout-close-wait", "0",
		"--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address", "127.0.0.1:10256",
		"--v", "1",
	}
}

// kubeletConfig is a node's KubeletConfiguration. What differs from a
// production node, and why: cgroup v1 is accepted (this machine runs it),
// the cgroup root is the lab node's, the lab's clients are trusted
// (anonymous, AlwaysAllow: no webhook round trips per exec), and nothing is
// evicted or garbage-collected for the disk of a shared machine (the
// images were imported, not pulled, and cannot come back).
func kubeletConfig(c *lab.Containerd, n *lab.Node, dir, resolv string) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %q
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
address: %q
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
clusterDNS: [%q]
clusterDomain: cluster.local
resolvConf: %q
podLogsDir: %q
failSwapOn: false
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
serializeImagePulls: false
nodeStatusUpdateFrequency: 5s
`, c.CgroupParent, c.Socket, c.Socket, n.IP.String(), ClusterDNS, resolv, filepath.Join(dir, "pod-logs"))
}

// WaitNodesReady waits until every named node reports Ready.
func (cp *ControlPlane) WaitNodesReady(ctx context.Context, names ...string) error {
	return lab.WaitFor(ctx, "nodes "+strings.Join(names, ", ")+" Ready", func(ctx context.Context) error {
		for _, name := range names {
			node, err := cp.Admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			ready := false
			for _, c := range node.Status.Conditions {
				if c.Type == corev1.NodeReady {
					ready = c.Status == corev1.ConditionTrue
					if !ready {
						return fmt.Errorf("%s: %s: %s", name, c.Reason, c.Message)
					}
				}
			}
			if !ready {
				return fmt.Errorf("%s: no Ready condition yet", name)
			}
		}
		return nil
	})
}
