package datapath_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/vishvananda/netlink"
)

// mustDummyNS returns a fresh network namespace holding a veth "dummy0"
// (its peer stays in the same namespace), standing in for a pod's host veth.
// This kernel has no dummy driver.
func mustDummyNS(tb testing.TB) ns.NetNS {
	tb.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		tb.Fatalf("create netns: %v", err)
	}
	tb.Cleanup(func() {
		netns.Close()
		testutils.UnmountNS(netns)
	})
	err = netns.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "dummy0"}, PeerName: "dummy0p"})
	})
	if err != nil {
		tb.Fatalf("add dummy0: %v", err)
	}
	return netns
}

// recreateDummy deletes dummy0 and makes a new one of that name, as a pod
// restarted in place does to its host veth.
func recreateDummy() error {
	l, err := netlink.LinkByName("dummy0")
	if err == nil {
		err = netlink.LinkDel(l)
	}
	if err != nil {
		return err
	}
	return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "dummy0"}, PeerName: "dummy0p"})
}

func TestAttachIdempotentAndDetach(t *testing.T) {
	d := datapathtest.MustOpen(t)
	netns := mustDummyNS(t)
	err := netns.Do(func(ns.NetNS) error {
		for range 2 {
			if err := d.Attach(datapath.FromPod, "dummy0", datapathtest.Logger(t)); err != nil {
				return err
			}
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
			t.Errorf("after attach: %v", err)
		}
		atts, err := d.Attachments()
		if err != nil {
			return err
		}
		if len(atts) != 1 || atts[0].Stale || atts[0].Ifname != "dummy0" || atts[0].Direction != "ingress" {
			t.Errorf("attachments: got %+v, want one current ingress link on dummy0", atts)
		}
		for range 2 {
			if err := d.Detach(datapath.FromPod, "dummy0"); err != nil {
				return err
			}
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err == nil {
			t.Error("still attached after detach")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.Root, "links", datapath.FromPod, "dummy0")); !os.IsNotExist(err) {
		t.Errorf("link pin left after detach: %v", err)
	}
}

// An interface deleted and recreated under the same name leaves a dead link
// pin behind; attaching again must replace it rather than trust it.
func TestAttachReplacesStaleLink(t *testing.T) {
	d := datapathtest.MustOpen(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		if err := recreateDummy(); err != nil {
			return err
		}
		if err := d.Attached(datapath.FromPod, "dummy0"); err == nil {
			t.Error("Attached: a link of the deleted interface passes as current")
		}
		if err := d.Attach(datapath.FromPod, "dummy0", datapathtest.Logger(t)); err != nil {
			return err
		}
		return d.Attached(datapath.FromPod, "dummy0")
	})
	if err != nil {
		t.Fatal(err)
	}
}

// An upgrade (a binary whose program differs from the pinned one) must move
// every existing attachment to the new code in place: same link, new
// program, no moment without a program on the interface.
func TestOpenUpgradesLinksInPlace(t *testing.T) {
	requireFeature(t, datapath.FeatureTCX) // it checks tcx links
	d := datapathtest.MustOpen(t)
	root, netns := d.Root, mustAttachDummy(t, d)

	// Stand in for an older release: other code running on the link and
	// pinned as from_pod.
	l := mustOldCode(t, d)
	old, err := d.Program(datapath.FromUplink)
	if err != nil {
		t.Fatal(err)
	}
	progPin := filepath.Join(root, "progs", datapath.FromPod)
	if err := os.Remove(progPin); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(progPin); err != nil {
		t.Fatal(err)
	}
	before := linkInfo(t, l)

	// An older release also left its own build marker.
	upgraded := mustOpenUnmarked(t, root)
	after := linkInfo(t, l)
	if after.ID != before.ID {
		t.Errorf("link was replaced (id %d -> %d), want it updated in place", before.ID, after.ID)
	}
	want := progID(t, upgraded, datapath.FromPod)
	if uint32(after.Program) != want || uint32(before.Program) == want {
		t.Errorf("link runs program %d (was %d), want the new from_pod %d", after.Program, before.Program, want)
	}
	if err := netns.Do(func(ns.NetNS) error { return upgraded.Attached(datapath.FromPod, "dummy0") }); err != nil {
		t.Errorf("after upgrade: %v", err)
	}
}

func linkInfo(t *testing.T, l link.Link) *link.Info {
	t.Helper()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// mustOldCode makes the pinned from_pod link on dummy0 run other code, as a
// load killed between pinning a new program and moving the links leaves it.
func mustOldCode(t *testing.T, d *datapath.Datapath) link.Link {
	t.Helper()
	old, err := d.Program(datapath.FromUplink)
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.LoadPinnedLink(filepath.Join(d.Root, "links", datapath.FromPod, "dummy0"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if err := l.Update(old); err != nil {
		t.Fatal(err)
	}
	return l
}

// A link on the right interface that runs older code is updated in place:
// same link, so no moment without a program on the veth.
func TestAttachUpdatesStaleProgram(t *testing.T) {
	requireFeature(t, datapath.FeatureTCX) // it checks tcx links
	d := datapathtest.MustOpen(t)
	log := datapathtest.Logger(t)
	netns := mustAttachDummy(t, d)
	err := netns.Do(func(ns.NetNS) error {
		l := mustOldCode(t, d)
		before := linkInfo(t, l)
		if d.Attached(datapath.FromPod, "dummy0") == nil {
			t.Fatal("Attached: a link on other code passes as current")
		}
		if err := d.Attach(datapath.FromPod, "dummy0", log); err != nil {
			return err
		}
		after := linkInfo(t, l)
		if after.ID != before.ID {
			t.Errorf("link replaced (id %d -> %d), want it updated in place", before.ID, after.ID)
		}
		if want := progID(t, d, datapath.FromPod); uint32(after.Program) != want {
			t.Errorf("link runs program %d, want from_pod %d", after.Program, want)
		}
		return d.Attached(datapath.FromPod, "dummy0")
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Open heals links a killed load left on older code: with this build's
// marker in place (nothing to load) and without it (programs reused).
func TestOpenHealsLinksOnOldCode(t *testing.T) {
	requireFeature(t, datapath.FeatureTCX) // it checks tcx links
	// A load killed between pinning new programs and moving the links
	// leaves no build marker (it is written last): the next Open reuses
	// the pinned programs by tag and must move the links then.
	d := datapathtest.MustOpen(t)
	mustAttachDummy(t, d)
	root := d.Root
	l := mustOldCode(t, d)
	before := linkInfo(t, l)
	again := mustOpenUnmarked(t, root)
	after := linkInfo(t, l)
	if want := progID(t, again, datapath.FromPod); uint32(after.Program) != want || after.ID != before.ID {
		t.Errorf("link %d runs program %d, want link %d on from_pod %d", after.ID, after.Program, before.ID, want)
	}
}

// mustOpenUnmarked removes the build marker of the datapath at root, as an
// older release or a killed load leaves it, and opens the datapath there again.
func mustOpenUnmarked(t *testing.T, root string) *datapath.Datapath {
	t.Helper()
	if err := os.RemoveAll(filepath.Join(root, "build")); err != nil {
		t.Fatal(err)
	}
	d, err := datapath.Open(root, datapathtest.Logger(t))
	if err != nil {
		t.Fatalf("open without a build marker: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// mustAttachDummy attaches d's from_pod to dummy0 in a fresh namespace.
func mustAttachDummy(t *testing.T, d *datapath.Datapath) ns.NetNS {
	t.Helper()
	netns := mustDummyNS(t)
	if err := netns.Do(func(ns.NetNS) error { return d.Attach(datapath.FromPod, "dummy0", datapathtest.Logger(t)) }); err != nil {
		t.Fatal(err)
	}
	return netns
}

// programsOn counts the programs the kernel runs at dummy0's ingress: tcx
// links, or cls_bpf filters in tc mode.
func programsOn(t *testing.T, mode datapath.AttachMode) int {
	t.Helper()
	if mode == datapath.AttachTC {
		return len(bpfFilters(t, "dummy0", netlink.HANDLE_MIN_INGRESS))
	}
	l, err := netlink.LinkByName("dummy0")
	if err != nil {
		t.Fatal(err)
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// A staged attachment runs at once but is nobody's to see until Commit:
// not listed, not Attached, so the agent's reconcile cannot take it for an
// orphan. Abort takes it off; Commit records it, after which Abort is a
// no-op (ADD defers it).
func TestStagedAttach(t *testing.T) {
	for _, mode := range []datapath.AttachMode{datapath.AttachTCX, datapath.AttachTC} {
		t.Run(string(mode), func(t *testing.T) {
			d := datapathtest.MustOpen(t)
			if m, err := d.SetAttachMode(mode, datapathtest.Logger(t)); err != nil || m != mode {
				t.Fatalf("set attach mode %s: got %q, %v", mode, m, err)
			}
			netns := mustDummyNS(t)
			err := netns.Do(func(ns.NetNS) error {
				s, err := d.Stage(datapath.FromPod, "dummy0", datapathtest.Logger(t))
				if err != nil {
					return err
				}
				if n := programsOn(t, mode); n != 1 {
					t.Errorf("staged: %d programs on dummy0, want 1", n)
				}
				if atts, err := d.Attachments(); err != nil || len(atts) != 0 {
					t.Errorf("staged: attachments %+v (%v), want none recorded", atts, err)
				}
				if d.Attached(datapath.FromPod, "dummy0") == nil {
					t.Error("staged: Attached before Commit")
				}
				s.Abort()
				if n := programsOn(t, mode); n != 0 {
					t.Errorf("aborted: %d programs on dummy0, want 0", n)
				}

				if s, err = d.Stage(datapath.FromPod, "dummy0", datapathtest.Logger(t)); err != nil {
					return err
				}
				if err := s.Commit(); err != nil {
					return err
				}
				s.Abort()
				if err := d.Attached(datapath.FromPod, "dummy0"); err != nil {
					t.Errorf("committed: %v", err)
				}
				if n := programsOn(t, mode); n != 1 {
					t.Errorf("committed, then Abort: %d programs on dummy0, want 1", n)
				}
				return d.Detach(datapath.FromPod, "dummy0")
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
