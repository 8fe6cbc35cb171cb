// The Kubernetes node source end to end: agents started the way the
// DaemonSet starts them (--kubeconfig, --node-name, --flannel-compat, nothing
// per node) against a real kube-apiserver and etcd, with the rights
// deploy/rbac.yaml grants and nothing more, next to a Flannel node that
// knows its peers only from the annotations the agents publish. This is a
// cluster half-way through a migration from Flannel.
package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/kubecluster"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// nodeObject is the Node object kubelet and the controller manager make for a
// lab node.
func nodeObject(n *lab.Node, annotations map[string]string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.NetNS, Annotations: annotations},
		Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeHostName, Address: n.NetNS},
			{Type: corev1.NodeInternalIP, Address: n.IP.String()},
		}},
	}
}

// startKubeAgent starts an agent as the DaemonSet does: the node's IP, pod
// CIDR and uplink all come from its Node object.
func startKubeAgent(t *testing.T, ctx context.Context, n *lab.Node, kubeconfig string) *lab.Process {
	t.Helper()
	ready := filepath.Join(n.Lab.Dir, fmt.Sprintf("n%d.ready", n.Index))
	return e2e.StartReady(t, ctx, n, "agent", ready, "agent",
		"--kubeconfig", kubeconfig, "--node-name", n.NetNS,
		"--vxlan-port", strconv.Itoa(lab.FlannelPort), "--vni", strconv.Itoa(lab.FlannelVNI), "--flannel-compat",
		"--metrics-addr", "127.0.0.1:"+strconv.Itoa(e2e.MetricsPort),
		"--ready-file", ready, "--log-level", "debug")
}

