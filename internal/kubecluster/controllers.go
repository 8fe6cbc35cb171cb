package kubecluster

import (
	"context"
	_ "embed"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// ClusterCIDR is the pod network: the controller manager gives each
	// node a /24 of it, and kube-proxy tells pod traffic from the rest.
	ClusterCIDR  = "10.244.0.0/16"
	nodeCIDRMask = "24"
	// ClusterDNS is the cluster DNS Service's address kubelets give pods.
	ClusterDNS = "10.96.0.10"
)

// StartControllers runs kube-controller-manager, which allocates the nodes'
// podCIDRs and runs the DaemonSet, EndpointSlice and ServiceAccount
// controllers, and kube-scheduler, beside the API server. Both stop before
// it does.
func (cp *ControlPlane) StartControllers(t *testing.T, ctx context.Context) {
	t.Helper()
	bin := Bin(t)
	// Both run with every right, alone (no leader election), serving only
	// the control plane's loopback.
	common := []string{"--kubeconfig", cp.Kubeconfig(t, "admin"), "--leader-elect=false",
		"--bind-address", "127.0.0.1", "--profiling=false", "--v=1"}
	kcm, err := cp.Node.Start(ctx, filepath.Join(bin, "kube-controller-manager"), append(common,
		"--allocate-node-cidrs", "--cluster-cidr", ClusterCIDR, "--node-cidr-mask-size", nodeCIDRMask,
		"--service-cluster-ip-range", ServiceCIDR,
		"--service-account-private-key-file", cp.saKey,
		// Pods' projected ServiceAccount volumes carry it as kube-root-ca.crt.
		"--root-ca-file", cp.CAFile)...)
	if err != nil {
		t.Fatal(err)
	}
	sched, err := cp.Node.Start(ctx, filepath.Join(bin, "kube-scheduler"), common...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sched.Kill()
		kcm.Kill()
	})
	// The controller manager is up once it has published the root CA in
	// the default namespace, which every pod's volumes need.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = lab.WaitFor(wctx, "kube-controller-manager to publish kube-root-ca.crt", func(ctx context.Context) error {
		select {
		case <-kcm.Done():
			out, _ := kcm.Output()
			return fmt.Errorf("kube-controller-manager exited: %s", tail(out))
		default:
		}
		_, err := cp.Admin.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// tail is the end of a process log, for an error message.
func tail(out []byte) []byte {
	if len(out) > 4096 {
		out = out[len(out)-4096:]
	}
	return out
}

// logOnFailure logs, when the test has failed, every pod's state and log
// and the cluster's events: what an operator would look at first. Each
// worker registers it after the cleanup that stops its kubelet, so the
// first to run (once) finds every kubelet still serving logs.
func (cp *ControlPlane) logOnFailure(t *testing.T) {
	t.Cleanup(func() {
		if !t.Failed() || cp.logged {
			return
		}
		cp.logged = true
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		pods, err := cp.Admin.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Logf("list pods: %v", err)
		} else {
			for _, p := range pods.Items {
				t.Logf("pod %s/%s on %q: %s %s, conditions %v, init %v, containers %v", p.Namespace, p.Name, p.Spec.NodeName,
					p.Status.Phase, p.Status.Message, p.Status.Conditions, p.Status.InitContainerStatuses, p.Status.ContainerStatuses)
				for _, c := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
					if c.Ready {
						continue
					}
					// Through the API server and the node's kubelet, as kubectl logs.
					opts := &corev1.PodLogOptions{Container: c.Name, Previous: c.State.Terminated == nil && c.LastTerminationState.Terminated != nil, TailLines: new(int64(40))}
					out, err := cp.Admin.CoreV1().Pods(p.Namespace).GetLogs(p.Name, opts).DoRaw(ctx)
					t.Logf("log of %s/%s %s: %s (err %v)", p.Namespace, p.Name, c.Name, out, err)
				}
			}
		}
		events, err := cp.Admin.CoreV1().Events("").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Logf("list events: %v", err)
		} else {
			for _, e := range events.Items {
				t.Logf("event %s %s/%s: %s: %s (x%d)", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message, e.Count)
			}
		}
	})
}

//go:embed coredns.yaml
var corednsManifest string

// StartDNS installs CoreDNS (coredns.yaml) with the Service at ClusterDNS,
// the address kubelets give pods, and waits until its pods are ready.
func (cp *ControlPlane) StartDNS(t *testing.T, ctx context.Context) {
	t.Helper()
	m := strings.NewReplacer("__CLUSTER_DNS__", ClusterDNS, "__IMAGE__", CoreDNSImage(t)).Replace(corednsManifest)
	cp.applyData(t, ctx, "coredns.yaml", []byte(m))
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err := lab.WaitFor(wctx, "CoreDNS ready", func(ctx context.Context) error {
		d, err := cp.Admin.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.ReadyReplicas != *d.Spec.Replicas {
			return fmt.Errorf("%d of %d replicas ready", d.Status.ReadyReplicas, *d.Spec.Replicas)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
