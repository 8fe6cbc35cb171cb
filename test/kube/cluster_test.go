package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/kubecluster"
	"github.com/patchcord/patchcord/internal/lab"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// netexec's ports: HTTP, and UDP answering the same commands.
const (
	netexecHTTP = 8080
	netexecUDP  = 8081
)

// TestCluster: patchcord installed as README tells an operator, on a
// cluster of upstream components: etcd, kube-apiserver, the controller
// manager (which allocates the podCIDRs patchcord learns) and the
// scheduler; two workers with containerd, kubelet and kube-proxy; the
// deploy/ manifests applied, the agent a DaemonSet pod from the image built
// here; CoreDNS as kubeadm installs it. Then the pod network's basic promises, checked with agnhost as
// Kubernetes' own network tests do: pod to pod over HTTP and UDP on one
// node and across, node to pod, a ClusterIP Service, Service names through
// CoreDNS (itself pods of the pod network), no SNAT between pods;
// once with kube-proxy in each of its Linux modes.
func TestCluster(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		t.Run(mode, func(t *testing.T) { testCluster(t, mode) })
	}
}

func testCluster(t *testing.T, proxyMode string) {
	l := e2e.NewLab(t)
	// The cluster's processes live as long as the lab (the state of a
	// failed run is logged before they stop); the test's waits have ctx.
	life, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	ctx, cancel := context.WithTimeout(life, 4*time.Minute)
	t.Cleanup(cancel)
	all := e2e.AddNodes(t, l, 1, 2, controlPlaneNode)
	cluster := kubecluster.NewCluster(t, life, all[2], all[:2], proxyMode)
	cp, workers := cluster.ControlPlane, cluster.Workers
	names := []string{workers[0].Name, workers[1].Name}

	pods := map[string]*corev1.Pod{}
	for _, p := range []struct{ name, node string }{{"a1", names[0]}, {"a2", names[0]}, {"b1", names[1]}} {
		pods[p.name] = createNetexec(t, ctx, cp, p.name, p.node)
	}
	for name, p := range pods {
		pods[name] = waitRunning(t, ctx, cp, p)
	}
	// Each pod's address is in its node's podCIDR, which the controller
	// manager chose and patchcord learned.
	for _, p := range pods {
		node, err := cp.Admin.CoreV1().Nodes().Get(ctx, p.Spec.NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cidr, err := netip.ParsePrefix(node.Spec.PodCIDR)
		if err != nil || !cidr.Contains(netip.MustParseAddr(p.Status.PodIP)) {
			t.Errorf("pod %s on %s got %s, outside the node's podCIDR %q", p.Name, p.Spec.NodeName, p.Status.PodIP, node.Spec.PodCIDR)
		}
	}
	a1, a2, b1 := pods["a1"], pods["a2"], pods["b1"]
	svc := createNetexecService(t, ctx, cp, "netexec-b", map[string]string{"app": "b1"})

	checks := []struct {
		name              string
		from              *corev1.Pod
		host, proto, want string
	}{
		{"http-same-node", a1, a2.Status.PodIP, "http", "a2"},
		{"udp-same-node", a1, a2.Status.PodIP, "udp", "a2"},
		{"http-other-node", a1, b1.Status.PodIP, "http", "b1"},
		{"udp-other-node", a1, b1.Status.PodIP, "udp", "b1"},
		{"http-other-node-back", b1, a1.Status.PodIP, "http", "a1"},
		{"udp-other-node-back", b1, a2.Status.PodIP, "udp", "a2"},
		{"clusterip-http", a1, svc.Spec.ClusterIP, "http", "b1"},
		{"clusterip-udp", a2, svc.Spec.ClusterIP, "udp", "b1"},
		// CoreDNS answers from pods on both nodes, through its Service.
		{"dns-short-name", a1, svc.Name, "http", "b1"},
		{"dns-fqdn", b1, svc.Name + ".default.svc.cluster.local", "udp", "b1"},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			// kube-proxy programs a new Service asynchronously.
			err := lab.WaitFor(ctx, c.name, func(ctx context.Context) error {
				got, err := dial(ctx, workers, c.from, c.host, c.proto, "hostname")
				if err == nil && got != c.want {
					err = fmt.Errorf("answered by %q, want %q", got, c.want)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("no-snat-between-pods", func(t *testing.T) {
		for _, host := range []string{b1.Status.PodIP, a2.Status.PodIP, svc.Spec.ClusterIP} {
			got, err := dial(ctx, workers, a1, host, "http", "clientip")
			if err != nil {
				t.Fatal(err)
			}
			if ip, _, _ := strings.Cut(got, ":"); ip != a1.Status.PodIP {
				t.Errorf("%s saw a1 as %s, want %s", host, got, a1.Status.PodIP)
			}
		}
	})
	t.Run("node-to-pod", func(t *testing.T) {
		for _, w := range workers {
			for _, p := range pods {
				url := fmt.Sprintf("http://%s:%d/hostname", p.Status.PodIP, netexecHTTP)
				out, err := w.Node.Exec(ctx, "curl", "-fsS", "--max-time", "5", url)
				if err != nil || strings.TrimSpace(string(out)) != p.Name {
					t.Errorf("%s from node %s: %q, %v", url, w.Name, out, err)
				}
			}
		}
	})
}

// createNetexec creates an agnhost netexec pod bound to node.
func createNetexec(t *testing.T, ctx context.Context, cp *kubecluster.ControlPlane, name, node string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name: "netexec", Image: kubecluster.AgnhostImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"netexec", fmt.Sprintf("--http-port=%d", netexecHTTP), fmt.Sprintf("--udp-port=%d", netexecUDP)},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
					Path: "/healthz", Port: intstr.FromInt32(netexecHTTP)}}, PeriodSeconds: 1},
			}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	p, err := cp.Admin.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
	return p
}

