// The Kubernetes node source: Node objects from the API server, watched with
// a client-go informer, turned into the same complete node sets the file
// source sends. It also speaks Flannel's node annotations, so that patchcord
// and Flannel nodes can share a cluster while it moves over node by node.
package nodes

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// Flannel's node annotations, with its default prefix (flannel
// pkg/subnet/kube/annotations.go). Flannel's vxlan backend writes all four;
// a Flannel node ignores every peer that lacks kube-subnet-manager "true".
const (
	FlannelBackendData       = "flannel.alpha.coreos.com/backend-data"
	FlannelBackendType       = "flannel.alpha.coreos.com/backend-type"
	FlannelPublicIP          = "flannel.alpha.coreos.com/public-ip"
	FlannelKubeSubnetManager = "flannel.alpha.coreos.com/kube-subnet-manager"
)

// RoutingAnnotation sets how a node's pods are reached (tunnel, native or
// auto), overriding every agent's --routing for that node.
const RoutingAnnotation = "patchcord.io/routing"

// DefaultResync is how often the whole node set is sent again although
// nothing changed: the agent's sync is idempotent, so a resend repairs a
// route or map entry someone removed by hand. Flannel uses the same period.
const DefaultResync = 5 * time.Minute

// ErrNotReady means a Node object lacks what routing needs (a pod CIDR or an
// InternalIP). It is normal for a node that has just registered.
var ErrNotReady = errors.New("node not ready for routing")

// Kube is a Source reading Node objects from the Kubernetes API.
type Kube struct {
	Client kubernetes.Interface
	// NodeName is this node's name (--node-name, $NODE_NAME). Run does not
	// need it: the set includes this node and the agent skips its own IP.
	// Self does.
	NodeName string
	// Resync resends the set although nothing changed; 0 means
	// DefaultResync, a negative value never.
	Resync time.Duration
	Log    *slog.Logger

	mu    sync.Mutex
	force bool // a resync asked for the next set to be sent even if unchanged
	// lister reads Run's informer cache once it has listed every node.
	lister corelisters.NodeLister
	// complaints holds, per node, what was last logged about it, so that a
	// bad node is logged when it turns bad, not on every resend.
	complaints map[string]string
}

// NewKubeClient connects with the kubeconfig at path or, when path is empty,
// with the pod's service account (in-cluster config).
func NewKubeClient(path string) (kubernetes.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if path == "" {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (outside a pod, pass --kubeconfig): %w", err)
		}
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig %s: %w", path, err)
		}
	}
	cfg.UserAgent = "patchcord-agent"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("make kubernetes client: %w", err)
	}
	return client, nil
}

// Run sends the node set once the informer has listed every node, then again
// whenever the set changes and at every resync, until ctx ends.
func (k *Kube) Run(ctx context.Context, updates chan<- []Node) error {
	resync := k.Resync
	if resync == 0 {
		resync = DefaultResync
	} else if resync < 0 {
		resync = 0 // informers: never
	}
	ctx, cancel := context.WithCancel(ctx)
	factory := informers.NewSharedInformerFactory(k.Client, resync)
	// Shutdown waits for the informer goroutines, which stop on cancel.
	defer func() { cancel(); factory.Shutdown() }()
	nodeInformer := factory.Core().V1().Nodes()
	inf, lister := nodeInformer.Informer(), nodeInformer.Lister()
	changed, err := k.watch(inf)
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	// Until the first list is complete, a set would lack nodes, and the
	// agent would tear down their routes.
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil // ctx ended
	}
	k.mu.Lock()
	k.lister = lister
	k.mu.Unlock()
	return k.send(ctx, lister, changed, updates)
}

// watch makes inf signal changed on every event. Handlers only signal: send
// reads the whole set from the lister, so a burst of events (a cluster's
// worth of heartbeats) costs one set, and a slow agent never blocks the
// informer.
func (k *Kube) watch(inf cache.SharedIndexInformer) (<-chan struct{}, error) {
	changed := make(chan struct{}, 1)
	poke := func(force bool) {
		if force {
			k.mu.Lock()
			k.force = true
			k.mu.Unlock()
		}
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { poke(false) },
		UpdateFunc: func(oldObj, newObj any) {
			// The same resourceVersion twice is a resync, not a change.
			o, ok1 := oldObj.(*corev1.Node)
			n, ok2 := newObj.(*corev1.Node)
			poke(ok1 && ok2 && o.ResourceVersion == n.ResourceVersion)
		},
		DeleteFunc: func(any) { poke(false) },
	})
	if err != nil {
		return nil, fmt.Errorf("watch nodes: %w", err)
	}
	return changed, nil
}

