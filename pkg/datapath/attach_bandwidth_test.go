// The tc backend beside the CNI bandwidth plugin, the real binary, in both
// orders: whose qdisc, whose filter, and what from_pod still sees.
package datapath_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/vishvananda/netlink"
)

// bandwidthNS is a pod namespace behind dummy0p (renamed eth0), for the
// bandwidth plugin, which finds the host veth as the pod interface's peer.
func bandwidthNS(t *testing.T, host ns.NetNS) ns.NetNS {
	t.Helper()
	pod, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pod.Close()
		testutils.UnmountNS(pod)
	})
	err = host.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("dummy0p")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(l, int(pod.Fd())); err != nil {
			return err
		}
		h, _ := netlink.LinkByName("dummy0")
		return netlink.LinkSetUp(h)
	})
	if err == nil {
		err = pod.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("dummy0p")
			if err != nil {
				return err
			}
			if err := netlink.LinkSetName(l, "eth0"); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
	}
	if err != nil {
		t.Fatalf("move dummy0p into a pod namespace: %v", err)
	}
	return pod
}

// inBandwidthNode runs f in the host namespace of a fresh tc-mode node with
// dummy0 as the host veth of a pod namespace.
func inBandwidthNode(t *testing.T, f func(*datapath.Datapath, ns.NetNS) error) {
	t.Helper()
	d := mustTC(t)
	host := mustDummyNS(t)
	pod := bandwidthNS(t, host)
	if err := host.Do(func(ns.NetNS) error { return f(d, pod) }); err != nil {
		t.Fatal(err)
	}
}

// behindMirred sends frames from the pod, waits until they have crossed the
// bandwidth plugin's ifb, and returns how many from_pod saw (it drops
// unregistered senders' frames, counting each).
func behindMirred(t *testing.T, d *datapath.Datapath, pod ns.NetNS) uint64 {
	t.Helper()
	var ifb netlink.Link
	links, _ := netlink.LinkList()
	for _, l := range links {
		if l.Type() == "ifb" {
			ifb = l
		}
	}
	if ifb == nil {
		t.Fatal("no ifb: the bandwidth plugin shapes nothing")
	}
	host, _ := netlink.LinkByName("dummy0")
	var eth0 netlink.Link
	if err := pod.Do(func(ns.NetNS) (err error) { eth0, err = netlink.LinkByName("eth0"); return err }); err != nil {
		t.Fatal(err)
	}
	frame := ethernet{Dst: host.Attrs().HardwareAddr, Src: eth0.Attrs().HardwareAddr, Type: 0x0800}.marshal(udpPacket(podA.IP, podB.IP).marshal())
	const n = 10
	var stop atomic.Bool
	stop.Store(true)
	for range n {
		sendUntil(t, pod, eth0.Attrs().Index, frame, &stop)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if l, err := netlink.LinkByIndex(ifb.Attrs().Index); err == nil && l.Attrs().Statistics.TxPackets >= n {
			return unregistered(t, d)
		}
	}
	t.Fatalf("the %d frames never crossed %s", n, ifb.Attrs().Name)
	return 0
}

// runBandwidth runs the real bandwidth plugin's ADD for eth0 in pod with
// egress and ingress limits, from the current (host) namespace.
func runBandwidth(t *testing.T, pod ns.NetNS) ([]byte, error) {
	t.Helper()
	dir := datapathtest.CNIPlugins(t, "bandwidth")
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "tc-bandwidth", "type": "bandwidth",
		"runtimeConfig": map[string]any{"bandwidth": map[string]int{
			"ingressRate": 8_000_000, "ingressBurst": 800_000, "egressRate": 8_000_000, "egressBurst": 800_000}},
		"prevResult": map[string]any{"cniVersion": "1.0.0",
			"interfaces": []map[string]string{{"name": "dummy0"}, {"name": "eth0", "sandbox": pod.Path()}}},
	})
	cmd := exec.Command(filepath.Join(dir, "bandwidth"))
	cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=tcbw", "CNI_NETNS=" + pod.Path(), "CNI_IFNAME=eth0", "CNI_PATH=" + dir}
	cmd.Stdin = strings.NewReader(string(conf))
	return cmd.CombinedOutput()
}