// waitRunning waits until p is Ready and returns it as it is then.
func waitRunning(t *testing.T, ctx context.Context, cp *kubecluster.ControlPlane, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	var cur *corev1.Pod
	err := lab.WaitFor(ctx, "pod "+p.Name+" Ready", func(ctx context.Context) error {
		var err error
		if cur, err = cp.Admin.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{}); err != nil {
			return err
		}
		for _, c := range cur.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("phase %s, conditions %v, containers %v", cur.Status.Phase, cur.Status.Conditions, cur.Status.ContainerStatuses)
	})
	if err != nil {
		t.Fatal(err)
	}
	return cur
}

// createNetexecService makes a ClusterIP Service over the pods matching selector,
// on netexec's HTTP and UDP ports; the controller manager writes its
// EndpointSlice.
func createNetexecService(t *testing.T, ctx context.Context, cp *kubecluster.ControlPlane, name string, selector map[string]string) *corev1.Service {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector: selector,
			Ports: []corev1.ServicePort{
				{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(netexecHTTP)},
				{Name: "udp", Protocol: corev1.ProtocolUDP, Port: 90, TargetPort: intstr.FromInt32(netexecUDP)},
			},
		},
	}
	s, err := cp.Admin.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s: %v", name, err)
	}
	return s
}

// dial asks netexec in from to send request to host over proto, once, and
// returns the answer: the e2e framework's granular checks do the same. The
// test reaches from's netexec from its node.
func dial(ctx context.Context, workers []*kubecluster.Worker, from *corev1.Pod, host, proto, request string) (string, error) {
	port := netexecHTTP
	if proto == "udp" {
		port = netexecUDP
	}
	// A name is the Service's, resolved by the pod through the cluster DNS.
	if addr, err := netip.ParseAddr(host); err != nil || netip.MustParsePrefix(kubecluster.ServiceCIDR).Contains(addr) {
		port = map[string]int{"http": 80, "udp": 90}[proto]
	}
	var node *lab.Node
	for _, w := range workers {
		if w.Name == from.Spec.NodeName {
			node = w.Node
		}
	}
	url := fmt.Sprintf("http://%s:%d/dial?request=%s&protocol=%s&host=%s&port=%d&tries=1", from.Status.PodIP, netexecHTTP, request, proto, host, port)
	out, err := node.Exec(ctx, "curl", "-fsS", "--max-time", "10", url)
	if err != nil {
		return "", fmt.Errorf("%s: %v: %s", url, err, out)
	}
	var ans struct {
		Responses []string `json:"responses"`
		Errors    []string `json:"errors"`
	}
	if err := json.Unmarshal(out, &ans); err != nil {
		return "", fmt.Errorf("%s: %q: %v", url, out, err)
	}
	if len(ans.Responses) != 1 {
		return "", fmt.Errorf("%s: responses %q, errors %q", url, ans.Responses, ans.Errors)
	}
	return ans.Responses[0], nil
}