func TestFlannelMigration(t *testing.T) {
	l := e2e.NewLab(t)
	ctx := e2e.Ctx(t)
	all := e2e.AddNodes(t, l, 1, 2, 4)
	n1, n2, fl := all[0], all[1], all[2]
	vtep, err := fl.AddFlannel()
	if err != nil {
		t.Fatal(err)
	}

	cp := kubecluster.Start(t, ctx, e2e.AddNodes(t, l, controlPlaneNode)[0])
	cp.Apply(t, ctx, filepath.Join(e2e.RepoDir(), "deploy", "rbac.yaml"))
	api := &nodeAPI{t: t, ctx: ctx, cp: cp}
	seedAPI(api, n1, n2, fl, vtep)
	kubeconfig := cp.Kubeconfig(t, kubecluster.AgentUser)
	for _, n := range []*lab.Node{n1, n2} {
		e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
		startKubeAgent(t, ctx, n, kubeconfig)
	}

	// Each agent published its uplink as its VTEP; the Flannel node learns
	// its peers from those annotations only, as flanneld would.
	for _, n := range []*lab.Node{n1, n2} {
		obj := api.get(n.NetNS)
		peer, err := nodes.FromKube(obj)
		if err != nil {
			t.Fatal(err)
		}
		mac, err := n.LinkMAC("eth0")
		if err != nil {
			t.Fatal(err)
		}
		if peer.VtepMAC.String() != mac.String() || peer.NodeIP != n.IP || obj.Annotations[nodes.FlannelKubeSubnetManager] != "true" {
			t.Fatalf("%s published %v, want VtepMAC %s at %s", n.NetNS, obj.Annotations, mac, n.IP)
		}
		if err := fl.AddVXLANPeer(lab.FlannelDevice, lab.VXLANPeer{PodCIDR: peer.PodCIDR, NodeIP: peer.NodeIP, VtepMAC: peer.VtepMAC}); err != nil {
			t.Fatal(err)
		}
	}
	// And each agent took the Flannel node's VTEP from its annotation.
	out, err := n1.CLI(ctx, "bpf", "node", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	type nodeView struct {
		PodCIDR string `json:"podCIDR"`
		VtepMAC string `json:"vtepMAC"`
	}
	var list []nodeView
	if err := json.Unmarshal(out, &list); err != nil {
		t.Fatalf("bpf node list: %v\n%s", err, out)
	}
	if !slices.Contains(list, nodeView{fl.PodCIDR.String(), vtep.String()}) {
		t.Errorf("n1's node map lacks the Flannel node's VtepMAC %s:\n%s", vtep, out)
	}

	p1 := e2e.AddPod(t, ctx, n1, "a", "patchcord")
	p2 := e2e.AddPod(t, ctx, n2, "a", "patchcord")
	e2e.WriteConflist(t, fl, "flannel-ptp", fl.FlannelConflist())
	fpod := e2e.AddPod(t, ctx, fl, "f", "flannel-ptp")
	e2e.Ping(t, ctx, p1, p2.IP.String())
	e2e.Ping(t, ctx, p1, fpod.IP.String())
	e2e.Ping(t, ctx, fpod, p2.IP.String())

	out, err = n1.Exec(ctx, "curl", "-fsS", "--max-time", "10", "http://127.0.0.1:"+strconv.Itoa(e2e.MetricsPort)+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v := e2e.ScrapeMetrics(t, out)["patchcord_nodes"]; v != 2 {
		t.Errorf("patchcord_nodes = %v on n1, want 2 (n2 and the Flannel node)", v)
	}

	// A deleted Node takes its routes with it; added back, it returns.
	cidr2 := n2.PodCIDR.String()
	api.remove(n2.NetNS)
	e2e.WaitNodeList(t, ctx, n1, "n2 gone from n1", func(m map[string]string) bool { _, ok := m[cidr2]; return !ok })
	if err := e2e.NoPing(ctx, p1, p2.IP.String(), 2); err != nil {
		t.Error(err)
	}
	obj := nodeObject(n2, nil)
	api.set(obj)
	e2e.WaitNodeList(t, ctx, n1, "n2 back on n1", func(m map[string]string) bool { return m[cidr2] == n2.IP.String() })
	e2e.Ping(t, ctx, p1, p2.IP.String())
}

// seedAPI stores the lab's Node objects: n1 and n2 with the stale Flannel
// annotations of the flannel.1 they ran before, fl with its live one.
func seedAPI(api *nodeAPI, n1, n2, fl *lab.Node, vtep net.HardwareAddr) {
	// The agents must overwrite n1's and n2's.
	stale := map[string]string{
		nodes.FlannelBackendData:       `{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}`,
		nodes.FlannelBackendType:       "vxlan",
		nodes.FlannelPublicIP:          "",
		nodes.FlannelKubeSubnetManager: "true",
	}
	for _, n := range []*lab.Node{n1, n2} {
		ann := map[string]string{}
		for k, v := range stale {
			ann[k] = v
		}
		ann[nodes.FlannelPublicIP] = n.IP.String()
		api.set(nodeObject(n, ann))
	}
	api.set(nodeObject(fl, map[string]string{
		nodes.FlannelBackendData:       fmt.Sprintf(`{"VNI":%d,"VtepMAC":"%s"}`, lab.FlannelVNI, vtep),
		nodes.FlannelBackendType:       "vxlan",
		nodes.FlannelPublicIP:          fl.IP.String(),
		nodes.FlannelKubeSubnetManager: "true",
	}))
}

// controlPlaneNode is the lab node that runs etcd and kube-apiserver.
const controlPlaneNode = 200

// nodeAPI does to Node objects what kubelet and the controller manager
// would, through the real API server.
type nodeAPI struct {
	t   *testing.T
	ctx context.Context
	cp  *kubecluster.ControlPlane
}

// set creates a node: the object, then its status, which a create ignores.
// The status goes in as a merge patch, as kubelet's does: the node's agent
// may patch its annotations in between.
func (a *nodeAPI) set(n *corev1.Node) {
	a.t.Helper()
	nodes := a.cp.Admin.CoreV1().Nodes()
	if _, err := nodes.Create(a.ctx, n, metav1.CreateOptions{}); err != nil {
		a.t.Fatalf("create node %s: %v", n.Name, err)
	}
	status, err := json.Marshal(map[string]any{"status": n.Status})
	if err != nil {
		a.t.Fatal(err)
	}
	if _, err := nodes.Patch(a.ctx, n.Name, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		a.t.Fatalf("patch status of node %s: %v", n.Name, err)
	}
}

func (a *nodeAPI) get(name string) *corev1.Node {
	a.t.Helper()
	n, err := a.cp.Admin.CoreV1().Nodes().Get(a.ctx, name, metav1.GetOptions{})
	if err != nil {
		a.t.Fatalf("get node %s: %v", name, err)
	}
	return n
}

func (a *nodeAPI) remove(name string) {
	a.t.Helper()
	if err := a.cp.Admin.CoreV1().Nodes().Delete(a.ctx, name, metav1.DeleteOptions{}); err != nil {
		a.t.Fatalf("delete node %s: %v", name, err)
	}
}
