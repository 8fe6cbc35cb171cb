// The Kubernetes node source end to end: agents started the way the
// DaemonSet starts them (--kubeconfig, --node-name, --flannel-compat, nothing
// per node) against a small in-memory API server, next to a Flannel node
// that knows its peers only from the annotations the agents publish. This is
// a cluster half-way through a migration from Flannel.
package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// apiServer is as much of the API server as a Node informer and a patch of
// a node's annotations need: list, watch (also as a watch-list stream),
// get and merge-patch of core/v1 Nodes.
type apiServer struct {
	mu       sync.Mutex
	rv       int
	nodes    map[string]*corev1.Node
	history  []watchEvent // every change, for watches that start behind
	watchers map[chan watchEvent]bool
}

type watchEvent struct {
	Type   string       `json:"type"`
	Object *corev1.Node `json:"object"`
	rv     int
}

func newAPIServer() *apiServer {
	return &apiServer{nodes: map[string]*corev1.Node{}, watchers: map[chan watchEvent]bool{}}
}

// set adds or replaces a node, as kubelet and the controller manager would.
func (s *apiServer) set(n *corev1.Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	typ := "MODIFIED"
	if _, ok := s.nodes[n.Name]; !ok {
		typ = "ADDED"
	}
	s.store(typ, n.DeepCopy())
}

func (s *apiServer) remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.nodes[name]; ok {
		delete(s.nodes, name)
		s.rv++
		s.notify(watchEvent{Type: "DELETED", Object: n.DeepCopy(), rv: s.rv})
	}
}

func (s *apiServer) get(name string) *corev1.Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.nodes[name]; ok {
		return n.DeepCopy()
	}
	return nil
}

// store saves n under a new resourceVersion; s.mu is held.
func (s *apiServer) store(typ string, n *corev1.Node) {
	s.rv++
	n.ResourceVersion = strconv.Itoa(s.rv)
	n.TypeMeta = metav1.TypeMeta{Kind: "Node", APIVersion: "v1"}
	s.nodes[n.Name] = n
	s.notify(watchEvent{Type: typ, Object: n.DeepCopy(), rv: s.rv})
}

func (s *apiServer) notify(ev watchEvent) {
	s.history = append(s.history, ev)
	for ch := range s.watchers {
		select {
		case ch <- ev:
		default: // a stuck watcher loses events; its informer relists
		}
	}
}

func (s *apiServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name, named := strings.CutPrefix(r.URL.Path, "/api/v1/nodes/")
	switch {
	case r.URL.Path == "/api/v1/nodes" && r.Method == http.MethodGet:
		if q := r.URL.Query().Get("watch"); q == "true" || q == "1" {
			s.watch(w, r)
			return
		}
		s.mu.Lock()
		list := corev1.NodeList{TypeMeta: metav1.TypeMeta{Kind: "NodeList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: strconv.Itoa(s.rv)}}
		for _, n := range s.nodes {
			list.Items = append(list.Items, *n.DeepCopy())
		}
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, list)
	case named && r.Method == http.MethodGet:
		if n := s.get(name); n != nil {
			writeJSON(w, http.StatusOK, n)
			return
		}
		writeStatus(w, http.StatusNotFound, "NotFound", fmt.Sprintf("nodes %q not found", name))
	case named && r.Method == http.MethodPatch:
		if ct := r.Header.Get("Content-Type"); ct != "application/merge-patch+json" {
			writeStatus(w, http.StatusUnsupportedMediaType, "UnsupportedMediaType", ct)
			return
		}
		var patch json.RawMessage
		if err := json.NewDecoder(r.Body).Decode(&patch); err != nil {
			writeStatus(w, http.StatusBadRequest, "BadRequest", err.Error())
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		n, ok := s.nodes[name]
		if !ok {
			writeStatus(w, http.StatusNotFound, "NotFound", fmt.Sprintf("nodes %q not found", name))
			return
		}
		orig, _ := json.Marshal(n)
		merged, err := jsonpatch.MergePatch(orig, patch)
		var out corev1.Node
		if err == nil {
			err = json.Unmarshal(merged, &out)
		}
		if err != nil {
			writeStatus(w, http.StatusUnprocessableEntity, "Invalid", err.Error())
			return
		}
		s.store("MODIFIED", &out)
		writeJSON(w, http.StatusOK, &out)
	default:
		writeStatus(w, http.StatusNotFound, "NotFound", r.Method+" "+r.URL.Path)
	}
}

// watch streams events after the requested resourceVersion or, for a
// watch-list (sendInitialEvents), every node followed by the bookmark that
// ends the initial events.
func (s *apiServer) watch(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ch := make(chan watchEvent, 1024)
	s.mu.Lock()
	var backlog []watchEvent
	if q.Get("sendInitialEvents") == "true" {
		for _, n := range s.nodes {
			backlog = append(backlog, watchEvent{Type: "ADDED", Object: n.DeepCopy()})
		}
		backlog = append(backlog, watchEvent{Type: "BOOKMARK", Object: &corev1.Node{
			TypeMeta:   metav1.TypeMeta{Kind: "Node", APIVersion: "v1"},
			ObjectMeta: metav1.ObjectMeta{ResourceVersion: strconv.Itoa(s.rv), Annotations: map[string]string{metav1.InitialEventsAnnotationKey: "true"}},
		}})
	} else {
		from, _ := strconv.Atoi(q.Get("resourceVersion"))
		for _, ev := range s.history {
			if ev.rv > from {
				backlog = append(backlog, ev)
			}
		}
	}
	s.watchers[ch] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.watchers, ch)
		s.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	flusher := w.(http.Flusher)
	enc := json.NewEncoder(w)
	send := func(ev watchEvent) bool {
		if err := enc.Encode(ev); err != nil {
			return false
		}
		flusher.Flush()
		return true
	}
	for _, ev := range backlog {
		if !send(ev) {
			return
		}
	}
	flusher.Flush()
	for {
		select {
		case ev := <-ch:
			if !send(ev) {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeStatus(w http.ResponseWriter, code int, reason, msg string) {
	writeJSON(w, code, metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure, Reason: metav1.StatusReason(reason), Message: msg, Code: int32(code),
	})
}

// serveIn serves the API on 127.0.0.1:6443 inside a node's namespace, where
// that node's agent (and nothing outside the node) reaches it.
func (s *apiServer) serveIn(t *testing.T, n *lab.Node) {
	t.Helper()
	var ln net.Listener
	err := ns.WithNetNSPath(n.NSPath, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:6443")
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", n.NetNS, err)
	}
	srv := &http.Server{Handler: s}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

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

	api := newAPIServer()
	seedAPI(api, n1, n2, fl, vtep)
	kubeconfig := writeKubeconfig(t, l.Dir)
	for _, n := range []*lab.Node{n1, n2} {
		api.serveIn(t, n)
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
func seedAPI(api *apiServer, n1, n2, fl *lab.Node, vtep net.HardwareAddr) {
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

// writeKubeconfig writes the agents' kubeconfig, pointing at the API server
// each node serves on its loopback, and returns its path.
func writeKubeconfig(t *testing.T, dir string) string {
	t.Helper()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: "http://127.0.0.1:6443"}}]
users: [{name: agent, user: {}}]
contexts: [{name: lab, context: {cluster: lab, user: agent}}]
current-context: lab
`), 0o600); err != nil {
		t.Fatal(err)
	}
	return kubeconfig
}
