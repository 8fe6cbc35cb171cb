package cni_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
)

// GC names the valid attachments of one network: another network's pods on
// the same node are none of its business.
func TestGCLeavesOtherNetworks(t *testing.T) {
	n := newNode(t)
	otherOpts := func() []confOpt {
		ipam := n.ipam()
		ipam["ranges"] = [][]map[string]string{{{"subnet": "10.245.1.0/24"}}}
		return []confOpt{with("name", "other"), with("ipam", ipam)}
	}
	other := func(tb testing.TB) []byte { return n.conf(tb, "1.1.0", otherOpts()...) }
	otherPrev := func(raw []byte) []byte { return n.conf(t, "1.1.0", append(otherOpts(), withPrev(raw))...) }
	mine, theirs := newPod(t), newPod(t)
	resMine, _ := n.mustAdd(t, mine.args(n.conf(t, "1.1.0")))
	stMine := n.assertPodUp(t, mine, resMine, 1450)
	resTheirs, rawTheirs := n.mustAdd(t, theirs.args(other(t)))

	// Nothing of network pcnet is valid any more.
	if err := n.gc(n.conf(t, "1.1.0", with("cni.dev/valid-attachments", []map[string]string{}))); err != nil {
		t.Fatalf("GC: %v", err)
	}
	n.assertPodGone(t, mine, stMine)
	if err := n.check(theirs.args(otherPrev(rawTheirs))); err != nil {
		t.Errorf("CHECK of the other network's pod after GC: %v", err)
	}
	dp := n.openPinned(t)
	ip := resTheirs.IPs[0].Address.IP.String()
	if _, err := bpfmaps.NewEndpoints(&dp.Maps).Get(netip.MustParseAddr(ip)); err != nil {
		t.Errorf("other network's endpoint %s: %v", ip, err)
	}
}

// CRI container IDs are 64 hex digits: they must be stored whole, or DEL and
// GC never find the pod again. What does not fit is refused, not cut.
func TestContainerIDLength(t *testing.T) {
	n := newNode(t)
	p := newPod(t)
	p.id = strings.Repeat("c", 64)
	res, raw := n.mustAdd(t, p.args(n.conf(t, "1.1.0")))
	st := n.assertPodUp(t, p, res, 1450)
	if err := n.check(p.args(n.conf(t, "1.1.0", withPrev(raw)))); err != nil {
		t.Errorf("CHECK with a 64-character container ID: %v", err)
	}
	n.mustDel(t, p.args(n.conf(t, "1.1.0", withPrev(raw))))
	n.assertPodGone(t, p, st)

	long := newPod(t)
	long.id = strings.Repeat("d", 200)
	_, _, err := n.add(long.args(n.conf(t, "1.1.0")))
	assertCNIError(t, err, types.ErrInternal, "longer than 127 bytes")
	n.assertClean(t)
}
