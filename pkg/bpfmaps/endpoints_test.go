// Tests of the endpoint maps' write ordering and ownership: a delete of a
// pod that is gone must never remove a newer pod that reused its address.
package bpfmaps_test

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

var podIP = netip.MustParseAddr("10.244.1.7")

func endpoint(ifindex int, container string) bpfmaps.EndpointInfo {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, byte(ifindex)}
	return bpfmaps.EndpointInfo{IP: podIP, Ifindex: ifindex, Ifname: "pc" + container, MAC: mac, HostMAC: mac,
		Container: container, PodIfname: "eth0", Network: "pcnet"}
}

func mustPut(tb testing.TB, eps *bpfmaps.Endpoints, ep bpfmaps.EndpointInfo) {
	tb.Helper()
	if err := eps.Put(ep); err != nil {
		tb.Fatalf("put %s on ifindex %d: %v", ep.IP, ep.Ifindex, err)
	}
}

// byIfindex returns the address the anti-spoofing entry of ifindex is for.
func byIfindex(tb testing.TB, d *datapath.Datapath, ifindex int) (uint32, bool) {
	tb.Helper()
	var v datapath.Endpoint
	if err := d.Maps.EpByIfindex.Lookup(uint32(ifindex), &v); err != nil {
		return 0, false
	}
	return v.Ip, true
}

func TestDeleteIfOwned(t *testing.T) {
	for _, tt := range []struct {
		name     string
		delIndex int
		wantKept bool // the newer pod on ifindex 12 survives
		want11   bool // the old veth's anti-spoofing entry is left
		want12   bool
	}{
		{"delete of the old pod keeps the newer one", 11, true, false, true},
		// The old veth's entry waits for the old pod's own delete.
		{"delete of the current pod removes it", 12, false, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := datapathtest.MustOpen(t)
			eps := bpfmaps.NewEndpoints(&d.Maps)
			mustPut(t, eps, endpoint(11, "old"))
			mustPut(t, eps, endpoint(12, "new")) // IPAM reused the address
			if err := eps.DeleteIfOwned(podIP, tt.delIndex); err != nil {
				t.Fatalf("DeleteIfOwned(%s, %d): %v", podIP, tt.delIndex, err)
			}
			ep, err := eps.Get(podIP)
			switch {
			case tt.wantKept && (err != nil || ep.Ifindex != 12 || ep.Container != "new"):
				t.Errorf("newer pod: got %+v, %v; want it on ifindex 12, owned by new", ep, err)
			case !tt.wantKept && !errors.Is(err, bpfmaps.ErrNotFound):
				t.Errorf("deleted pod: got %+v, %v; want not found", ep, err)
			}
			if _, ok := byIfindex(t, d, 11); ok != tt.want11 {
				t.Errorf("anti-spoofing entry of ifindex 11 present=%v, want %v", ok, tt.want11)
			}
			if _, ok := byIfindex(t, d, 12); ok != tt.want12 {
				t.Errorf("anti-spoofing entry of ifindex 12 present=%v, want %v", ok, tt.want12)
			}
			if o, err := eps.FindOwner("new", "eth0"); (err == nil) != tt.wantKept {
				t.Errorf("owner of the newer pod: %+v, %v", o, err)
			}
		})
	}
}

// A delete of a pod never registered, or registered twice, changes nothing.
func TestDeleteIfOwnedIdempotent(t *testing.T) {
	d := datapathtest.MustOpen(t)
	eps := bpfmaps.NewEndpoints(&d.Maps)
	for range 2 {
		if err := eps.DeleteIfOwned(podIP, 11); err != nil {
			t.Fatalf("delete of a missing endpoint: %v", err)
		}
	}
	mustPut(t, eps, endpoint(11, "a"))
	mustPut(t, eps, endpoint(11, "a"))
	for range 2 {
		if err := eps.DeleteIfOwned(podIP, 11); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := eps.Get(podIP); !errors.Is(err, bpfmaps.ErrNotFound) {
		t.Errorf("after delete: %v, want not found", err)
	}
	if owners, err := eps.Owners(); err != nil || len(owners) != 0 {
		t.Errorf("owners after delete: %+v, %v", owners, err)
	}
}

// An ADD killed between its writes leaves an owner and an anti-spoofing
// entry without a forwarding entry: whoever deletes it next removes both.
func TestDeleteIfOwnedHalfWritten(t *testing.T) {
	d := datapathtest.MustOpen(t)
	eps := bpfmaps.NewEndpoints(&d.Maps)
	mustPut(t, eps, endpoint(11, "a"))
	if err := d.Maps.Endpoints.Delete(ipKey(podIP)); err != nil {
		t.Fatal(err)
	}
	if err := eps.DeleteIfOwned(podIP, 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := byIfindex(t, d, 11); ok {
		t.Error("anti-spoofing entry of the half-written endpoint is left")
	}
	if _, err := eps.FindOwner("a", "eth0"); !errors.Is(err, bpfmaps.ErrNotFound) {
		t.Errorf("owner of the half-written endpoint: %v, want not found", err)
	}
}

// A Put whose second write fails (the anti-spoofing map is full) undoes the
// first: no owner is left for an endpoint that never forwarded.
func TestPutRollsBack(t *testing.T) {
	d := datapathtest.MustOpen(t)
	eps := bpfmaps.NewEndpoints(&d.Maps)
	max := int(d.Maps.EpByIfindex.MaxEntries())
	keys, vals := make([]uint32, max), make([]datapath.Endpoint, max)
	for i := range keys {
		keys[i] = uint32(1000 + i)
	}
	if _, err := d.Maps.EpByIfindex.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill ep_by_ifindex: %v", err)
	}
	err := eps.Put(endpoint(11, "a"))
	if !errors.Is(err, bpfmaps.ErrFull) {
		t.Fatalf("put into a full map: %v, want ErrFull", err)
	}
	if _, err := eps.Get(podIP); !errors.Is(err, bpfmaps.ErrNotFound) {
		t.Errorf("forwarding entry after a failed put: %v, want not found", err)
	}
	if owners, err := eps.Owners(); err != nil || len(owners) != 0 {
		t.Errorf("owners after a failed put: %+v, %v; want none", owners, err)
	}
}

func ipKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}
