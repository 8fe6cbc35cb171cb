package nodes

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/sourcetest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

// syncBuffer is a log sink the source's goroutines write while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// kubeNode builds a Node object; cidrs go to spec.podCIDRs (and the first to
// spec.podCIDR, as the API server mirrors them). The fake clientset keeps
// resourceVersions as given; tests that update a node bump it, as the API
// server would, because the source tells resyncs by an unchanged version.
func kubeNode(name, ip string, cidrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
		n.Spec.PodCIDRs = cidrs
	}
	if ip != "" {
		n.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeHostName, Address: name},
			{Type: corev1.NodeInternalIP, Address: ip},
		}
	}
	return n
}

func withAnnotations(n *corev1.Node, kv ...string) *corev1.Node {
	n.Annotations = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		n.Annotations[kv[i]] = kv[i+1]
	}
	return n
}

// kubeTest is a Kube source on a fake clientset, running until the test ends.
type kubeTest struct {
	*sourcetest.Source[[]Node]
	client *fake.Clientset
	log    *syncBuffer
}

// startKube runs the source and returns once its informer watches, so that
// objects the test creates afterwards are seen as events.
func startKube(t *testing.T, resync time.Duration, objs ...runtime.Object) *kubeTest {
	t.Helper()
	client := fake.NewClientset(objs...)
	logs := &syncBuffer{}
	src := &Kube{Client: client, NodeName: "n1", Resync: resync, Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	kt := &kubeTest{Source: sourcetest.StartWatching(t, client, "nodes", src.Run), client: client, log: logs}
	kt.Log = logs
	return kt
}

// waitSet reads sets until one equals want: handlers coalesce bursts, so
// intermediate sets may never be sent.
func (kt *kubeTest) waitSet(t *testing.T, want ...Node) []Node {
	t.Helper()
	deadline := time.After(sourcetest.Timeout)
	var last []Node
	for {
		select {
		case set := <-kt.Updates():
			if equalSets(set, want) {
				return set
			}
			last = set
		case <-deadline:
			t.Fatalf("node set never became\n  %v\nlast sent:\n  %v\nlog:\n%s", want, last, kt.log)
			return nil
		}
	}
}

func node(name, ip, cidr string) Node {
	return Node{Name: name, NodeIP: netip.MustParseAddr(ip), PodCIDR: netip.MustParsePrefix(cidr)}
}

func TestKubeFollowsNodes(t *testing.T) {
	kt := startKube(t, -1,
		kubeNode("n1", "198.18.0.1", "10.244.1.0/24"),
		kubeNode("n2", "198.18.0.2", "10.244.2.0/24"),
	)
	ctx := context.Background()
	nodesAPI := kt.client.CoreV1().Nodes()
	n1, n2, n3 := node("n1", "198.18.0.1", "10.244.1.0/24"), node("n2", "198.18.0.2", "10.244.2.0/24"), node("n3", "198.18.0.3", "10.244.3.0/24")

	// The first set is the complete listing, this node included.
	if set := kt.Next(t); !equalSets(set, []Node{n1, n2}) {
		t.Fatalf("first set = %v, want n1, n2", set)
	}

	t.Run("add", func(t *testing.T) {
		if _, err := nodesAPI.Create(ctx, kubeNode("n3", "198.18.0.3", "10.244.3.0/24"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		kt.waitSet(t, n1, n2, n3)
	})
	t.Run("update podCIDR", func(t *testing.T) {
		obj, err := nodesAPI.Get(ctx, "n2", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Spec.PodCIDR, obj.Spec.PodCIDRs = "10.244.20.0/24", []string{"10.244.20.0/24"}
		if _, err := nodesAPI.Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		n2.PodCIDR = netip.MustParsePrefix("10.244.20.0/24")
		kt.waitSet(t, n1, n2, n3)
	})
	t.Run("update InternalIP", func(t *testing.T) {
		obj, err := nodesAPI.Get(ctx, "n3", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Status.Addresses[1].Address = "198.18.0.33"
		if _, err := nodesAPI.UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		n3.NodeIP = netip.MustParseAddr("198.18.0.33")
		kt.waitSet(t, n1, n2, n3)
	})
	t.Run("update routing annotation", func(t *testing.T) {
		obj, err := nodesAPI.Get(ctx, "n2", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Annotations = map[string]string{RoutingAnnotation: "native"}
		if _, err := nodesAPI.Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		n2.Routing = Native
		kt.waitSet(t, n1, n2, n3)
	})
	t.Run("delete", func(t *testing.T) {
		if err := nodesAPI.Delete(ctx, "n1", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		kt.waitSet(t, n2, n3)
	})
	t.Run("delete all", func(t *testing.T) {
		for _, name := range []string{"n2", "n3"} {
			if err := nodesAPI.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		// An empty set is sent too: the agent must remove every route.
		kt.waitSet(t)
	})
}

func TestKubeSkipsUnroutableNodes(t *testing.T) {
	kt := startKube(t, -1,
		kubeNode("good", "198.18.0.1", "10.244.1.0/24"),
		kubeNode("bad-cidr", "198.18.0.2", "10.244.300.0/24"),
		kubeNode("host-bits", "198.18.0.3", "10.244.3.7/24"),
		kubeNode("no-cidr", "198.18.0.4"),
		kubeNode("no-ip", "", "10.244.5.0/24"),
		kubeNode("v6-only", "198.18.0.6", "fd00:6::/64"),
		kubeNode("dual-stack", "198.18.0.7", "fd00:7::/64", "10.244.7.0/24"),
		kubeNode("v6-ip", "fd00::8", "10.244.8.0/24"),
		// Sorts after "good", so it is the one left out.
		kubeNode("same-cidr", "198.18.0.9", "10.244.1.0/24"),
	)
	good, dual := node("good", "198.18.0.1", "10.244.1.0/24"), node("dual-stack", "198.18.0.7", "10.244.7.0/24")
	if set := kt.Next(t); !equalSets(set, []Node{dual, good}) {
		t.Fatalf("set = %v, want only dual-stack and good", set)
	}
	logs := kt.log.String()
	for _, want := range []string{
		`level=ERROR msg="skipping node" node=bad-cidr err="spec.podCIDRs[0]: \"10.244.300.0/24\" is not a CIDR"`,
		`node=host-bits err="spec.podCIDRs[0]: \"10.244.3.7/24\" has host bits set"`,
		`node=v6-only err="spec.podCIDRs: [\"fd00:6::/64\"] has no IPv4 CIDR`,
		`node=same-cidr err="podCIDR 10.244.1.0/24 is also the pod CIDR of node good"`,
		`level=INFO msg="skipping node until it has a pod CIDR and an InternalIP" node=no-cidr`,
		`node=no-ip reason="node not ready for routing: status.addresses has no IPv4 InternalIP"`,
		`node=v6-ip reason=`,
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %s\nlog:\n%s", want, logs)
		}
	}

	// A fixed node joins, and is said to be fine; the others are not logged
	// again on the resend.
	ctx := context.Background()
	obj, err := kt.client.CoreV1().Nodes().Get(ctx, "bad-cidr", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	obj.Spec.PodCIDR, obj.Spec.PodCIDRs = "10.244.2.0/24", []string{"10.244.2.0/24"}
	if _, err := kt.client.CoreV1().Nodes().Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	kt.waitSet(t, node("bad-cidr", "198.18.0.2", "10.244.2.0/24"), dual, good)
	logs = kt.log.String()
	if !strings.Contains(logs, `msg="node is fine again" node=bad-cidr`) {
		t.Errorf("log lacks that bad-cidr is fine again:\n%s", logs)
	}
	if c := strings.Count(logs, "node=host-bits"); c != 1 {
		t.Errorf("host-bits logged %d times, want once:\n%s", c, logs)
	}
}

func TestKubeResync(t *testing.T) {
	// A second, client-go's minimum.
	kt := startKube(t, time.Second, kubeNode("n1", "198.18.0.1", "10.244.1.0/24"))
	want := []Node{node("n1", "198.18.0.1", "10.244.1.0/24")}
	// Nothing changes, yet the set keeps coming: each resend lets the
	// agent repair what was removed behind its back.
	for i := range 3 {
		if set := kt.Next(t); !equalSets(set, want) {
			t.Fatalf("set %d = %v, want %v", i, set, want)
		}
	}
}

func TestKubeIgnoresStatusOnlyUpdates(t *testing.T) {
	kt := startKube(t, -1, kubeNode("n1", "198.18.0.1", "10.244.1.0/24"))
	kt.Next(t)
	ctx := context.Background()
	nodesAPI := kt.client.CoreV1().Nodes()
	for i := range 5 {
		obj, err := nodesAPI.Get(ctx, "n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.NewTime(time.Unix(int64(i), 0))}}
		obj.ResourceVersion = strconv.Itoa(i + 2)
		if _, err := nodesAPI.UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := nodesAPI.Create(ctx, kubeNode("n2", "198.18.0.2", "10.244.2.0/24"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Events arrive in order: a resend caused by a heartbeat would come
	// before the set with n2.
	if set := kt.Next(t); len(set) != 2 {
		t.Fatalf("after heartbeats and a new node, got %v: heartbeats were sent as sets", set)
	}
}

func TestKubeFlannelAnnotations(t *testing.T) {
	mac := net.HardwareAddr{0x0e, 0x8c, 0x01, 0x02, 0x03, 0x04}
	for _, tc := range []struct {
		name   string
		ann    []string
		wantIP string
		mac    net.HardwareAddr
		err    error  // from FromKube
		warn   string // logged by Run
	}{
		{name: "patchcord node", wantIP: "198.18.0.2"},
		{
			name:   "flannel vxlan peer",
			ann:    []string{FlannelBackendType, "vxlan", FlannelBackendData, `{"VNI":1,"VtepMAC":"0e:8c:01:02:03:04"}`, FlannelPublicIP, "198.18.0.2", FlannelKubeSubnetManager, "true"},
			wantIP: "198.18.0.2", mac: mac,
		},
		{
			name:   "public IP on another NIC",
			ann:    []string{FlannelBackendType, "vxlan", FlannelBackendData, `{"VNI":1,"VtepMAC":"0e:8c:01:02:03:04"}`, FlannelPublicIP, "192.0.2.2"},
			wantIP: "192.0.2.2", mac: mac,
		},
		{
			name:   "no public IP",
			ann:    []string{FlannelBackendData, `{"VNI":1,"VtepMAC":"0e:8c:01:02:03:04"}`},
			wantIP: "198.18.0.2", mac: mac,
		},
		{
			name:   "bad public IP",
			ann:    []string{FlannelBackendData, `{"VNI":1,"VtepMAC":"0e:8c:01:02:03:04"}`, FlannelPublicIP, "flannel"},
			wantIP: "198.18.0.2", mac: mac,
			warn: `\"flannel\" is not an IPv4 address; using the InternalIP`,
		},
		{
			name:   "host-gw peer",
			ann:    []string{FlannelBackendType, "host-gw", FlannelBackendData, "null", FlannelPublicIP, "192.0.2.2"},
			wantIP: "198.18.0.2",
		},
		{
			name:   "bad JSON",
			ann:    []string{FlannelBackendType, "vxlan", FlannelBackendData, `{"VNI":1,`},
			wantIP: "198.18.0.2",
			warn:   `annotation flannel.alpha.coreos.com/backend-data: \"{\\\"VNI\\\":1,\": unexpected end of JSON input`,
		},
		{
			name:   "bad MAC",
			ann:    []string{FlannelBackendData, `{"VNI":1,"VtepMAC":"0e:8c"}`},
			wantIP: "198.18.0.2",
			warn:   `VtepMAC \"0e:8c\" is not a MAC address`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			obj := withAnnotations(kubeNode("peer", "198.18.0.2", "10.244.2.0/24"), tc.ann...)
			n, err := FromKube(obj)
			if !errors.Is(err, tc.err) {
				t.Fatalf("FromKube: %v, want %v", err, tc.err)
			}
			want := Node{Name: "peer", NodeIP: netip.MustParseAddr(tc.wantIP), PodCIDR: netip.MustParsePrefix("10.244.2.0/24"), VtepMAC: tc.mac}
			if !equalSets([]Node{n}, []Node{want}) {
				t.Fatalf("FromKube = %+v, want %+v", n, want)
			}
			// Run keeps the node, with the warning logged once.
			kt := startKube(t, -1, obj)
			if set := kt.Next(t); !equalSets(set, []Node{want}) {
				t.Fatalf("Run sent %v, want %v", set, want)
			}
			logs := kt.log.String()
			if tc.warn == "" && strings.Contains(logs, "level=WARN") {
				t.Errorf("unexpected warning:\n%s", logs)
			}
			if tc.warn != "" && (!strings.Contains(logs, `level=WARN msg="node annotation ignored" node=peer`) || !strings.Contains(logs, tc.warn)) {
				t.Errorf("log lacks the warning %s:\n%s", tc.warn, logs)
			}
		})
	}
}

func TestKubeSelf(t *testing.T) {
	client := fake.NewClientset(
		kubeNode("self", "198.18.0.1", "10.244.1.0/24"),
		kubeNode("fresh", "198.18.0.2"),
	)
	ctx := context.Background()
	n, err := (&Kube{Client: client, NodeName: "self"}).Self(ctx)
	if err != nil || !equalSets([]Node{n}, []Node{node("self", "198.18.0.1", "10.244.1.0/24")}) {
		t.Errorf("Self = %+v, %v", n, err)
	}
	if _, err := (&Kube{Client: client, NodeName: "fresh"}).Self(ctx); !errors.Is(err, ErrNotReady) {
		t.Errorf("Self of a node without pod CIDR: %v, want ErrNotReady", err)
	}
	if _, err := (&Kube{Client: client, NodeName: "nope"}).Self(ctx); err == nil || !strings.Contains(err.Error(), "get node nope") {
		t.Errorf("Self of an unknown node: %v", err)
	}
	if _, err := (&Kube{Client: client}).Self(ctx); err == nil || !strings.Contains(err.Error(), "NODE_NAME") {
		t.Errorf("Self without a node name: %v", err)
	}
}

func TestKubeSelfBGP(t *testing.T) {
	client := fake.NewClientset(
		withAnnotations(kubeNode("bgp", "198.18.1.1", "10.244.1.0/24"),
			BGPASNAnnotation, " 64601 ", BGPNeighborsAnnotation, "198.18.1.254,65000  198.18.1.253,65000"),
		kubeNode("plain", "198.18.0.2", "10.244.2.0/24"),
	)
	ctx := context.Background()
	asn, neighbors, err := (&Kube{Client: client, NodeName: "bgp"}).SelfBGP(ctx)
	if err != nil || asn != "64601" || !slices.Equal(neighbors, []string{"198.18.1.254,65000", "198.18.1.253,65000"}) {
		t.Errorf("SelfBGP = %q, %q, %v", asn, neighbors, err)
	}
	if asn, neighbors, err := (&Kube{Client: client, NodeName: "plain"}).SelfBGP(ctx); err != nil || asn != "" || len(neighbors) != 0 {
		t.Errorf("SelfBGP of a node without annotations = %q, %q, %v", asn, neighbors, err)
	}
	if _, _, err := (&Kube{Client: client, NodeName: "nope"}).SelfBGP(ctx); err == nil || !strings.Contains(err.Error(), "get node nope") {
		t.Errorf("SelfBGP of an unknown node: %v", err)
	}
}

func TestNewKubeClient(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	if _, err := NewKubeClient(""); err == nil || !strings.Contains(err.Error(), "pass --kubeconfig") {
		t.Errorf("in-cluster outside a pod: %v, want a hint to pass --kubeconfig", err)
	}
	dir := t.TempDir()
	if _, err := NewKubeClient(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "load kubeconfig") {
		t.Errorf("missing kubeconfig: %v", err)
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewKubeClient(kubeconfig); err != nil {
		t.Errorf("valid kubeconfig: %v", err)
	}
}

// The order of a set does not depend on the order of the API's list.
func TestNodeSetSorted(t *testing.T) {
	k := &Kube{Log: slog.New(slog.DiscardHandler)}
	set := k.nodeSet([]*corev1.Node{
		kubeNode("c", "198.18.0.3", "10.244.3.0/24"),
		kubeNode("a", "198.18.0.1", "10.244.1.0/24"),
		kubeNode("b", "198.18.0.2", "10.244.2.0/24"),
	})
	names := make([]string, len(set))
	for i, n := range set {
		names[i] = n.Name
	}
	if !slices.Equal(names, []string{"a", "b", "c"}) {
		t.Errorf("names = %v", names)
	}
}
