// The tc backend on real veths in namespaces of their own: attach and
// re-attach, replacement under traffic, detach beside other tc users (the
// real bandwidth CNI plugin among them, in both orders), and the recorded
// attach mode.
package datapath_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// mustTC opens a fresh datapath whose node is recorded as tc mode.
func mustTC(t *testing.T) *datapath.Datapath {
	t.Helper()
	d := datapathtest.MustOpen(t)
	if m, err := d.SetAttachMode(datapath.AttachTC, datapathtest.Logger(t)); err != nil || m != datapath.AttachTC {
		t.Fatalf("set attach mode tc: got %q, %v", m, err)
	}
	return d
}

// bpfFilters lists the cls_bpf filters on ifname's hook parent.
func bpfFilters(t *testing.T, ifname string, parent uint32) []*netlink.BpfFilter {
	t.Helper()
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := netlink.FilterList(l, parent)
	if err != nil {
		return nil // no qdisc: no filters
	}
	var out []*netlink.BpfFilter
	for _, f := range fs {
		if bf, ok := f.(*netlink.BpfFilter); ok {
			out = append(out, bf)
		}
	}
	return out
}

// slotQdisc is the kind of qdisc in ifname's ingress slot, "" for none.
func slotQdisc(t *testing.T, ifname string) string {
	t.Helper()
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	qs, err := netlink.QdiscList(l)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS {
			return q.Type()
		}
	}
	return ""
}

func progIDOf(t *testing.T, d *datapath.Datapath, name string) int {
	t.Helper()
	return int(progID(t, d, name))
}

