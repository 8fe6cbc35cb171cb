// Tests of the verbs a runtime issues for many pods at once, and of the CNI
// 1.1 node-wide verbs STATUS and GC.
package cni_test

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// TestParallelAddDel runs 20 ADDs at once, then 20 DELs, each in its own
// plugin process started from its own thread in the node's namespace, as a
// runtime starting pods does: CNI_* variables and stdout are per process, so
// in-process verbs cannot overlap.
func TestParallelAddDel(t *testing.T) {
	const pods = 20
	n := newNode(t)
	t.Setenv(pluginEnv, "1")
	ps := make([]*pod, pods)
	for i := range ps {
		ps[i] = newPod(t)
	}
	conf := n.conf(t, "1.1.0")

	results := make([]*current.Result, pods)
	errs := make([]error, pods)
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Go(func() {
			r, err := n.runPlugin("ADD", p.args(conf))
			if err == nil {
				results[i], err = current.NewResultFromResult(r)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	ips := map[netip.Addr]bool{}
	for i, err := range errs {
		if err != nil {
			t.Errorf("ADD %d: %v", i, err)
			continue
		}
		ip, _ := netip.AddrFromSlice(results[i].IPs[0].Address.IP.To4())
		ips[ip] = true
	}
	if t.Failed() {
		t.FailNow()
	}
	if len(ips) != pods {
		t.Errorf("%d distinct pod IPs, want %d", len(ips), pods)
	}
	for i, p := range ps {
		st := n.assertPodUp(t, p, results[i], 1450)
		if t.Failed() {
			t.Fatalf("pod %d (%s) is not fully set up", i, st.ip)
		}
	}
	dp := n.openPinned(t)
	if c := countKeys(t, dp.Maps.Endpoints); c != pods {
		t.Errorf("%d endpoints, want %d", c, pods)
	}

	for i, p := range ps {
		wg.Go(func() {
			_, errs[i] = n.runPlugin("DEL", p.args(conf))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("DEL %d: %v", i, err)
		}
	}
	n.assertClean(t)
}

func TestStatus(t *testing.T) {
	n := newNode(t)
	if err := n.status(n.conf(t, "1.1.0")); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	// A chained conf has no IPAM to ask.
	if err := n.status(n.conf(t, "1.1.0", with("ipam", nil))); err != nil {
		t.Errorf("chained STATUS: %v", err)
	}
	err := n.status(n.conf(t, "1.1.0", with("bpffsRoot", t.TempDir())))
	assertCNIError(t, err, types.ErrPluginNotAvailable, "mount -t bpf bpf")
}

func TestGC(t *testing.T) {
	n := newNode(t)
	keep, drop := newPod(t), newPod(t)
	resKeep, rawKeep := n.mustAdd(t, keep.args(n.conf(t, "1.1.0")))
	stKeep := n.assertPodUp(t, keep, resKeep, 1450)
	resDrop, _ := n.mustAdd(t, drop.args(n.conf(t, "1.1.0")))
	stDrop := n.assertPodUp(t, drop, resDrop, 1450)

	valid := []map[string]string{{"containerID": keep.id, "ifname": podIfname}}
	if err := n.gc(n.conf(t, "1.1.0", with("cni.dev/valid-attachments", valid))); err != nil {
		t.Fatalf("GC: %v", err)
	}
	n.assertPodGone(t, drop, stDrop)

	// The valid pod is intact.
	if err := n.check(keep.args(n.conf(t, "1.1.0", withPrev(rawKeep)))); err != nil {
		t.Errorf("CHECK of the valid pod after GC: %v", err)
	}
	if v := n.veths(t); fmt.Sprint(v) != fmt.Sprint([]string{stKeep.hostIfname}) {
		t.Errorf("veths after GC: %v, want [%s]", v, stKeep.hostIfname)
	}
	if p := n.linkPins(t); fmt.Sprint(p) != fmt.Sprint([]string{stKeep.hostIfname}) {
		t.Errorf("link pins after GC: %v, want [%s]", p, stKeep.hostIfname)
	}
	if l := n.leases(t); len(l) != 1 || l[0] != stKeep.ip {
		t.Errorf("leases after GC: %v, want [%s]", l, stKeep.ip)
	}
	dp := n.openPinned(t)
	if _, err := bpfmaps.NewEndpoints(&dp.Maps).Get(stKeep.ip); err != nil {
		t.Errorf("valid endpoint %s: %v", stKeep.ip, err)
	}
	if err := n.hostNS.Do(func(_ ns.NetNS) error { return dp.Attached(datapath.FromPod, stKeep.hostIfname) }); err != nil {
		t.Errorf("from_pod on the valid pod's veth: %v", err)
	}
}
