// CollectStatus on a real (test) datapath and on none.
package views

import (
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

func TestStatusOfFreshDatapath(t *testing.T) {
	d := datapathtest.MustOpen(t)
	eps := bpfmaps.NewEndpoints(&d.Maps)
	for i, ip := range []string{"10.244.1.5", "10.244.1.6"} {
		mac := net.HardwareAddr{2, 0, 0x0a, 0xf4, 1, byte(5 + i)}
		ep := bpfmaps.EndpointInfo{IP: netip.MustParseAddr(ip), Ifindex: 1, MAC: mac, HostMAC: net.HardwareAddr{0xee, 0xee, 0, 0, 0, 1}}
		if err := eps.Put(ep); err != nil {
			t.Fatal(err)
		}
	}
	v := CollectStatus(d.Root)
	if !v.Loaded || !v.Healthy || v.Endpoints != 2 || v.Config == nil || v.Config.Configured || len(v.Programs) != len(datapath.Programs()) {
		t.Errorf("status: %+v", v)
	}
	for _, p := range v.Programs {
		if p.ID == 0 || len(p.Tag) != 16 || p.LoadedAt == nil || time.Since(*p.LoadedAt) > time.Minute {
			t.Errorf("program %+v", p)
		}
	}
	// The endpoints name no host veth, so no attachment is expected.
	if v.Attachments != (AttachmentCounts{}) {
		t.Errorf("attachments: %+v", v.Attachments)
	}
	if !slices.ContainsFunc(v.Warnings, func(w string) bool { return strings.Contains(w, "no agent has configured") }) {
		t.Errorf("warnings: %q", v.Warnings)
	}
}

func TestStatusNotLoaded(t *testing.T) {
	v := CollectStatus(filepath.Join(t.TempDir(), "patchcord"))
	if v.Loaded || v.Healthy || len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "is the agent or the CNI plugin installed?") {
		t.Errorf("status: %+v", v)
	}
}
