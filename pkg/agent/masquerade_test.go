package agent

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/nodes"
)

func TestMasqRules(t *testing.T) {
	set := []nodes.Node{node2, node1, node3}
	got := masqRules(node1.PodCIDR, netip.Prefix{}, set)
	want := `*nat
:PATCHCORD-MASQ - [0:0]
-A PATCHCORD-MASQ ! -s 10.244.1.0/24 -j RETURN
-A PATCHCORD-MASQ -d 10.244.1.0/24 -j RETURN
-A PATCHCORD-MASQ -d 10.244.2.0/24 -j RETURN
-A PATCHCORD-MASQ -d 10.244.3.0/24 -j RETURN
-A PATCHCORD-MASQ -d 198.18.0.1/32 -j RETURN
-A PATCHCORD-MASQ -d 198.18.0.2/32 -j RETURN
-A PATCHCORD-MASQ -d 198.18.0.3/32 -j RETURN
-A PATCHCORD-MASQ -m addrtype --dst-type LOCAL -j RETURN
-A PATCHCORD-MASQ -j MASQUERADE --random-fully
COMMIT
`
	if got != want {
		t.Errorf("rules without --cluster-cidr:\n%s\nwant\n%s", got, want)
	}
	got = masqRules(node1.PodCIDR, netip.MustParsePrefix("10.244.0.0/16"), set)
	if !strings.Contains(got, "-d 10.244.0.0/16 -j RETURN") || strings.Contains(got, "-d 10.244.2.0/24") {
		t.Errorf("rules with --cluster-cidr 10.244.0.0/16:\n%s", got)
	}
}

// The chain is installed, kept once across syncs, and removed again, all in
// the node's namespace.
func TestMasqueradeInstallRemove(t *testing.T) {
	netns := mustNodeNS(t)
	a := &Agent{cfg: Config{PodCIDR: node1.PodCIDR, Masquerade: true}}
	err := netns.Do(func(ns.NetNS) error {
		for range 2 {
			if err := a.syncMasquerade([]nodes.Node{node1, node2}); err != nil {
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
		if err := removeMasquerade(); err != nil {
			return err
		}
		if rules := iptablesSave(t); strings.Contains(rules, "PATCHCORD") {
			t.Errorf("left after removal:\n%s", rules)
		}
		return removeMasquerade()
	})
	if err != nil {
		t.Fatal(err)
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
