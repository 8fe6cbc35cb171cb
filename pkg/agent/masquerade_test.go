package agent

import (
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
)

func TestMasqRules(t *testing.T) {
	got := masqRules(node1.PodCIDR, netip.Prefix{})
	want := `*nat
:PATCHCORD-MASQ - [0:0]
-A PATCHCORD-MASQ ! -s 10.244.1.0/24 -j RETURN
-A PATCHCORD-MASQ -m set --match-set PATCHCORD-PODS dst -j RETURN
-A PATCHCORD-MASQ -m set --match-set PATCHCORD-NODES dst -j RETURN
-A PATCHCORD-MASQ -m addrtype --dst-type LOCAL -j RETURN
-A PATCHCORD-MASQ -j MASQUERADE --random-fully
COMMIT
`
	if got != want {
		t.Errorf("rules without --cluster-cidr:\n%s\nwant\n%s", got, want)
	}
	got = masqRules(node1.PodCIDR, netip.MustParsePrefix("10.244.0.0/16"))
	if !strings.Contains(got, "-d 10.244.0.0/16 -j RETURN") || strings.Contains(got, masqPodsSet) {
		t.Errorf("rules with --cluster-cidr 10.244.0.0/16:\n%s", got)
	}
}

// The chain is installed, kept once across syncs, its sets follow the
// nodes one member at a time, and all of it is removed again, in the
// node's namespace.
func TestMasqueradeInstallRemove(t *testing.T) {
	netns := mustNodeNS(t)
	a := &Agent{cfg: Config{PodCIDR: node1.PodCIDR, Masquerade: true}}
	err := netns.Do(func(ns.NetNS) error {
		for _, full := range []bool{true, true, false} {
			if err := a.syncMasquerade([]nodes.Node{node1, node2}, full); err != nil {
				return err
			}
		}
		rules := iptablesSave(t)
		if n := strings.Count(rules, "-j PATCHCORD-MASQ"); n != 1 {
			t.Errorf("jumps to the chain: %d, want 1:\n%s", n, rules)
		}
		if !strings.Contains(rules, "-A PATCHCORD-MASQ -j MASQUERADE --random-fully") {
			t.Errorf("no MASQUERADE rule:\n%s", rules)
		}
		wantMembers(t, masqNodesSet, "198.18.0.1/32", "198.18.0.2/32")
		wantMembers(t, masqPodsSet, "10.244.1.0/24", "10.244.2.0/24")

		// node2 leaves, node3 joins: an incremental sync, and a full one
		// by an agent that knows nothing yet (a restart) finds the same.
		if err := a.syncMasquerade([]nodes.Node{node1, node3}, false); err != nil {
			return err
		}
		wantMembers(t, masqNodesSet, "198.18.0.1/32", "198.18.0.3/32")
		wantMembers(t, masqPodsSet, "10.244.1.0/24", "10.244.3.0/24")
		restarted := &Agent{cfg: a.cfg}
		if err := restarted.syncMasquerade([]nodes.Node{node1, node2}, true); err != nil {
			return err
		}
		wantMembers(t, masqNodesSet, "198.18.0.1/32", "198.18.0.2/32")
		wantMembers(t, masqPodsSet, "10.244.1.0/24", "10.244.2.0/24")

		if err := removeMasquerade(); err != nil {
			return err
		}
		if rules := iptablesSave(t); strings.Contains(rules, "PATCHCORD") {
			t.Errorf("left after removal:\n%s", rules)
		}
		for _, set := range []string{masqNodesSet, masqPodsSet} {
			if _, err := netlink.IpsetList(set); err == nil {
				t.Errorf("ipset %s left after removal", set)
			}
		}
		return removeMasquerade()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// wantMembers checks an ipset's members, read from the kernel.
func wantMembers(t *testing.T, set string, want ...string) {
	t.Helper()
	have, err := setMembers(set)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for p := range have {
		got = append(got, p.String())
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("ipset %s: %v, want %v", set, got, want)
	}
}

func iptablesSave(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("iptables-save", "-t", "nat").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-save: %v\n%s", err, out)
	}
	return string(out)
}
