// Package kubeproxy writes kube-proxy's iptables rule set for a lab's
// Services as kube-proxy writes it, and loads it into lab nodes: the service
// tests run traffic through it, and the bench gives the baselines and
// patchcord the same rules a real node has.
package kubeproxy

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/patchcord/patchcord/internal/lab"
)

// ---- kube-proxy's rule set ---------------------------------------------------------------

// ServicePort is one port of a Service with its ready endpoints, what kube-proxy's
// ServicePortMap and EndpointsMap hold for it (traffic policies Cluster, no session
// affinity, no external or load-balancer IPs).
type ServicePort struct {
	Namespace, Name, PortName string
	Protocol                  string // "tcp" or "udp"
	ClusterIP                 netip.Addr
	Port                      int
	NodePort                  int // 0: none
	Endpoints                 []netip.AddrPort
}

// String is ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port.
func (s ServicePort) String() string {
	n := s.Namespace + "/" + s.Name
	if s.PortName != "" {
		n += ":" + s.PortName
	}
	return n
}

// chainHash is kube-proxy's chain-name hash: the first 16 characters of the base32
// encoding of SHA-256 over the concatenated strings.
func chainHash(parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "")))
	return base32.StdEncoding.EncodeToString(sum[:])[:16]
}

func (s ServicePort) SvcChain() string { return "KUBE-SVC-" + chainHash(s.String(), s.Protocol) }
func (s ServicePort) ExtChain() string { return "KUBE-EXT-" + chainHash(s.String(), s.Protocol) }
func (s ServicePort) SepChain(ep netip.AddrPort) string {
	return "KUBE-SEP-" + chainHash(s.String(), s.Protocol, ep.String())
}

// kubeMasqMark is what kube-proxy makes of --iptables-masquerade-bit=14, its default:
// fmt.Sprintf("%#08x", 1<<14).
const kubeMasqMark = "0x004000"

// kubeMasq is the mark with its mask, as the rules match it.
const kubeMasq = kubeMasqMark + "/" + kubeMasqMark

