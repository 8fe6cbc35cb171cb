package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/patchcord/patchcord/pkg/nodes"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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

// The masquerade chain's exceptions live in two ipsets, so that a node
// joining or leaving is one set operation, and a pod's new connection is
// matched against them in constant time, not rule by rule: every node's
// address, and (without --cluster-cidr) every pod CIDR.
const (
	masqNodesSet = "PATCHCORD-NODES"
	masqPodsSet  = "PATCHCORD-PODS"
)

// masqSets caches what the sets hold, as the node sync's cache does; nil
// maps make the next sync read the kernel.
type masqSets struct {
	nodes map[netip.Prefix]bool // /32s
	pods  map[netip.Prefix]bool
}

// masqRules is the chain's content: traffic from this node's pods to
// anything but pods and nodes leaves with the node's address. Pod and node
// traffic is never translated: the fast path and network policies need the
// pod's own address. It depends on the flags alone; the nodes are in the sets.
func masqRules(podCIDR netip.Prefix, clusterCIDR netip.Prefix) string {
	var b strings.Builder
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n", masqChain)
	rule := func(format string, args ...any) {
		fmt.Fprintf(&b, "-A %s "+format+"\n", append([]any{masqChain}, args...)...)
	}
	rule("! -s %s -j RETURN", podCIDR)
	if clusterCIDR.IsValid() {
		rule("-d %s -j RETURN", clusterCIDR)
	} else {
		rule("-m set --match-set %s dst -j RETURN", masqPodsSet)
	}
	rule("-m set --match-set %s dst -j RETURN", masqNodesSet)
	rule("-m addrtype --dst-type LOCAL -j RETURN")
	rule("-j MASQUERADE --random-fully")
	b.WriteString("COMMIT\n")
	return b.String()
}

// masqMembers is what the sets must hold for set: every node's address
// and, without a cluster CIDR, every pod CIDR including ours.
func (a *Agent) masqMembers(set []nodes.Node) (nodeIPs, podCIDRs map[netip.Prefix]bool) {
	nodeIPs, podCIDRs = make(map[netip.Prefix]bool, len(set)), make(map[netip.Prefix]bool, len(set)+1)
	if !a.cfg.ClusterCIDR.IsValid() {
		podCIDRs[a.cfg.PodCIDR.Masked()] = true
	}
	for _, n := range set {
		nodeIPs[netip.PrefixFrom(n.NodeIP, n.NodeIP.BitLen())] = true
		if !a.cfg.ClusterCIDR.IsValid() {
			podCIDRs[n.PodCIDR.Masked()] = true
		}
	}
	return nodeIPs, podCIDRs
}

// syncMasquerade makes the chain, its jump and its sets match set. A full
// sync creates the sets and reads what they hold; any sync then adds and
// deletes only the members that differ. The chain is written after its
// sets are filled, so that no connection made in between is translated
// for want of a member.
func (a *Agent) syncMasquerade(set []nodes.Node, full bool) error {
	err := func() error {
		if full || a.masq.nodes == nil {
			if err := a.openMasqSets(); err != nil {
				return err
			}
		}
		nodeIPs, podCIDRs := a.masqMembers(set)
		if err := errors.Join(updateSet(masqNodesSet, a.masq.nodes, nodeIPs), updateSet(masqPodsSet, a.masq.pods, podCIDRs)); err != nil {
			return err
		}
		if full {
			return a.writeMasqChain()
		}
		return nil
	}()
	if err != nil {
		a.masq = masqSets{}
	}
	return err
}

// openMasqSets creates the sets unless they exist and reads their members
// into the cache.
func (a *Agent) openMasqSets() error {
	for name, typ := range map[string]string{masqNodesSet: "hash:ip", masqPodsSet: "hash:net"} {
		// Replace: no error when the set exists (from an earlier run).
		if err := netlink.IpsetCreate(name, typ, netlink.IpsetCreateOptions{Replace: true}); err != nil {
			return fmt.Errorf("create ipset %s (%s): %w; masquerade needs the kernel's ip_set and xt_set (CONFIG_IP_SET, CONFIG_NETFILTER_XT_SET)", name, typ, err)
		}
	}
	var err error
	if a.masq.nodes, err = setMembers(masqNodesSet); err != nil {
		return err
	}
	a.masq.pods, err = setMembers(masqPodsSet)
	return err
}

// writeMasqChain writes the chain whole and adds the jump to it.
func (a *Agent) writeMasqChain() error {
	rules := masqRules(a.cfg.PodCIDR, a.cfg.ClusterCIDR)
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

// setMembers lists an ipset's members.
func setMembers(name string) (map[netip.Prefix]bool, error) {
	res, err := netlink.IpsetList(name)
	if err != nil {
		return nil, fmt.Errorf("list ipset %s: %w", name, err)
	}
	have := make(map[netip.Prefix]bool, len(res.Entries))
	for _, e := range res.Entries {
		ip, ok := netip.AddrFromSlice(e.IP)
		if !ok {
			continue
		}
		bits := int(e.CIDR)
		if bits == 0 {
			bits = ip.Unmap().BitLen() // hash:ip lists no prefix length
		}
		have[netip.PrefixFrom(ip.Unmap(), bits)] = true
	}
	return have, nil
}

// updateSet adds what want has and have lacks, then deletes the rest, and
// leaves have equal to what the kernel holds.
func updateSet(name string, have, want map[netip.Prefix]bool) error {
	var errs []error
	apply := func(op func(string, *netlink.IPSetEntry) error, verb string, p netip.Prefix) {
		// Replace: adding a member twice or deleting a missing one is no error.
		e := &netlink.IPSetEntry{IP: p.Addr().AsSlice(), Replace: true}
		if p.Bits() != p.Addr().BitLen() {
			e.CIDR = uint8(p.Bits())
		}
		if err := op(name, e); err != nil {
			errs = append(errs, fmt.Errorf("%s %s in ipset %s: %w", verb, p, name, err))
			return
		}
		if verb == "add" {
			have[p] = true
		} else {
			delete(have, p)
		}
	}
	for p := range want {
		if !have[p] {
			apply(netlink.IpsetAdd, "add", p)
		}
	}
	for p := range have {
		if !want[p] {
			apply(netlink.IpsetDel, "delete", p)
		}
	}
	return errors.Join(errs...)
}

// removeMasquerade undoes syncMasquerade; absent rules are fine.
func removeMasquerade() error {
	for jump("-D") == nil {
	}
	if iptables("-t", "nat", "-n", "-L", masqChain) != nil {
		return destroyMasqSets()
	}
	if err := iptables("-t", "nat", "-F", masqChain); err != nil {
		return fmt.Errorf("flush %s: %w", masqChain, err)
	}
	if err := iptables("-t", "nat", "-X", masqChain); err != nil {
		return fmt.Errorf("delete %s: %w", masqChain, err)
	}
	return destroyMasqSets()
}

// destroyMasqSets removes the sets once no rule refers to them; absent
// sets are fine.
func destroyMasqSets() error {
	var errs []error
	for _, name := range []string{masqNodesSet, masqPodsSet} {
		if err := netlink.IpsetDestroy(name); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("destroy ipset %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func iptables(args ...string) error {
	// -w: kube-proxy and others hold the xtables lock at times.
	out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
