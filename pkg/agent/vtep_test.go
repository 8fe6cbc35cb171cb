package agent

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/sourcetest"
	"github.com/patchcord/patchcord/pkg/nodes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// kubeNode is a Node object with a pod CIDR and an InternalIP.
func kubeNode(name, ip, cidr string, kv ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1", Annotations: map[string]string{}}}
	n.Spec.PodCIDR, n.Spec.PodCIDRs = cidr, []string{cidr}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}
	for i := 0; i+1 < len(kv); i += 2 {
		n.Annotations[kv[i]] = kv[i+1]
	}
	return n
}

func patches(client *fake.Clientset) int {
	n := 0
	for _, a := range client.Actions() {
		if a.GetVerb() == "patch" {
			n++
		}
	}
	return n
}

func TestPublishVTEP(t *testing.T) {
	client := fake.NewClientset(kubeNode("self", "198.18.0.1", "10.244.1.0/24", "keep.example.com/other", "kept"))
	src := &nodes.Kube{Client: client, NodeName: "self", Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01}
	ip := netip.MustParseAddr("198.18.0.1")

	if _, err := PublishVTEP(ctx, src, mac, 1, ip); err != nil {
		t.Fatal(err)
	}
	obj, err := client.CoreV1().Nodes().Get(ctx, "self", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// What Flannel's vxlan backend writes, byte for byte.
	want := map[string]string{
		"flannel.alpha.coreos.com/backend-data":        `{"VNI":1,"VtepMAC":"52:54:00:aa:bb:01"}`,
		"flannel.alpha.coreos.com/backend-type":        "vxlan",
		"flannel.alpha.coreos.com/public-ip":           "198.18.0.1",
		"flannel.alpha.coreos.com/kube-subnet-manager": "true",
		"keep.example.com/other":                       "kept",
	}
	for k, v := range want {
		if obj.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q", k, obj.Annotations[k], v)
		}
	}
	if len(obj.Annotations) != len(want) {
		t.Errorf("annotations = %v, want %v", obj.Annotations, want)
	}
	// Peers read back what was published.
	if n, err := nodes.FromKube(obj); err != nil || !bytes.Equal(n.VtepMAC, mac) || n.NodeIP != ip {
		t.Errorf("FromKube(published) = %+v, %v; want VtepMAC %s, NodeIP %s", n, err, mac, ip)
	}
	if got := patches(client); got != 1 {
		t.Fatalf("%d patches, want 1", got)
	}

	// A restart with the same VTEP writes nothing.
	if _, err := PublishVTEP(ctx, src, mac, 1, ip); err != nil {
		t.Fatal(err)
	}
	if got := patches(client); got != 1 {
		t.Errorf("republishing the same VTEP patched the node (%d patches)", got)
	}
	// A new NIC does.
	mac2 := net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02}
	if _, err := PublishVTEP(ctx, src, mac2, 1, ip); err != nil {
		t.Fatal(err)
	}
	obj, _ = client.CoreV1().Nodes().Get(ctx, "self", metav1.GetOptions{})
	if got := obj.Annotations[nodes.FlannelBackendData]; got != `{"VNI":1,"VtepMAC":"52:54:00:aa:bb:02"}` || patches(client) != 2 {
		t.Errorf("after a MAC change: backend-data %s, %d patches", got, patches(client))
	}

	for _, tc := range []struct {
		name string
		src  *nodes.Kube
		mac  net.HardwareAddr
		vni  int
		ip   netip.Addr
		want string
	}{
		{"no node name", &nodes.Kube{Client: client}, mac, 1, ip, "--node-name: required"},
		{"unknown node", &nodes.Kube{Client: client, NodeName: "nope"}, mac, 1, ip, `get node nope: nodes "nope" not found`},
		{"short MAC", src, mac[:4], 1, ip, "is not 6 bytes"},
		{"VNI 0", src, mac, 0, ip, "VNI 0 is out of range"},
		{"IPv6", src, mac, 1, netip.MustParseAddr("fd00::1"), `"fd00::1" is not an IPv4 address`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := PublishVTEP(ctx, tc.src, tc.mac, tc.vni, tc.ip)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("PublishVTEP: %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// The agent restores the VTEP when a node set shows the Node re-registered
// without it, as it does with every set (follow).
func TestVTEPKeptPublished(t *testing.T) {
	client := fake.NewClientset(kubeNode("n1", "198.18.0.1", "10.244.1.0/24"))
	src := &nodes.Kube{Client: client, NodeName: "n1", Resync: -1, Log: slog.New(slog.DiscardHandler)}
	updates := sourcetest.StartWatching(t, client, "nodes", src.Run)
	ctx := context.Background()
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01}
	// Published reads as the node's VtepMAC in the sets.
	waitVTEP := func(v *VTEP) {
		t.Helper()
		for set := updates.Next(t); len(set) != 1 || !bytes.Equal(set[0].VtepMAC, mac); set = updates.Next(t) {
			if v != nil {
				v.keep(ctx)
			}
		}
	}
	updates.Next(t)
	v, err := PublishVTEP(ctx, src, mac, 1, netip.MustParseAddr("198.18.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	waitVTEP(nil)

	// kubelet registers the node anew, without annotations.
	obj := kubeNode("n1", "198.18.0.1", "10.244.1.0/24")
	obj.ResourceVersion = "100"
	if _, err := client.CoreV1().Nodes().Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitVTEP(v)
	if got := patches(client); got != 2 {
		t.Errorf("%d patches, want 2 (publish, restore)", got)
	}
}
