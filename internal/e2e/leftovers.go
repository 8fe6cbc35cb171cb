// What a node holds of pods after they are gone: the leftovers a DEL or GC
// must remove.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/agent"
)

// Leftovers lists what the node holds of pods other than keep (by address): links
// other than lo, eth0, the bridge and keep's veths; routes into the pod CIDR other than
// keep's and the bridge's; entries in each endpoint map; pinned from_pod links; address
// leases of network; portmap chains.
func Leftovers(t *testing.T, ctx context.Context, n *lab.Node, network, bridge string, keep ...netip.Addr) []string {
	t.Helper()
	k := kept{ip: map[string]bool{}, veth: map[string]bool{}, n: len(keep)}
	eps := Endpoints(t, ctx, n)
	for _, ip := range keep {
		k.ip[ip.String()] = true
		if ep, ok := eps[ip.String()]; ok {
			k.veth[ep.Ifname] = true
		}
	}
	left := leftLinks(t, ctx, n, k, bridge)
	left = append(left, leftRoutes(t, ctx, n, k, bridge)...)
	left = append(left, leftMapEntries(t, ctx, n, k)...)
	left = append(left, leftPins(t, ctx, n, k)...)
	left = append(left, leftLeases(t, ctx, n, k, network)...)
	return append(left, leftPortmaps(t, ctx, n, k)...)
}

// kept is what of a node's pods is to stay: their addresses and host veths,
// and how many they are.
type kept struct {
	ip, veth map[string]bool
	n        int
}

// leftLinks lists links other than lo, eth0, bridge, the agent's GRO device
// (the node's, not a pod's) and the kept veths.
func leftLinks(t *testing.T, ctx context.Context, n *lab.Node, k kept, bridge string) []string {
	t.Helper()
	type link struct {
		Ifname string `json:"ifname"`
	}
	return leftInIP(t, ctx, n, func(l link) string {
		if l.Ifname == "lo" || l.Ifname == "eth0" || l.Ifname == agent.GRODevice || (bridge != "" && l.Ifname == bridge) || k.veth[l.Ifname] {
			return ""
		}
		return "link " + l.Ifname
	}, "link", "show")
}

// leftRoutes lists routes into the pod CIDR but the bridge's and the kept veths'.
func leftRoutes(t *testing.T, ctx context.Context, n *lab.Node, k kept, bridge string) []string {
	t.Helper()
	type route struct {
		Dst   string `json:"dst"`
		Dev   string `json:"dev"`
		Table string `json:"table"`
	}
	return leftInIP(t, ctx, n, func(r route) string {
		dst, err := netip.ParsePrefix(r.Dst)
		if err != nil {
			a, aerr := netip.ParseAddr(r.Dst)
			if aerr != nil {
				return "" // "default"
			}
			dst = netip.PrefixFrom(a, 32)
		}
		if !n.PodCIDR.Overlaps(dst) || (bridge != "" && r.Dev == bridge) || k.veth[r.Dev] {
			return ""
		}
		return fmt.Sprintf("route %s dev %s table %s", r.Dst, r.Dev, r.Table)
	}, "-4", "route", "show", "table", "all")
}

// leftInIP decodes what `ip -j args...` lists on the node as rows of T and returns
// what left says of each: the row as a leftover, or "" for one that may stay.
func leftInIP[T any](t *testing.T, ctx context.Context, n *lab.Node, left func(T) string, args ...string) []string {
	t.Helper()
	var rows []T
	IPJSON(t, ctx, n, &rows, args...)
	var found []string
	for _, r := range rows {
		if l := left(r); l != "" {
			found = append(found, l)
		}
	}
	return found
}

// leftMapEntries lists endpoint maps holding more entries than pods are kept.
func leftMapEntries(t *testing.T, ctx context.Context, n *lab.Node, k kept) []string {
	t.Helper()
	var left []string
	// Every map, not just what `bpf endpoint list` shows: an ADD killed between its
	// writes leaves entries in some only.
	for _, name := range []string{"endpoints", "ep_by_ifindex", "ep_meta"} {
		keys, err := MapKeys(filepath.Join(n.BpffsRoot, "maps", name))
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) > k.n {
			shown := keys
			if len(shown) > 8 {
				shown = append(shown[:8:8], "...")
			}
			left = append(left, fmt.Sprintf("map %s: %d entries %v, want %d", name, len(keys), shown, k.n))
		}
	}
	return left
}

// leftPins lists pinned from_pod links of veths not kept.
func leftPins(t *testing.T, ctx context.Context, n *lab.Node, k kept) []string {
	t.Helper()
	var left []string
	pinDir := filepath.Join(n.BpffsRoot, "links", "from_pod")
	pins, err := os.ReadDir(pinDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range pins {
		if !k.veth[e.Name()] {
			left = append(left, "pinned link "+filepath.Join(pinDir, e.Name()))
		}
	}
	return left
}

// leftLeases lists host-local leases of network for addresses not kept.
func leftLeases(t *testing.T, ctx context.Context, n *lab.Node, k kept, network string) []string {
	t.Helper()
	var left []string
	leaseDir := filepath.Join(n.IPAMDir, network)
	leases, err := os.ReadDir(leaseDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range leases {
		if a, err := netip.ParseAddr(e.Name()); err == nil && !k.ip[a.String()] {
			left = append(left, "lease "+filepath.Join(leaseDir, e.Name()))
		}
	}
	return left
}

// leftPortmaps lists portmap's per-pod chains.
func leftPortmaps(t *testing.T, ctx context.Context, n *lab.Node, k kept) []string {
	t.Helper()
	var left []string
	out, err := n.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, ":CNI-DN-") {
			left = append(left, "portmap chain "+strings.Fields(line)[0][1:])
		}
	}
	return left
}

// MapKeys lists the keys of a pinned map; 4-byte keys (the maps keyed by IPv4) are shown
// as addresses.
func MapKeys(pin string) ([]string, error) {
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open map %s: %w", pin, err)
	}
	defer m.Close()
	var keys []string
	var prev any // nil: the first key
	for {
		k, err := m.NextKeyBytes(prev)
		if err != nil {
			return nil, fmt.Errorf("iterate map %s: %w", pin, err)
		}
		if k == nil {
			break
		}
		if len(k) == 4 && !strings.HasSuffix(pin, "ep_by_ifindex") {
			keys = append(keys, netip.AddrFrom4([4]byte(k)).String())
		} else {
			keys = append(keys, fmt.Sprintf("%x", k))
		}
		prev = k
	}
	slices.Sort(keys)
	return keys, nil
}

// AssertClean fails the test for everything Leftovers finds.
func AssertClean(t *testing.T, ctx context.Context, n *lab.Node, network, bridge string, keep ...netip.Addr) {
	t.Helper()
	for _, l := range Leftovers(t, ctx, n, network, bridge, keep...) {
		t.Errorf("node %d: %s left behind", n.Index, l)
	}
}
