package agent

import (
	"bytes"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"

	"github.com/patchcord/patchcord/pkg/nodes"
)

// masqChain is the nat chain the agent owns. It is rewritten whole with
// iptables-restore --noflush, so no packet ever sees half a rule set, and no
// other chain is touched but for one jump from POSTROUTING.
const masqChain = "PATCHCORD-MASQ"

var masqJump = []string{"-m", "comment", "--comment", "patchcord: masquerade pods leaving the cluster", "-j", masqChain}

// jump runs op (-C, -A, -D) on the POSTROUTING jump to the chain.
func jump(op string) error {
	return iptables(append([]string{"-t", "nat", op, "POSTROUTING"}, masqJump...)...)
}

// masqRules is the chain's content: traffic from this node's pods to
// anything but pods and nodes leaves with the node's address. Pod and node
// traffic is never translated: the fast path and network policies need the
// pod's own address.
func masqRules(podCIDR netip.Prefix, clusterCIDR netip.Prefix, set []nodes.Node) string {
	var b strings.Builder
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n", masqChain)
	rule := func(format string, args ...any) {
		fmt.Fprintf(&b, "-A %s "+format+"\n", append([]any{masqChain}, args...)...)
	}
	rule("! -s %s -j RETURN", podCIDR)
	// Without a --cluster-cidr, the cluster is every pod CIDR we know.
	cidrs := []netip.Prefix{podCIDR}
	if clusterCIDR.IsValid() {
		cidrs = []netip.Prefix{clusterCIDR}
	}
	var nodeIPs []netip.Addr
	for _, n := range set {
		if !clusterCIDR.IsValid() {
			cidrs = append(cidrs, n.PodCIDR)
		}
		nodeIPs = append(nodeIPs, n.NodeIP)
	}
	slices.SortFunc(cidrs, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	slices.SortFunc(nodeIPs, netip.Addr.Compare)
	for _, c := range slices.Compact(cidrs) {
		rule("-d %s -j RETURN", c)
	}
	for _, ip := range slices.Compact(nodeIPs) {
		rule("-d %s/32 -j RETURN", ip)
	}
	rule("-m addrtype --dst-type LOCAL -j RETURN")
	rule("-j MASQUERADE --random-fully")
	b.WriteString("COMMIT\n")
	return b.String()
}

// syncMasquerade installs or refreshes the chain and its jump.
func (a *Agent) syncMasquerade(set []nodes.Node) error {
	rules := masqRules(a.cfg.PodCIDR, a.cfg.ClusterCIDR, set)
	cmd := exec.Command("iptables-restore", "--noflush", "-w")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("write masquerade chain %s: %w: %s", masqChain, err, bytes.TrimSpace(out))
	}
	if jump("-C") != nil {
		if err := jump("-A"); err != nil {
			return fmt.Errorf("add jump to %s: %w", masqChain, err)
		}
	}
	return nil
}

// removeMasquerade undoes syncMasquerade; absent rules are fine.
func removeMasquerade() error {
	for jump("-D") == nil {
	}
	if iptables("-t", "nat", "-n", "-L", masqChain) != nil {
		return nil
	}
	if err := iptables("-t", "nat", "-F", masqChain); err != nil {
		return fmt.Errorf("flush %s: %w", masqChain, err)
	}
	if err := iptables("-t", "nat", "-X", masqChain); err != nil {
		return fmt.Errorf("delete %s: %w", masqChain, err)
	}
	return nil
}

func iptables(args ...string) error {
	// -w: kube-proxy and others hold the xtables lock at times.
	out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