// Rules returns the iptables-restore input kube-proxy's iptables proxier
// (pkg/proxy/iptables/proxier.go, v1.30 and later) writes on a node for svcs, with
// --cluster-cidr clusterCIDR (detect-local by cluster CIDR), masquerade bit 14,
// localhost NodePorts allowed (the default, so no "! -d 127.0.0.0/8" on the nodeports
// jump), and nf_conntrack_tcp_be_liberal as the node has it (liberal: no INVALID drop).
//
// The jumps from the built-in chains, which kube-proxy adds with one `iptables -I` each
// before its restore, are `-I` lines here in the same order, so they end up in the same
// places. Everything else is line for line what syncProxyRules writes: chain lines
// first, then rules, arguments in its order and quoting. Only the loop over services
// differs: kube-proxy walks a map, this walks svcs in order.
func Rules(clusterCIDR netip.Prefix, liberal bool, svcs []ServicePort) string {
	r := &ruleSet{}
	r.addJumps()
	r.addBase()
	for _, s := range svcs {
		r.addService(s, clusterCIDR)
	}
	r.rule(&r.natRules, `-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`)
	if !liberal {
		r.rule(&r.filterRules, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
	}
	r.rule(&r.filterRules, `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark`, kubeMasq, "-j ACCEPT")
	r.rule(&r.filterRules, `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`)
	return r.render()
}

// ruleSet is kube-proxy's iptables-restore input being built, by table and part.
type ruleSet struct {
	filterChains, filterRules, filterJumps []string
	natChains, natRules, natJumps          []string
}

func (r *ruleSet) chain(buf *[]string, name string) { *buf = append(*buf, ":"+name+" - [0:0]") }

func (r *ruleSet) rule(buf *[]string, args ...string) { *buf = append(*buf, strings.Join(args, " ")) }

// addJumps adds the jumps from the built-in chains.
func (r *ruleSet) addJumps() {
	// iptablesJumpChains, then iptablesKubeletJumpChains, each by EnsureRule(Prepend).
	jumps := []struct{ table, dst, src, comment, extra string }{
		{"filter", "KUBE-EXTERNAL-SERVICES", "INPUT", "kubernetes externally-visible service portals", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-EXTERNAL-SERVICES", "FORWARD", "kubernetes externally-visible service portals", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-NODEPORTS", "INPUT", "kubernetes health check service ports", ""},
		{"filter", "KUBE-SERVICES", "FORWARD", "kubernetes service portals", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ""},
		{"filter", "KUBE-PROXY-FIREWALL", "INPUT", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-PROXY-FIREWALL", "OUTPUT", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"},
		{"filter", "KUBE-PROXY-FIREWALL", "FORWARD", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"},
		{"nat", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", ""},
		{"nat", "KUBE-SERVICES", "PREROUTING", "kubernetes service portals", ""},
		{"nat", "KUBE-POSTROUTING", "POSTROUTING", "kubernetes postrouting rules", ""},
		{"filter", "KUBE-FIREWALL", "INPUT", "", ""},
		{"filter", "KUBE-FIREWALL", "OUTPUT", "", ""},
	}
	for _, j := range jumps {
		args := []string{"-I", j.src}
		if j.extra != "" {
			args = append(args, j.extra)
		}
		if j.comment != "" {
			args = append(args, "-m", "comment", "--comment", strconv.Quote(j.comment))
		}
		args = append(args, "-j", j.dst)
		if j.table == "filter" {
			r.rule(&r.filterJumps, args...)
		} else {
			r.rule(&r.natJumps, args...)
		}
	}
}

// addBase adds the chains and rules that do not depend on services.
func (r *ruleSet) addBase() {
	for _, c := range []string{"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"} {
		r.chain(&r.filterChains, c)
	}
	for _, c := range []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"} {
		r.chain(&r.natChains, c)
	}
	r.rule(&r.natRules, "-A KUBE-POSTROUTING -m mark ! --mark", kubeMasq, "-j RETURN")
	r.rule(&r.natRules, "-A KUBE-POSTROUTING -j MARK --xor-mark", kubeMasqMark)
	r.rule(&r.natRules, `-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`)
	r.rule(&r.natRules, "-A KUBE-MARK-MASQ -j MARK --or-mark", kubeMasqMark)
	// localhostNodePorts: kubelet's anti-martian rule, duplicated by kube-proxy.
	r.chain(&r.filterChains, "KUBE-FIREWALL")
	r.rule(&r.filterRules, `-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP`)
}

// addService adds the rules of one service port.
func (r *ruleSet) addService(s ServicePort, clusterCIDR netip.Prefix) {
	name, proto := s.String(), s.Protocol
	svcChain, extChain := s.SvcChain(), s.ExtChain()
	if len(s.Endpoints) == 0 {
		r.rule(&r.filterRules, "-A KUBE-SERVICES -m comment --comment", strconv.Quote(name+" has no endpoints"),
			"-m", proto, "-p", proto, "-d", s.ClusterIP.String(), "--dport", strconv.Itoa(s.Port), "-j REJECT")
		if s.NodePort != 0 {
			r.rule(&r.filterRules, "-A KUBE-EXTERNAL-SERVICES -m comment --comment", strconv.Quote(name+" has no endpoints"),
				"-m addrtype --dst-type LOCAL -m", proto, "-p", proto, "--dport", strconv.Itoa(s.NodePort), "-j REJECT")
		}
		return
	}
	clusterIP := []string{"-m comment --comment", strconv.Quote(name + " cluster IP"),
		"-m", proto, "-p", proto, "-d", s.ClusterIP.String(), "--dport", strconv.Itoa(s.Port)}
	r.rule(&r.natRules, append(append([]string{"-A KUBE-SERVICES"}, clusterIP...), "-j", svcChain)...)
	if s.NodePort != 0 {
		r.rule(&r.natRules, "-A KUBE-NODEPORTS -m comment --comment", name, "-m", proto, "-p", proto,
			"--dport", strconv.Itoa(s.NodePort), "-j", extChain)
	}
	// Off-cluster sources reaching the ClusterIP are masqueraded.
	r.rule(&r.natRules, append(append([]string{"-A", svcChain}, clusterIP...), "!", "-s", clusterCIDR.String(), "-j KUBE-MARK-MASQ")...)
	if s.NodePort != 0 {
		r.chain(&r.natChains, extChain)
		r.rule(&r.natRules, "-A", extChain, "-m comment --comment",
			strconv.Quote("masquerade traffic for "+name+" external destinations"), "-j KUBE-MARK-MASQ")
		r.rule(&r.natRules, "-A", extChain, "-j", svcChain)
	}
	r.chain(&r.natChains, svcChain)
	for i, ep := range s.Endpoints {
		args := []string{"-A", svcChain, "-m comment --comment", strconv.Quote(name + " -> " + ep.String())}
		if n := len(s.Endpoints) - i; n > 1 {
			args = append(args, "-m statistic --mode random --probability", fmt.Sprintf("%0.10f", 1.0/float64(n)))
		}
		r.rule(&r.natRules, append(args, "-j", s.SepChain(ep))...)
	}
	for _, ep := range s.Endpoints {
		sep := s.SepChain(ep)
		r.chain(&r.natChains, sep)
		// A pod reaching itself through its service (hairpin) is masqueraded.
		r.rule(&r.natRules, "-A", sep, "-m comment --comment", name, "-s", ep.Addr().String(), "-j KUBE-MARK-MASQ")
		r.rule(&r.natRules, "-A", sep, "-m comment --comment", name, "-m", proto, "-p", proto,
			"-j DNAT --to-destination", ep.String())
	}
}

// render is the rule set as iptables-restore reads it.
func (r *ruleSet) render() string {
	var b strings.Builder
	table := func(name string, parts ...[]string) {
		b.WriteString("*" + name + "\n")
		for _, p := range parts {
			for _, l := range p {
				b.WriteString(l + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	// ipt.Monitor's canaries, which tell kube-proxy that someone flushed a table.
	canary := []string{":KUBE-PROXY-CANARY - [0:0]"}
	table("mangle", canary)
	table("filter", r.filterChains, canary, r.filterJumps, r.filterRules)
	table("nat", r.natChains, canary, r.natJumps, r.natRules)
	return b.String()
}

// Load does on n what kube-proxy does at start and on its first sync: the
// route_localnet sysctl for localhost NodePorts, the be_liberal probe, the
// jumps and the rule set for svcs (with --cluster-cidr clusterCIDR), loaded
// with iptables-restore --noflush.
func Load(ctx context.Context, n *lab.Node, clusterCIDR netip.Prefix, svcs []ServicePort) error {
	if out, err := n.Exec(ctx, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"); err != nil {
		return fmt.Errorf("route_localnet on %s: %v\n%s", n.NetNS, err, out)
	}
	out, err := n.Exec(ctx, "sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal")
	if err != nil {
		return fmt.Errorf("read nf_conntrack_tcp_be_liberal on %s: %w", n.NetNS, err)
	}
	liberal := strings.TrimSpace(string(out)) != "0"
	rules := Rules(clusterCIDR, liberal, svcs)
	file := filepath.Join(n.Lab.Dir, fmt.Sprintf("kube-proxy-n%d.rules", n.Index))
	if err := os.WriteFile(file, []byte(rules), 0o644); err != nil {
		return err
	}
	// -w as kube-proxy runs it: the agent may hold the xtables lock.
	if out, err := n.Exec(ctx, "sh", "-c", "iptables-restore -w --noflush < "+file); err != nil {
		return fmt.Errorf("load kube-proxy rules on %s: %v\n%s\nrules:\n%s", n.NetNS, err, out, rules)
	}
	return nil
}
