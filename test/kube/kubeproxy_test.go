package kube

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/kubecluster"
	"github.com/patchcord/patchcord/internal/lab"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	webClusterIP = "10.96.0.20"
	webNodePort  = 30080
	backendPort  = 8080
)

// nameServer answers every HTTP GET with its pod's name and the peer it
// saw, so the client learns which backend the service picked and whether
// its source address survived.
const nameServer = `
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s\n" % (name, self.client_address[0])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
`

// TestRealKubeProxy: Services that the real kube-proxy programs, from
// Service and EndpointSlice objects in a real API server, in each of its
// two Linux modes, across patchcord's datapath: a ClusterIP answered by a
// backend on the client's node and one on the other node, and a NodePort
// reached from the other node.
func TestRealKubeProxy(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		t.Run(mode, func(t *testing.T) { testRealKubeProxy(t, mode) })
	}
}

func testRealKubeProxy(t *testing.T, mode string) {
	l := e2e.NewLab(t)
	ctx := e2e.Ctx(t)
	all := e2e.AddNodes(t, l, 1, 2, controlPlaneNode)
	n1, n2 := all[0], all[1]
	cp := kubecluster.Start(t, ctx, all[2])
	cp.Apply(t, ctx, filepath.Join(e2e.RepoDir(), "deploy", "rbac.yaml"))
	api := &nodeAPI{t: t, ctx: ctx, cp: cp}
	agentConfig := cp.Kubeconfig(t, kubecluster.AgentUser)
	proxyConfig := cp.Kubeconfig(t, kubecluster.ProxyUser)
	for _, n := range []*lab.Node{n1, n2} {
		api.set(nodeObject(n, nil))
		e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
		startKubeAgent(t, ctx, n, agentConfig)
		startKubeProxy(t, ctx, n, proxyConfig, mode)
	}

	b1 := e2e.AddPod(t, ctx, n1, "b1", "patchcord")
	b2 := e2e.AddPod(t, ctx, n2, "b2", "patchcord")
	c1 := e2e.AddPod(t, ctx, n1, "c1", "patchcord")
	script := filepath.Join(l.Dir, "name_server.py")
	if err := os.WriteFile(script, []byte(nameServer), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, b := range []*lab.Pod{b1, b2} {
		if _, err := b.Start(ctx, "python3", script, b.Name, strconv.Itoa(backendPort)); err != nil {
			t.Fatal(err)
		}
		if err := b.WaitListening(ctx, backendPort); err != nil {
			t.Fatal(err)
		}
	}
	createService(t, ctx, cp, b1, b2)

	// kube-proxy programs the service asynchronously: wait until both
	// backends have answered through the ClusterIP, then check a run of
	// fresh connections all succeed.
	seen := map[string]bool{}
	err := lab.WaitFor(ctx, "both backends to answer through "+webClusterIP, func(ctx context.Context) error {
		name, peer, err := get(ctx, c1, webClusterIP, 80)
		if err != nil {
			return err
		}
		// No SNAT between pods: the backend sees the client pod.
		if peer != c1.IP.String() {
			return fmt.Errorf("%s saw the client as %s, want %s", name, peer, c1.IP)
		}
		seen[name] = true
		if !seen["b1"] || !seen["b2"] {
			return fmt.Errorf("answered so far: %v", seen)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The service went through the mode asked for, not a leftover of the other.
	for _, n := range []*lab.Node{n1, n2} {
		if !kubeProxyRules(t, ctx, n, mode) {
			t.Errorf("%s holds no %s rules of kube-proxy", n.NetNS, mode)
		}
		if other := map[string]string{"iptables": "nftables", "nftables": "iptables"}[mode]; kubeProxyRules(t, ctx, n, other) {
			t.Errorf("%s holds kube-proxy %s rules too", n.NetNS, other)
		}
	}
	for i := range 20 {
		if _, _, err := get(ctx, c1, webClusterIP, 80); err != nil {
			t.Fatalf("connection %d through %s: %v", i, webClusterIP, err)
		}
	}
	// A NodePort of node1, from node2: kube-proxy masquerades it, so the
	// backend sees a node, never an address outside the lab.
	name, peer, err := get(ctx, n2, n1.IP.String(), webNodePort)
	if err != nil {
		t.Fatalf("NodePort %s:%d from node2: %v", n1.IP, webNodePort, err)
	}
	if peer != n1.IP.String() {
		t.Errorf("NodePort reached %s, which saw the client as %s, want node1's %s", name, peer, n1.IP)
	}
	t.Logf("NodePort %s:%d from node2 answered by %s (peer %s)", n1.IP, webNodePort, name, peer)
}

// startKubeProxy runs the real kube-proxy on n.
func startKubeProxy(t *testing.T, ctx context.Context, n *lab.Node, kubeconfig, mode string) {
	t.Helper()
	if _, err := n.Start(ctx, filepath.Join(kubecluster.Bin(t), "kube-proxy"), kubecluster.ProxyArgs(kubeconfig, n.NetNS, mode)...); err != nil {
		t.Fatal(err)
	}
}

// kubeProxyRules tells whether n holds kube-proxy's rules of mode: its
// KUBE-SERVICES chain, or its nftables table.
func kubeProxyRules(t *testing.T, ctx context.Context, n *lab.Node, mode string) bool {
	t.Helper()
	if mode == "nftables" {
		_, err := n.Exec(ctx, "nft", "list", "table", "ip", "kube-proxy")
		return err == nil
	}
	out, err := n.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatalf("iptables-save on %s: %v", n.NetNS, err)
	}
	return strings.Contains(string(out), "-A KUBE-SERVICES -d "+webClusterIP+"/32")
}

// createService makes Service web (ClusterIP webClusterIP, NodePort
// webNodePort) and its EndpointSlice by hand: no controller manager runs,
// so nothing else writes or removes it.
func createService(t *testing.T, ctx context.Context, cp *kubecluster.ControlPlane, backends ...*lab.Pod) {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Type:      corev1.ServiceTypeNodePort,
			ClusterIP: webClusterIP,
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80,
				TargetPort: intstr.FromInt32(backendPort), NodePort: webNodePort}},
		},
	}
	if _, err := cp.Admin.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service: %v", err)
	}
	ready, port, name, proto := true, int32(backendPort), "http", corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "web-1", Namespace: "default",
			Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	for _, b := range backends {
		node := b.Node.NetNS
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{b.IP.String()}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		})
	}
	if _, err := cp.Admin.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create endpointslice: %v", err)
	}
}

// get makes one HTTP GET from e and returns the backend's name and the
// client address it saw.
func get(ctx context.Context, e e2e.Execer, host string, port int) (name, peer string, err error) {
	out, err := e.Exec(ctx, "curl", "-fsS", "--max-time", "3", fmt.Sprintf("http://%s:%d/", host, port))
	if err != nil {
		return "", "", fmt.Errorf("GET %s:%d: %v: %s", host, port, err, out)
	}
	f := strings.Fields(string(out))
	if len(f) != 2 {
		return "", "", fmt.Errorf("GET %s:%d: answer %q", host, port, out)
	}
	return f[0], f[1], nil
}