func TestTCAttachIdempotentAndDetach(t *testing.T) {
	d := mustTC(t)
	netns := mustDummyNS(t)
	err := netns.Do(func(ns.NetNS) error {
		for range 2 {
			if err := d.Attach(datapath.FromPod, "dummy0", datapathtest.Logger(t)); err != nil {
				return err
			}
		}
		fs := bpfFilters(t, "dummy0", netlink.HANDLE_MIN_INGRESS)
		if len(fs) != 1 || fs[0].Id != progIDOf(t, d, datapath.FromPod) || !fs[0].DirectAction || fs[0].Name != "patchcord:from_pod" {
			t.Errorf("filters on dummy0 ingress: got %+v, want one direct-action patchcord:from_pod running from_pod", fs)
		}
		if q := slotQdisc(t, "dummy0"); q != "clsact" {
			t.Errorf("qdisc in the ingress slot: %q, want clsact", q)
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
			t.Errorf("after attach: %v", err)
		}
		atts, err := d.Attachments()
		if err != nil {
			return err
		}
		if len(atts) != 1 || atts[0].Stale || atts[0].Mode != datapath.AttachTC || atts[0].Ifindex == 0 || atts[0].LinkID != 0 {
			t.Errorf("attachments: got %+v, want one current tc attachment on dummy0", atts)
		}
		for range 2 {
			if err := d.Detach(datapath.FromPod, "dummy0"); err != nil {
				return err
			}
		}
		if fs := bpfFilters(t, "dummy0", netlink.HANDLE_MIN_INGRESS); len(fs) != 0 {
			t.Errorf("filters left after detach: %+v", fs)
		}
		if q := slotQdisc(t, "dummy0"); q != "" {
			t.Errorf("empty %s qdisc left after detach", q)
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err == nil {
			t.Error("still attached after detach")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A recreated interface has no filter; a filter on other code is stale;
// Attach heals both, the second in place (same filter, new program).
func TestTCAttachHealsStale(t *testing.T) {
	d := mustTC(t)
	other := mustTC(t) // another from_pod: "older code"
	log := datapathtest.Logger(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		if err := recreateDummy(); err != nil {
			return err
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err == nil {
			t.Error("Attached: the record of a deleted interface passes as current")
		}
		if atts, _ := d.Attachments(); len(atts) != 1 || !atts[0].Stale {
			t.Errorf("attachments after the interface was recreated: %+v, want one stale", atts)
		}
		if err := d.Attach(datapath.FromPod, "dummy0", log); err != nil {
			return err
		}
		if err := other.Attach(datapath.FromPod, "dummy0", log); err != nil {
			return err
		}
		if d.Attached(datapath.FromPod, "dummy0") == nil {
			t.Error("Attached: a filter on other code passes as current")
		}
		if err := d.Attach(datapath.FromPod, "dummy0", log); err != nil {
			return err
		}
		fs := bpfFilters(t, "dummy0", netlink.HANDLE_MIN_INGRESS)
		if len(fs) != 1 || fs[0].Id != progIDOf(t, d, datapath.FromPod) {
			t.Errorf("filters: got %+v, want one running from_pod %d", fs, progIDOf(t, d, datapath.FromPod))
		}
		return d.Attached(datapath.FromPod, "dummy0")
	})
	if err != nil {
		t.Fatal(err)
	}
}

// An upgrade moves tc attachments to the new program through Open, as it
// moves tcx links: the Open runs in the interface's namespace.
func TestTCOpenUpgradesInPlace(t *testing.T) {
	d := mustTC(t)
	other := mustTC(t)
	log := datapathtest.Logger(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		// A load killed between pinning programs and moving attachments
		// leaves them on other code and no build marker.
		if err := other.Attach(datapath.FromPod, "dummy0", log); err != nil {
			return err
		}
		if err := os.RemoveAll(filepath.Join(d.Root, "build")); err != nil {
			return err
		}
		again, err := datapath.Open(d.Root, log)
		if err != nil {
			return err
		}
		defer again.Close()
		return again.Attached(datapath.FromPod, "dummy0")
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Replacing the program of a filter under traffic leaves no moment without
// one: two datapaths (own programs, own counters) take turns on dummy0's
// filter while unregistered frames flow in; each from_pod drops them as
// drop_unregistered, and a frame that met no program would reach the host
// stack uncounted. Every frame must be counted by one of them.
func TestTCReplaceUnderTrafficHasNoGap(t *testing.T) {
	d1, d2 := mustTC(t), mustTC(t)
	log := datapathtest.Logger(t)
	netns := mustDummyNS(t)
	var host, pod netlink.Link
	err := netns.Do(func(ns.NetNS) error {
		var err error
		host, _ = netlink.LinkByName("dummy0")
		pod, _ = netlink.LinkByName("dummy0p")
		for _, l := range []netlink.Link{host, pod} {
			// Only the test's frames: no IPv6 neighbour discovery.
			if err = os.WriteFile("/proc/sys/net/ipv6/conf/"+l.Attrs().Name+"/disable_ipv6", []byte("1"), 0o644); err != nil {
				return err
			}
			if err = netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return d1.Attach(datapath.FromPod, "dummy0", log)
	})
	if err != nil {
		t.Fatal(err)
	}
	frame := ethernet{Dst: host.Attrs().HardwareAddr, Src: pod.Attrs().HardwareAddr, Type: 0x0800}.marshal(udpPacket(podA.IP, podB.IP).marshal())
	var stop atomic.Bool
	sent := make(chan int)
	go func() { sent <- sendUntil(t, netns, pod.Attrs().Index, frame, &stop) }()

	swaps := 0
	err = netns.Do(func(ns.NetNS) error {
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); swaps++ {
			if err := []*datapath.Datapath{d2, d1}[swaps%2].Attach(datapath.FromPod, "dummy0", log); err != nil {
				return err
			}
		}
		return nil
	})
	stop.Store(true)
	n := <-sent
	if err != nil {
		t.Fatal(err)
	}
	var counted uint64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		counted = unregistered(t, d1) + unregistered(t, d2)
		if counted >= uint64(n) {
			break
		}
	}
	t.Logf("%d frames across %d replacements; counted %d (d1 %d, d2 %d)", n, swaps, counted, unregistered(t, d1), unregistered(t, d2))
	if counted != uint64(n) || unregistered(t, d1) == 0 || unregistered(t, d2) == 0 || swaps < 10 {
		t.Errorf("counted %d of %d frames over %d replacements: want every frame seen by one of both programs", counted, n, swaps)
	}
}

// sendUntil sends frame out of the pod side until stop (once at least),
// pacing itself so
// that the receive backlog never overflows, and returns how many it sent.
func sendUntil(t *testing.T, netns ns.NetNS, ifindex int, frame []byte, stop *atomic.Bool) int {
	n := 0
	err := netns.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for {
			if err := unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
				return err
			}
			if n++; stop.Load() {
				return nil
			}
			if n%32 == 0 {
				time.Sleep(100 * time.Microsecond)
			}
		}
	})
	if err != nil {
		t.Errorf("send frames: %v", err)
	}
	return n
}

func unregistered(t *testing.T, d *datapath.Datapath) uint64 {
	t.Helper()
	got, err := bpfmaps.NewStats(&d.Maps).Read()
	if err != nil {
		t.Fatal(err)
	}
	return got["drop_unregistered"].Packets
}

// Other tc users keep their filters and their qdisc: detach removes ours
// only, and a foreign filter where ours would go is refused, not replaced.
func TestTCDetachLeavesForeignFilters(t *testing.T) {
	d, other := mustTC(t), mustTC(t)
	log := datapathtest.Logger(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		// Someone else's filters on both hooks of our clsact.
		for _, args := range [][]string{
			{"filter", "add", "dev", "dummy0", "ingress", "prio", "7", "protocol", "all", "u32", "match", "u32", "0", "0", "classid", "1:1"},
			{"filter", "add", "dev", "dummy0", "egress", "prio", "7", "protocol", "all", "u32", "match", "u32", "0", "0", "classid", "1:1"},
		} {
			if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
				t.Fatalf("tc %v: %v\n%s", args, err, out)
			}
		}
		if err := d.Detach(datapath.FromPod, "dummy0"); err != nil {
			return err
		}
		out, _ := exec.Command("tc", "filter", "show", "dev", "dummy0", "ingress").CombinedOutput()
		if strings.Contains(string(out), "patchcord") || !strings.Contains(string(out), "pref 7 u32") {
			t.Errorf("ingress filters after detach:\n%s\nwant the foreign u32 only", out)
		}
		if q := slotQdisc(t, "dummy0"); q != "clsact" {
			t.Errorf("qdisc after detach: %q, want the clsact the foreign filters use", q)
		}
		// A foreign bpf filter at our priority and handle.
		l, _ := netlink.LinkByName("dummy0")
		p, _ := other.Program(datapath.FromPod)
		err := netlink.FilterAdd(&netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: l.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1, Priority: 2, Protocol: unix.ETH_P_ALL},
			Fd:          p.FD(), Name: "someone-else", DirectAction: true,
		})
		if err != nil {
			t.Fatalf("add a foreign bpf filter: %v", err)
		}
		err = d.Attach(datapath.FromPod, "dummy0", log)
		if err == nil || !strings.Contains(err.Error(), "not patchcord's") {
			t.Errorf("attach over a foreign filter at priority 2 handle 1: %v, want a refusal naming it", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// kernelHasTCX says, from the release uname reports, whether the kernel is
// 6.6 or later: what the datapath's own probe must agree with.
func kernelHasTCX(t *testing.T) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", u.Release, err)
	}
	return major > 6 || major == 6 && minor >= 6
}

// The mode is the node's: auto keeps the recorded one, a conflicting
// explicit mode is refused with what to do, and auto picks tcx on 6.6 and
// later, tc before.
func TestAttachModeRecorded(t *testing.T) {
	log := datapathtest.Logger(t)
	d := mustTC(t)
	if m, err := d.SetAttachMode(datapath.AttachAuto, log); err != nil || m != datapath.AttachTC {
		t.Errorf("auto over a tc node: %q, %v; want tc", m, err)
	}
	_, err := d.SetAttachMode(datapath.AttachTCX, log)
	if !errors.Is(err, datapath.ErrAttachModeConflict) || !strings.Contains(err.Error(), "--attach-mode") {
		t.Errorf("tcx over a tc node: %v; want ErrAttachModeConflict saying how to switch", err)
	}
	fresh := datapathtest.MustOpen(t)
	if m, err := fresh.AttachMode(); err != nil || m != "" {
		t.Errorf("fresh node: mode %q, %v; want none recorded", m, err)
	}
	want, other := datapath.AttachTCX, datapath.AttachTC
	if !kernelHasTCX(t) {
		want, other = other, want
	}
	if m, err := fresh.SetAttachMode(datapath.AttachAuto, log); err != nil || m != want {
		t.Errorf("auto on this kernel: %q, %v; want %s", m, err, want)
	}
	if _, err := fresh.SetAttachMode(other, log); err == nil {
		t.Errorf("%s over a %s node: no error", other, want)
	}
	for _, s := range []string{"", "auto", "TCX", "tc"} {
		if _, err := datapath.ParseAttachMode(s); err != nil {
			t.Errorf("ParseAttachMode(%q): %v", s, err)
		}
	}
	if _, err := datapath.ParseAttachMode("xdp"); err == nil {
		t.Error("ParseAttachMode(xdp): no error")
	}
}

// --migrate-attach-mode moves a node between backends, each interface
// attached anew before its old attachment goes, and records the new mode.
func TestMigrateAttachMode(t *testing.T) {
	if !kernelHasTCX(t) {
		t.Skip("needs tcx (kernel 6.6) for the tcx side of the migration")
	}
	log := datapathtest.Logger(t)
	d := datapathtest.MustOpen(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		for _, to := range []datapath.AttachMode{datapath.AttachTC, datapath.AttachTCX} {
			if m, err := d.MigrateAttachMode(to, log); err != nil || m != to {
				t.Fatalf("migrate to %s: %q, %v", to, m, err)
			}
			if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
				t.Errorf("after migrating to %s: %v", to, err)
			}
			filters := len(bpfFilters(t, "dummy0", netlink.HANDLE_MIN_INGRESS))
			if atts, _ := d.Attachments(); len(atts) != 1 || atts[0].Mode != to || (to == datapath.AttachTC) != (filters == 1) {
				t.Errorf("after migrating to %s: attachments %+v, %d tc filters", to, atts, filters)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