// send sends the set now and after each signal on changed, when it is new or
// a resync asked for it, until ctx ends.
func (k *Kube) send(ctx context.Context, lister corelisters.NodeLister, changed <-chan struct{}, updates chan<- []Node) error {
	var last []Node
	first := true
	for {
		list, err := lister.List(labels.Everything())
		if err != nil {
			// The lister reads a local cache; this does not happen.
			return fmt.Errorf("list nodes from the informer cache: %w", err)
		}
		set := k.nodeSet(list)
		k.mu.Lock()
		force := k.force
		k.force = false
		k.mu.Unlock()
		// Node status changes every few minutes per node and changes nothing
		// here; only new sets, and resyncs, go to the agent.
		if first || force || !equalSets(set, last) {
			select {
			case updates <- set:
			case <-ctx.Done():
				return nil
			}
			last, first = set, false
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		}
	}
}

// Cached returns the Node object name as Run's informer last saw it: nil
// before Run has listed the nodes, or when there is no such node. It reads
// the local cache and costs no API request.
func (k *Kube) Cached(name string) *corev1.Node {
	k.mu.Lock()
	lister := k.lister
	k.mu.Unlock()
	if lister == nil {
		return nil
	}
	obj, err := lister.Get(name)
	if err != nil {
		return nil
	}
	return obj
}

// nodeSet converts every Node object it can, sorted by name. Nodes that cannot
// be routed to are left out and logged once per complaint.
func (k *Kube) nodeSet(list []*corev1.Node) []Node {
	slices.SortFunc(list, func(a, b *corev1.Node) int { return strings.Compare(a.Name, b.Name) })
	out := make([]Node, 0, len(list))
	seen := make(map[netip.Prefix]string, len(list))
	complaints := make(map[string]string)
	notReady := make(map[string]bool)
	for _, obj := range list {
		n, warn, err := fromKube(obj)
		if err == nil {
			if other, dup := seen[n.PodCIDR]; dup {
				err = fmt.Errorf("podCIDR %s is also the pod CIDR of node %s", n.PodCIDR, other)
			}
		}
		if err != nil {
			complaints[obj.Name] = err.Error()
			notReady[obj.Name] = errors.Is(err, ErrNotReady)
			continue
		}
		if warn != nil {
			complaints[obj.Name] = warn.Error()
		}
		seen[n.PodCIDR] = n.Name
		out = append(out, n)
	}

	k.mu.Lock()
	defer k.mu.Unlock()
	for name, msg := range complaints {
		if k.complaints[name] == msg {
			continue
		}
		switch {
		case notReady[name]:
			// Normal while a node registers and waits for its pod CIDR.
			k.Log.Info("skipping node until it has a pod CIDR and an InternalIP", "node", name, "reason", msg)
		case slices.ContainsFunc(out, func(n Node) bool { return n.Name == name }):
			k.Log.Warn("node annotation ignored", "node", name, "err", msg)
		default:
			k.Log.Error("skipping node", "node", name, "err", msg)
		}
	}
	for name := range k.complaints {
		if _, still := complaints[name]; !still {
			k.Log.Info("node is fine again", "node", name)
		}
	}
	k.complaints = complaints
	return out
}

// FromKube turns a Node object into a Node. Errors say what is missing or
// wrong, naming the field; ErrNotReady marks a node that is merely not
// ready yet. An unusable Flannel annotation does not fail the node.
func FromKube(obj *corev1.Node) (Node, error) {
	n, _, err := fromKube(obj)
	return n, err
}

// fromKube is FromKube that also returns the non-fatal annotation problem.
func fromKube(obj *corev1.Node) (n Node, warn, err error) {
	n.Name = obj.Name
	cidrs := obj.Spec.PodCIDRs
	if len(cidrs) == 0 && obj.Spec.PodCIDR != "" {
		cidrs = []string{obj.Spec.PodCIDR}
	}
	if len(cidrs) == 0 {
		return n, nil, fmt.Errorf("%w: spec.podCIDR is empty (is the controller manager allocating node CIDRs?)", ErrNotReady)
	}
	// Dual-stack nodes list one CIDR per family; the datapath routes IPv4.
	for i, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return n, nil, fmt.Errorf("spec.podCIDRs[%d]: %q is not a CIDR", i, s)
		}
		if !p.Addr().Is4() {
			continue
		}
		if p != p.Masked() {
			return n, nil, fmt.Errorf("spec.podCIDRs[%d]: %q has host bits set", i, s)
		}
		n.PodCIDR = p
		break
	}
	if !n.PodCIDR.IsValid() {
		return n, nil, fmt.Errorf("spec.podCIDRs: %q has no IPv4 CIDR; patchcord routes IPv4 only", cidrs)
	}
	for _, a := range obj.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
			n.NodeIP = ip
			break
		}
	}
	if !n.NodeIP.IsValid() {
		return n, nil, fmt.Errorf("%w: status.addresses has no IPv4 InternalIP", ErrNotReady)
	}
	mac, publicIP, warn := flannelVTEP(obj.Annotations)
	if r, ok := obj.Annotations[RoutingAnnotation]; ok {
		var err error
		if n.Routing, err = ParseRouting(r); err != nil {
			warn = errors.Join(warn, fmt.Errorf("annotation %s: %w; using the agent's --routing", RoutingAnnotation, err))
		}
	}
	if mac != nil {
		n.VtepMAC = mac
		// Flannel sends from, and to, its public IP, which differs from the
		// InternalIP on nodes with several NICs (--iface, --public-ip).
		if publicIP.IsValid() {
			n.NodeIP = publicIP
		}
	}
	return n, warn, nil
}

