// The race between the verbs and the agent: parallel ADDs and DELs while
// the agent reconciles every 100 ms must never leave a live pod without its
// from_pod link or its endpoint.
package cni_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/agent"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
)

// livePod is a pod between its ADD's success and its DEL: the sampler
// checks it under mu, and the worker takes mu before the DEL starts.
type livePod struct {
	mu      sync.Mutex
	live    bool
	ip      netip.Addr
	ifname  string
	ifindex int
}

// idleSource is a node source with this node alone: the test is about
// endpoints, not remote nodes.
type idleSource struct{ self nodes.Node }

func (s idleSource) Run(ctx context.Context, updates chan<- []nodes.Node) error {
	select {
	case updates <- []nodes.Node{s.self}:
	case <-ctx.Done():
	}
	<-ctx.Done()
	return nil
}

// mustAgent runs the agent in the node's namespace, reconciling every
// interval, until the test ends.
func (n *node) mustAgent(t *testing.T, every time.Duration) {
	t.Helper()
	err := n.hostNS.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1500}, PeerName: "eth0p"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(198, 18, 0, 1), Mask: net.CIDRMask(24, 32)}})
	})
	if err != nil {
		t.Fatalf("add uplink: %v", err)
	}
	self := nodes.Node{Name: "node1", NodeIP: netip.MustParseAddr("198.18.0.1"), PodCIDR: podPrefix}
	ready := filepath.Join(t.TempDir(), "ready")
	cfg := agent.Config{Uplink: "eth0", NodeIP: self.NodeIP, PodCIDR: self.PodCIDR, VNI: 1, VXLANPort: 4789,
		BpffsRoot: n.root, ReadyFile: ready, ReconcileEvery: every}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- n.hostNS.Do(func(ns.NetNS) error { return agent.Run(ctx, cfg, idleSource{self}, datapathtest.Logger(t)) })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for _, err := os.Stat(ready); err != nil; _, err = os.Stat(ready) {
		if time.Now().After(deadline) {
			t.Fatal("agent not ready within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAddDelRaceWithReconcile(t *testing.T) {
	const workers, rounds = 20, 10
	n := newNode(t)
	t.Setenv(pluginEnv, "1")
	n.mustAgent(t, 100*time.Millisecond)
	conf := n.conf(t, "1.1.0")
	// Two slots per worker: a pod stays live while its worker adds the
	// next one, so each is sampled across reconcile passes.
	pods := make([]*livePod, 2*workers)
	for i := range pods {
		pods[i] = &livePod{}
	}

	stop := make(chan struct{})
	var samples atomic.Int64
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		n.samplePods(t, pods, stop, &samples)
	}()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			var prev *pod
			for i := range rounds {
				slot := pods[2*w+i%2]
				cur := n.addLive(t, slot, conf)
				if prev != nil {
					n.delLive(t, pods[2*w+(i+1)%2], prev, conf)
				}
				if cur == nil {
					return
				}
				prev = cur
			}
			n.delLive(t, pods[2*w+(rounds-1)%2], prev, conf)
		})
	}
	wg.Wait()
	close(stop)
	<-sampled
	t.Logf("%d ADD+DEL in %s with reconcile every 100ms; %d samples of live pods", workers*rounds, time.Since(start).Round(time.Millisecond), samples.Load())
	if samples.Load() == 0 {
		t.Error("no live pod was ever sampled")
	}
	// The uplink is the test's own, not a pod's.
	if err := n.hostNS.Do(func(ns.NetNS) error { return ip.DelLinkByName("eth0") }); err != nil {
		t.Fatalf("delete uplink: %v", err)
	}
	n.assertClean(t)
}

// addLive adds a pod and marks it live in slot for the sampler.
func (n *node) addLive(t *testing.T, slot *livePod, conf []byte) *pod {
	// Namespaces made in parallel trip over each other's bind mounts.
	nsMu.Lock()
	p := newPod(t)
	nsMu.Unlock()
	r, err := n.runPlugin("ADD", p.args(conf))
	if err != nil {
		t.Errorf("ADD %s: %v", p.id, err)
		return nil
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		t.Errorf("ADD %s result: %v", p.id, err)
		return nil
	}
	ip, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	ifname := res.Interfaces[0].Name
	var ifindex int
	err = n.hostNS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err == nil {
			ifindex = l.Attrs().Index
		}
		return err
	})
	if err != nil {
		t.Errorf("host veth of %s: %v", p.id, err)
		return nil
	}
	slot.mu.Lock()
	slot.live, slot.ip, slot.ifname, slot.ifindex = true, ip, ifname, ifindex
	slot.mu.Unlock()
	return p
}

// delLive takes the pod in slot off the sampler's list, then deletes it.
func (n *node) delLive(t *testing.T, slot *livePod, p *pod, conf []byte) {
	slot.mu.Lock()
	slot.live = false
	slot.mu.Unlock()
	if _, err := n.runPlugin("DEL", p.args(conf)); err != nil {
		t.Errorf("DEL %s: %v", p.id, err)
	}
	// The namespace goes in the test's cleanup: unmounted while another
	// worker forks a plugin, it is busy (the child holds its fd until exec).
}

var nsMu sync.Mutex

// samplePods checks, until stop, that every live pod has its endpoint on
// its veth and a current from_pod link.
func (n *node) samplePods(t *testing.T, pods []*livePod, stop chan struct{}, samples *atomic.Int64) {
	dp, err := datapath.OpenPinned(n.root)
	if err != nil {
		t.Errorf("open pinned datapath: %v", err)
		return
	}
	defer dp.Close()
	eps := bpfmaps.NewEndpoints(&dp.Maps)
	for {
		select {
		case <-stop:
			return
		default:
		}
		for _, lp := range pods {
			lp.mu.Lock()
			if lp.live {
				samples.Add(1)
				if ep, err := eps.Get(lp.ip); err != nil || ep.Ifindex != lp.ifindex {
					t.Errorf("live pod %s on %s: endpoint %+v, %v", lp.ip, lp.ifname, ep, err)
				}
				err := n.hostNS.Do(func(ns.NetNS) error { return dp.Attached(datapath.FromPod, lp.ifname) })
				if err != nil {
					t.Errorf("live pod %s: %v", lp.ip, err)
				}
			}
			lp.mu.Unlock()
		}
	}
}