// The bandwidth plugin after patchcord (a chain's order): beside our clsact
// it fails, so AttachYielding leaves it the slot; before patchcord (its
// qdisc there first), our filter joins its ingress qdisc behind its own,
// and detach leaves both.
func TestTCBandwidthCoexistence(t *testing.T) {
	log := datapathtest.Logger(t)
	t.Run("patchcord-first", func(t *testing.T) {
		inBandwidthNode(t, func(d *datapath.Datapath, pod ns.NetNS) error {
			if err := d.Attach(datapath.FromPod, "dummy0", log); err != nil {
				return err
			}
			if out, err := runBandwidth(t, pod); err == nil || !strings.Contains(string(out), "create ingress qdisc: file exists") {
				t.Errorf("bandwidth beside our clsact: %v %s; want its known failure, create ingress qdisc: file exists", err, out)
			}
			return nil
		})
	})
	t.Run("patchcord-first-yielding", func(t *testing.T) {
		inBandwidthNode(t, func(d *datapath.Datapath, pod ns.NetNS) error {
			if err := d.AttachYielding(datapath.FromPod, "dummy0", log); err != nil {
				return err
			}
			if out, err := runBandwidth(t, pod); err != nil {
				t.Errorf("bandwidth after a yielding attach: %v\n%s", err, out)
			}
			if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
				t.Errorf("yielded attachment: %v", err)
			}
			if atts, _ := d.Attachments(); len(atts) != 1 || !atts[0].Yielded || atts[0].Stale {
				t.Errorf("attachments: %+v, want one current, yielded", atts)
			}
			if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/dummy0/rp_filter"); strings.TrimSpace(string(b)) != "1" {
				t.Errorf("rp_filter on dummy0: %q, want 1: the host stack polices a yielded pod", b)
			}
			if out, _ := exec.Command("ip", "-4", "addr", "show", "dev", "dummy0").CombinedOutput(); !strings.Contains(string(out), datapath.PodGateway().String()+"/32") {
				t.Errorf("dummy0 addresses:\n%s\nwant the pod gateway's /32, which answers the pod's ARP", out)
			}
			if err := d.Detach(datapath.FromPod, "dummy0"); err != nil {
				return err
			}
			if atts, _ := d.Attachments(); len(atts) != 0 {
				t.Errorf("attachments after detach: %+v", atts)
			}
			return nil
		})
	})
	t.Run("bandwidth-first", func(t *testing.T) {
		inBandwidthNode(t, func(d *datapath.Datapath, pod ns.NetNS) error {
			if out, err := runBandwidth(t, pod); err != nil {
				t.Fatalf("bandwidth: %v\n%s", err, out)
			}
			if err := d.Attach(datapath.FromPod, "dummy0", log); err != nil {
				return err
			}
			out, _ := exec.Command("tc", "filter", "show", "dev", "dummy0", "ingress").CombinedOutput()
			if q := slotQdisc(t, "dummy0"); q != "ingress" || !strings.Contains(string(out), "pref 1 u32") || !strings.Contains(string(out), "patchcord:from_pod") {
				t.Errorf("after attach beside bandwidth: qdisc %q, filters\n%s\nwant bandwidth's ingress qdisc with its u32 and our filter", q, out)
			}
			if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
				t.Errorf("attached beside bandwidth: %v", err)
			}
			if seen := behindMirred(t, d, pod); seen != 0 {
				t.Errorf("from_pod behind bandwidth's filter saw %d frames, want none (the reason for AttachYielding)", seen)
			}
			if err := d.Detach(datapath.FromPod, "dummy0"); err != nil {
				return err
			}
			out, _ = exec.Command("tc", "filter", "show", "dev", "dummy0", "ingress").CombinedOutput()
			if q := slotQdisc(t, "dummy0"); q != "ingress" || !strings.Contains(string(out), "pref 1 u32") || strings.Contains(string(out), "patchcord") {
				t.Errorf("after detach: qdisc %q, filters\n%s\nwant bandwidth's qdisc and filter untouched, ours gone", q, out)
			}
			return nil
		})
	})
}
