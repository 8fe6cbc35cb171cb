package agent

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
)

// inNewNS runs fn in a fresh network namespace, removed with the test.
func inNewNS(t *testing.T, fn func() error) {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	if err := netns.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatal(err)
	}
}

// groDevice returns GRODevice as a vxlan link, or nil if there is none.
func groDevice(t *testing.T) *netlink.Vxlan {
	t.Helper()
	link, err := netlink.LinkByName(GRODevice)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		t.Fatalf("%s is a %s", GRODevice, link.Type())
	}
	return vx
}

// wantQuiet checks that the device is up, external, on port, and neither
// answers ARP nor forwards.
func wantQuiet(t *testing.T, port int) *netlink.Vxlan {
	t.Helper()
	vx := groDevice(t)
	switch {
	case vx == nil:
		t.Fatalf("no %s", GRODevice)
	case !vx.FlowBased || vx.Port != port:
		t.Fatalf("%s: external %v, port %d; want external on %d", GRODevice, vx.FlowBased, vx.Port, port)
	case vx.Flags&net.FlagUp == 0 || vx.RawFlags&syscall.IFF_NOARP == 0:
		t.Fatalf("%s: flags %v (raw %#x), want up and noarp", GRODevice, vx.Flags, vx.RawFlags)
	}
	for _, s := range groSysctls {
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + GRODevice + "/" + s.key)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != s.value {
			t.Errorf("%s %s=%s, want %s", GRODevice, s.key, got, s.value)
		}
	}
	return vx
}

func TestGRODevice(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	t.Run("kept, repaired, replaced, removed", func(t *testing.T) {
		inNewNS(t, func() error {
			ensureGRODevice(4789, false, log)
			first := wantQuiet(t, 4789)
			// A later agent reuses it and sets back what was changed by hand.
			if err := netlink.LinkSetDown(first); err != nil {
				return err
			}
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+GRODevice+"/forwarding", []byte("1"), 0o644); err != nil {
				return err
			}
			ensureGRODevice(4789, false, log)
			if again := wantQuiet(t, 4789); again.Index != first.Index {
				t.Errorf("restart replaced %s (ifindex %d -> %d)", GRODevice, first.Index, again.Index)
			}
			ensureGRODevice(8472, false, log)
			wantQuiet(t, 8472)
			ensureGRODevice(8472, true, log)
			if groDevice(t) != nil {
				t.Errorf("%s still there with --vxlan-gro=false", GRODevice)
			}
			return nil
		})
	})
	t.Run("port held by flannel.1", func(t *testing.T) {
		inNewNS(t, func() error {
			fl := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "flannel.1"}, VxlanId: 1, Port: 8472}
			if err := netlink.LinkAdd(fl); err != nil {
				return err
			}
			if err := netlink.LinkSetUp(fl); err != nil {
				return err
			}
			if err := setupGRODevice(8472); !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("setup with 8472 taken: %v, want EADDRINUSE", err)
			}
			var buf bytes.Buffer
			ensureGRODevice(8472, false, slog.New(slog.NewTextHandler(&buf, nil)))
			if out := buf.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "owner=flannel.1") {
				t.Errorf("log: %q, want a warning naming flannel.1", out)
			}
			if groDevice(t) != nil {
				t.Errorf("%s left behind without the port", GRODevice)
			}
			return nil
		})
	})
	t.Run("a link of another kind is left alone", func(t *testing.T) {
		inNewNS(t, func() error {
			if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: GRODevice}}); err != nil {
				return err
			}
			if err := setupGRODevice(4789); err == nil || !strings.Contains(err.Error(), "left alone") {
				t.Errorf("setup over a bridge %s: %v", GRODevice, err)
			}
			ensureGRODevice(4789, true, log)
			if _, err := netlink.LinkByName(GRODevice); err != nil {
				t.Errorf("--vxlan-gro=false removed a link not ours: %v", err)
			}
			return nil
		})
	})
}