// FlannelBackend is Flannel's vxlan backend data: {"VNI":1,"VtepMAC":"..."}.
type FlannelBackend struct {
	VNI     int    `json:"VNI"`
	VtepMAC string `json:"VtepMAC"`
}

// flannelVTEP reads a Flannel vxlan node's VTEP MAC and public IP. A node
// without the annotations yields nothing and no warning.
func flannelVTEP(ann map[string]string) (net.HardwareAddr, netip.Addr, error) {
	data, ok := ann[FlannelBackendData]
	if !ok {
		return nil, netip.Addr{}, nil
	}
	if t, ok := ann[FlannelBackendType]; ok && t != "vxlan" {
		// host-gw, wireguard...: no VTEP to send to.
		return nil, netip.Addr{}, nil
	}
	var bd FlannelBackend
	if err := json.Unmarshal([]byte(data), &bd); err != nil {
		return nil, netip.Addr{}, fmt.Errorf("annotation %s: %q: %v", FlannelBackendData, data, err)
	}
	if bd.VtepMAC == "" {
		return nil, netip.Addr{}, nil
	}
	mac, err := net.ParseMAC(bd.VtepMAC)
	if err != nil || len(mac) != 6 {
		return nil, netip.Addr{}, fmt.Errorf("annotation %s: VtepMAC %q is not a MAC address", FlannelBackendData, bd.VtepMAC)
	}
	s, ok := ann[FlannelPublicIP]
	if !ok {
		return mac, netip.Addr{}, nil
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || !ip.Is4() {
		return mac, netip.Addr{}, fmt.Errorf("annotation %s: %q is not an IPv4 address; using the InternalIP", FlannelPublicIP, s)
	}
	return mac, ip, nil
}

// Self reads this node (NodeName) from the API server: its pod CIDR and IP,
// for an agent started without --pod-cidr and --node-ip.
func (k *Kube) Self(ctx context.Context) (Node, error) {
	obj, err := k.selfObject(ctx)
	if err != nil {
		return Node{}, err
	}
	n, err := FromKube(obj)
	if err != nil {
		return Node{}, fmt.Errorf("node %s: %w", k.NodeName, err)
	}
	return n, nil
}

// BGP settings of a node, for an agent started without --bgp-asn: its AS
// number ("64601") and its neighbours, ADDR,ASN each, separated by spaces
// ("198.18.1.254,65000 198.18.1.253,65000").
const (
	BGPASNAnnotation       = "patchcord.io/bgp-asn"
	BGPNeighborsAnnotation = "patchcord.io/bgp-neighbors"
)

// SelfBGP reads this node's BGP annotations as they are written (the
// caller parses them, naming the annotation); asn is "" without them.
func (k *Kube) SelfBGP(ctx context.Context) (asn string, neighbors []string, err error) {
	obj, err := k.selfObject(ctx)
	if err != nil {
		return "", nil, err
	}
	return strings.TrimSpace(obj.Annotations[BGPASNAnnotation]), strings.Fields(obj.Annotations[BGPNeighborsAnnotation]), nil
}

// selfObject is this node's Node object.
func (k *Kube) selfObject(ctx context.Context) (*corev1.Node, error) {
	if k.NodeName == "" {
		return nil, errors.New("--node-name: required (or set NODE_NAME, e.g. from spec.nodeName)")
	}
	obj, err := k.Client.CoreV1().Nodes().Get(ctx, k.NodeName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get node %s: %w", k.NodeName, err)
	}
	return obj, nil
}

// equalSets compares two sorted sets.
func equalSets(a, b []Node) bool {
	return slices.EqualFunc(a, b, func(x, y Node) bool {
		return x.Name == y.Name && x.NodeIP == y.NodeIP && x.PodCIDR == y.PodCIDR && bytes.Equal(x.VtepMAC, y.VtepMAC) && x.Routing == y.Routing
	})
}
