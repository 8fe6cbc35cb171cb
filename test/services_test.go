// Services end to end: kube-proxy's iptables mode on top of patchcord. Two nodes carry
// the rule set kube-proxy would write for three services (their NAT chains, its filter
// chains, its jumps), and pods, nodes and an outside host use them: pod -> ClusterIP ->
// backend on the same node and on the other node (TCP, UDP, a bulk transfer, many short
// connections), node -> ClusterIP, NodePort from another node, a pod reaching its own
// service, and pods leaving the cluster through the agent's masquerade. Between these,
// pod-to-pod traffic must keep its fast path.
package test

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/patchcord/patchcord/pkg/lab"
)

// The service side of the lab: kube-proxy's --cluster-cidr (every node's pod CIDR lies
// in it) and the service range, which a real node reaches by its default route.
var (
	svcClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	svcRange       = netip.MustParsePrefix("10.96.0.0/12")
	// svcOutsideIP is a host on the fabric that is no node and has no route to any pod
	// CIDR: what "the internet" is to the pods.
	svcOutsideIP = netip.MustParseAddr("198.18.0.200")
)

// Ports the backends listen on, and the ports of the services in front of them.
const (
	svcBackendTCP = 8080
	svcBackendUDP = 5353
	svcHTTPPort   = 80
	svcDNSPort    = 53
	// svcNodeServerPort is a plain server in a node's own namespace.
	svcNodeServerPort = 8090
)

// ---- kube-proxy's rule set ---------------------------------------------------------------

// svcPort is one port of a Service with its ready endpoints, what kube-proxy's
// ServicePortMap and EndpointsMap hold for it (traffic policies Cluster, no session
// affinity, no external or load-balancer IPs).
type svcPort struct {
	Namespace, Name, PortName string
	Protocol                  string // "tcp" or "udp"
	ClusterIP                 netip.Addr
	Port                      int
	NodePort                  int // 0: none
	Endpoints                 []netip.AddrPort
}

// name is ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port.
func (s svcPort) name() string {
	n := s.Namespace + "/" + s.Name
	if s.PortName != "" {
		n += ":" + s.PortName
	}
	return n
}

// svcHash is kube-proxy's chain-name hash: the first 16 characters of the base32
// encoding of SHA-256 over the concatenated strings.
func svcHash(parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "")))
	return base32.StdEncoding.EncodeToString(sum[:])[:16]
}

func (s svcPort) svcChain() string { return "KUBE-SVC-" + svcHash(s.name(), s.Protocol) }
func (s svcPort) extChain() string { return "KUBE-EXT-" + svcHash(s.name(), s.Protocol) }
func (s svcPort) sepChain(ep netip.AddrPort) string {
	return "KUBE-SEP-" + svcHash(s.name(), s.Protocol, ep.String())
}

// kubeMasqMark is what kube-proxy makes of --iptables-masquerade-bit=14, its default:
// fmt.Sprintf("%#08x", 1<<14).
const kubeMasqMark = "0x004000"

// kubeProxyRules returns the iptables-restore input kube-proxy's iptables proxier
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
func kubeProxyRules(clusterCIDR netip.Prefix, liberal bool, svcs []svcPort) string {
	var filterChains, filterRules, natChains, natRules []string
	chain := func(buf *[]string, name string) { *buf = append(*buf, ":"+name+" - [0:0]") }
	rule := func(buf *[]string, args ...string) { *buf = append(*buf, strings.Join(args, " ")) }

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
	var filterJumps, natJumps []string
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
			rule(&filterJumps, args...)
		} else {
			rule(&natJumps, args...)
		}
	}

	for _, c := range []string{"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"} {
		chain(&filterChains, c)
	}
	for _, c := range []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"} {
		chain(&natChains, c)
	}
	masq := kubeMasqMark + "/" + kubeMasqMark
	rule(&natRules, "-A KUBE-POSTROUTING -m mark ! --mark", masq, "-j RETURN")
	rule(&natRules, "-A KUBE-POSTROUTING -j MARK --xor-mark", kubeMasqMark)
	rule(&natRules, `-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`)
	rule(&natRules, "-A KUBE-MARK-MASQ -j MARK --or-mark", kubeMasqMark)
	// localhostNodePorts: kubelet's anti-martian rule, duplicated by kube-proxy.
	chain(&filterChains, "KUBE-FIREWALL")
	rule(&filterRules, `-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP`)

	for _, s := range svcs {
		name, proto := s.name(), s.Protocol
		svcChain, extChain := s.svcChain(), s.extChain()
		if len(s.Endpoints) == 0 {
			rule(&filterRules, "-A KUBE-SERVICES -m comment --comment", strconv.Quote(name+" has no endpoints"),
				"-m", proto, "-p", proto, "-d", s.ClusterIP.String(), "--dport", strconv.Itoa(s.Port), "-j REJECT")
			if s.NodePort != 0 {
				rule(&filterRules, "-A KUBE-EXTERNAL-SERVICES -m comment --comment", strconv.Quote(name+" has no endpoints"),
					"-m addrtype --dst-type LOCAL -m", proto, "-p", proto, "--dport", strconv.Itoa(s.NodePort), "-j REJECT")
			}
			continue
		}
		clusterIP := []string{"-m comment --comment", strconv.Quote(name + " cluster IP"),
			"-m", proto, "-p", proto, "-d", s.ClusterIP.String(), "--dport", strconv.Itoa(s.Port)}
		rule(&natRules, append(append([]string{"-A KUBE-SERVICES"}, clusterIP...), "-j", svcChain)...)
		if s.NodePort != 0 {
			rule(&natRules, "-A KUBE-NODEPORTS -m comment --comment", name, "-m", proto, "-p", proto,
				"--dport", strconv.Itoa(s.NodePort), "-j", extChain)
		}
		// Off-cluster sources reaching the ClusterIP are masqueraded.
		rule(&natRules, append(append([]string{"-A", svcChain}, clusterIP...), "!", "-s", clusterCIDR.String(), "-j KUBE-MARK-MASQ")...)
		if s.NodePort != 0 {
			chain(&natChains, extChain)
			rule(&natRules, "-A", extChain, "-m comment --comment",
				strconv.Quote("masquerade traffic for "+name+" external destinations"), "-j KUBE-MARK-MASQ")
			rule(&natRules, "-A", extChain, "-j", svcChain)
		}
		chain(&natChains, svcChain)
		for i, ep := range s.Endpoints {
			args := []string{"-A", svcChain, "-m comment --comment", strconv.Quote(name + " -> " + ep.String())}
			if n := len(s.Endpoints) - i; n > 1 {
				args = append(args, "-m statistic --mode random --probability", fmt.Sprintf("%0.10f", 1.0/float64(n)))
			}
			rule(&natRules, append(args, "-j", s.sepChain(ep))...)
		}
		for _, ep := range s.Endpoints {
			sep := s.sepChain(ep)
			chain(&natChains, sep)
			// A pod reaching itself through its service (hairpin) is masqueraded.
			rule(&natRules, "-A", sep, "-m comment --comment", name, "-s", ep.Addr().String(), "-j KUBE-MARK-MASQ")
			rule(&natRules, "-A", sep, "-m comment --comment", name, "-m", proto, "-p", proto,
				"-j DNAT --to-destination", ep.String())
		}
	}
	rule(&natRules, `-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`)
	if !liberal {
		rule(&filterRules, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
	}
	rule(&filterRules, `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark`, masq, "-j ACCEPT")
	rule(&filterRules, `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`)

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
	table("filter", filterChains, canary, filterJumps, filterRules)
	table("nat", natChains, canary, natJumps, natRules)
	return b.String()
}

// svcLoadKubeProxy does on n what kube-proxy does at start and on its first sync: the
// route_localnet sysctl for localhost NodePorts, the be_liberal probe, the jumps and
// the rule set, loaded with iptables-restore --noflush.
func svcLoadKubeProxy(t *testing.T, ctx context.Context, n *lab.Node, svcs []svcPort) {
	t.Helper()
	if out, err := n.Exec(ctx, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"); err != nil {
		t.Fatalf("route_localnet on %s: %v\n%s", n.NetNS, err, out)
	}
	out, err := n.Exec(ctx, "sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal")
	if err != nil {
		t.Fatalf("read nf_conntrack_tcp_be_liberal on %s: %v", n.NetNS, err)
	}
	liberal := strings.TrimSpace(string(out)) != "0"
	rules := kubeProxyRules(svcClusterCIDR, liberal, svcs)
	file := filepath.Join(n.Lab.Dir, fmt.Sprintf("kube-proxy-n%d.rules", n.Index))
	if err := os.WriteFile(file, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	// -w as kube-proxy runs it: the agent may hold the xtables lock.
	if out, err := n.Exec(ctx, "sh", "-c", "iptables-restore -w --noflush < "+file); err != nil {
		t.Fatalf("load kube-proxy rules on %s: %v\n%s\nrules:\n%s", n.NetNS, err, out, rules)
	}
}

// ---- servers and clients -----------------------------------------------------------------

// svcServerPy answers HTTP GET / with "<name> <peer ip>:<port>", GET /bytes/N with N
// bytes, and each UDP datagram with "<name> <peer ip>:<port>", so that clients can tell
// which backend answered and from which address it saw them. It binds UDP before it
// listens on TCP: a listening TCP port means both are up.
const svcServerPy = `
import http.server, socket, socketserver, sys, threading
name, tcp_port = sys.argv[1], int(sys.argv[2])
udp_port = int(sys.argv[3]) if len(sys.argv) > 3 else 0

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path[len("/bytes/"):])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                k = min(n, len(chunk))
                self.wfile.write(chunk[:k])
                n -= k
            return
        body = ("%s %s:%d\n" % (name, self.client_address[0], self.client_address[1])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

if udp_port:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", udp_port))
    def serve_udp():
        while True:
            data, peer = u.recvfrom(2048)
            reply = ("%s %s:%d" % (name, peer[0], peer[1])).encode()
            if data.startswith(b"big "):  # padded past the MTU: it leaves in fragments
                reply = reply.ljust(int(data[4:]))
            u.sendto(reply, peer)
    threading.Thread(target=serve_udp, daemon=True).start()
Server(("0.0.0.0", tcp_port), Handler).serve_forever()
`

// svcClientPy is the client side, one JSON line per run:
//
//	get HOST PORT PATH TIMEOUT    {"status", "body", "bytes"}
//	many HOST PORT N TIMEOUT      N GETs of /, one connection each: {"ok", "names", "errors"}
//	udp HOST PORT TIMEOUT         {"from": "ip:port", "body"}
//
// http.client rather than urllib: no proxy from the environment can get in the way.
const svcClientPy = `
import http.client, json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def get(path, timeout):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        n, body = 0, b""
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            if len(body) < 256:
                body += chunk[:256]
        return r.status, body.decode(errors="replace").strip(), n
    finally:
        c.close()

if mode == "get":
    start = time.monotonic()
    status, body, n = get(sys.argv[4], float(sys.argv[5]))
    print(json.dumps({"status": status, "body": body if n < 256 else "", "bytes": n,
                      "seconds": time.monotonic() - start}))
elif mode == "many":
    count, timeout = int(sys.argv[4]), float(sys.argv[5])
    ok, names, errors = 0, {}, []
    for i in range(count):
        try:
            status, body, _ = get("/", timeout)
            if status != 200:
                raise Exception("status %d" % status)
            who = body.split()[0]
            names[who] = names.get(who, 0) + 1
            ok += 1
        except Exception as e:
            errors.append("%d: %r" % (i, e))
    print(json.dumps({"ok": ok, "names": names, "errors": errors[:10]}))
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(float(sys.argv[4]))
    s.sendto(sys.argv[5].encode() if len(sys.argv) > 5 else b"ping", (host, port))
    data, peer = s.recvfrom(65535)
    print(json.dumps({"from": "%s:%d" % peer, "body": data.decode().rstrip(), "bytes": len(data)}))
`

// svcPython is Debian's python3 when present: the pyenv shim on PATH costs a shell
// script per start.
func svcPython() string {
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return "python3"
}

type svcExecer interface {
	Exec(context.Context, string, ...string) ([]byte, error)
	Start(context.Context, string, ...string) (*lab.Process, error)
	WaitListening(context.Context, int) error
}

// svcServe starts the server script as name in e, on TCP tcpPort and (if not 0) UDP
// udpPort, and returns once it listens.
func (c *svcCluster) svcServe(t *testing.T, ctx context.Context, e svcExecer, name string, tcpPort, udpPort int) *lab.Process {
	t.Helper()
	args := []string{c.serverPy, name, strconv.Itoa(tcpPort)}
	if udpPort != 0 {
		args = append(args, strconv.Itoa(udpPort))
	}
	p, err := e.Start(ctx, svcPython(), args...)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitListening(ctx, tcpPort); err != nil {
		out, _ := p.Output()
		t.Fatalf("server %s: %v\n%s", name, err, out)
	}
	return p
}

// svcReply is a client's answer.
type svcReply struct {
	Status  int            `json:"status"`
	Body    string         `json:"body"`
	Bytes   int64          `json:"bytes"`
	Seconds float64        `json:"seconds"`
	OK      int            `json:"ok"`
	Names   map[string]int `json:"names"`
	Errors  []string       `json:"errors"`
	From    string         `json:"from"`
}

// who is the backend name in a body "<name> <peer>"; peer the address it saw.
func (r svcReply) who() string  { f := strings.Fields(r.Body); return svcField(f, 0) }
func (r svcReply) peer() string { f := strings.Fields(r.Body); return svcField(f, 1) }

func svcField(f []string, i int) string {
	if i < len(f) {
		return f[i]
	}
	return ""
}

// peerIP is the address part of peer().
func (r svcReply) peerIP() string {
	ap, err := netip.ParseAddrPort(r.peer())
	if err != nil {
		return r.peer()
	}
	return ap.Addr().String()
}

// svcClient runs the client script in e and parses its answer.
func (c *svcCluster) svcClient(ctx context.Context, e svcExecer, args ...string) (svcReply, error) {
	var r svcReply
	out, err := e.Exec(ctx, svcPython(), append([]string{c.clientPy}, args...)...)
	if err != nil {
		return r, fmt.Errorf("client %s: %w", strings.Join(args, " "), err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		return r, fmt.Errorf("client %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return r, nil
}

// svcGet is one HTTP GET of path from e that must succeed within timeout.
func (c *svcCluster) svcGet(t *testing.T, ctx context.Context, e svcExecer, host string, port int, path string, timeout time.Duration) svcReply {
	t.Helper()
	r, err := c.svcClient(ctx, e, "get", host, strconv.Itoa(port), path, svcSeconds(timeout))
	if err != nil {
		t.Fatalf("GET http://%s:%d%s: %v", host, port, path, err)
	}
	if r.Status != 200 {
		t.Fatalf("GET http://%s:%d%s: status %d", host, port, path, r.Status)
	}
	return r
}

// svcUDP sends one datagram from e ("ping", or payload) and returns the reply,
// which must come within 3s.
func (c *svcCluster) svcUDP(t *testing.T, ctx context.Context, e svcExecer, host string, port int, payload ...string) svcReply {
	t.Helper()
	r, err := c.svcClient(ctx, e, append([]string{"udp", host, strconv.Itoa(port), "3"}, payload...)...)
	if err != nil {
		t.Fatalf("UDP %s:%d: %v", host, port, err)
	}
	return r
}

func svcSeconds(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) }

// ---- the cluster -------------------------------------------------------------------------

// svcCluster is two patchcord nodes running kube-proxy's rules for three services:
//
//	web     10.96.0.10  backends b1 (node 1) and b2 (node 2), NodePort 30080
//	web-n1  10.96.0.11  backend b1 only, NodePort 30081
//	web-n2  10.96.0.12  backend b2 only, NodePort 30082
//
// each with port http (TCP 80 -> 8080) and port dns (UDP 53 -> 5353). Clients: pod c1 on
// node 1, pod c2 on node 2. A host outside the cluster sits on the fabric.
type svcCluster struct {
	lab        *lab.Lab
	n1, n2     *lab.Node
	nodesFile  string
	agents     map[int]*lab.Process
	c1, b1, b2 *lab.Pod
	c2         *lab.Pod
	outside    *lab.Node // a namespace on the fabric; not a cluster node
	serverPy   string
	clientPy   string
	svcs       []svcPort
}

var (
	svcWeb   = netip.MustParseAddr("10.96.0.10")
	svcWebN1 = netip.MustParseAddr("10.96.0.11")
	svcWebN2 = netip.MustParseAddr("10.96.0.12")
)

const (
	svcNodePortWeb   = 30080
	svcNodePortWebN1 = 30081
	svcNodePortWebN2 = 30082
)

func newSvcCluster(t *testing.T, ctx context.Context) *svcCluster {
	t.Helper()
	l := newLab(t)
	c := &svcCluster{lab: l, agents: map[int]*lab.Process{}}
	c.serverPy = filepath.Join(l.Dir, "svc_server.py")
	c.clientPy = filepath.Join(l.Dir, "svc_client.py")
	for path, src := range map[string]string{c.serverPy: svcServerPy, c.clientPy: svcClientPy} {
		if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	nodes := make([]*lab.Node, 2)
	nodeErrs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() { nodes[i], nodeErrs[i] = l.AddNode(i + 1) })
	}
	wg.Wait()
	if err := errors.Join(nodeErrs...); err != nil {
		t.Fatal(err)
	}
	c.n1, c.n2 = nodes[0], nodes[1]
	c.nodesFile = filepath.Join(l.Dir, "nodes.json")
	writeNodes(t, c.nodesFile, entryOf(c.n1), entryOf(c.n2))
	for _, n := range nodes {
		if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
			t.Fatal(err)
		}
		c.agents[n.Index] = startAgent(t, ctx, n, c.nodesFile)
		// What a real node's default route does for the service range: without a
		// route, the node's own connect() to a ClusterIP fails before OUTPUT's DNAT.
		if out, err := n.Exec(ctx, "ip", "route", "add", svcRange.String(), "dev", "eth0"); err != nil {
			t.Fatalf("route to service range on %s: %v\n%s", n.NetNS, err, out)
		}
	}

	type podSpec struct {
		node *lab.Node
		name string
		dst  **lab.Pod
	}
	specs := []podSpec{{c.n1, "c1", &c.c1}, {c.n1, "b1", &c.b1}, {c.n2, "b2", &c.b2}, {c.n2, "c2", &c.c2}}
	errs := make([]error, len(specs))
	for i, s := range specs {
		wg.Go(func() { *s.dst, errs[i] = s.node.AddPod(ctx, s.name, "patchcord") })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}

	c.svcServe(t, ctx, c.b1, "b1", svcBackendTCP, svcBackendUDP)
	c.svcServe(t, ctx, c.b2, "b2", svcBackendTCP, svcBackendUDP)
	c.svcServe(t, ctx, c.n2, "n2", svcNodeServerPort, 0)

	ep := func(p *lab.Pod, port int) netip.AddrPort { return netip.AddrPortFrom(p.IP, uint16(port)) }
	service := func(name string, ip netip.Addr, nodePort int, backends ...*lab.Pod) []svcPort {
		var tcp, udp []netip.AddrPort
		for _, b := range backends {
			tcp = append(tcp, ep(b, svcBackendTCP))
			udp = append(udp, ep(b, svcBackendUDP))
		}
		// The endpoints cache hands them over sorted.
		slices.SortFunc(tcp, netip.AddrPort.Compare)
		slices.SortFunc(udp, netip.AddrPort.Compare)
		return []svcPort{
			{Namespace: "default", Name: name, PortName: "http", Protocol: "tcp", ClusterIP: ip, Port: svcHTTPPort, NodePort: nodePort, Endpoints: tcp},
			{Namespace: "default", Name: name, PortName: "dns", Protocol: "udp", ClusterIP: ip, Port: svcDNSPort, Endpoints: udp},
		}
	}
	c.svcs = slices.Concat(
		service("web", svcWeb, svcNodePortWeb, c.b1, c.b2),
		service("web-n1", svcWebN1, svcNodePortWebN1, c.b1),
		service("web-n2", svcWebN2, svcNodePortWebN2, c.b2),
	)
	// kube-proxy runs on every node.
	for _, n := range nodes {
		svcLoadKubeProxy(t, ctx, n, c.svcs)
	}

	c.outside = svcAddOutsideHost(t, ctx, l)
	srv := c.svcServe(t, ctx, c.outside, "outside", svcBackendTCP, 0)
	t.Cleanup(func() { _ = srv.Stop() })
	return c
}

// svcAddOutsideHost plugs a namespace "<Prefix>-outside" into the fabric with
// svcOutsideIP/24 and no other route: a host beyond the cluster that can answer only
// addresses on the fabric. It returns it as a lab.Node for Exec and Start (it is no
// cluster node: no agent, no bpffs); it goes before the lab does, and lab.Sweep knows
// it by its prefix if a run dies.
func svcAddOutsideHost(t *testing.T, ctx context.Context, l *lab.Lab) *lab.Node {
	t.Helper()
	name := l.Prefix + "-outside"
	fabric := l.FabricNS()
	ipCmd := func(args ...string) {
		t.Helper()
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ipCmd("netns", "add", name)
	host := &lab.Node{Lab: l, Index: 200, NetNS: name, NSPath: filepath.Join("/var/run/netns", name), IP: svcOutsideIP}
	t.Cleanup(func() {
		// Its veth goes with it, and with that the fabric port. Processes started
		// in it must be stopped by cleanups registered later (they run first).
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete %s: %v\n%s", name, err, out)
		}
	})
	// Like the fabric: no IPv6 chatter into the nodes' uplinks.
	if out, err := host.Exec(ctx, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
		t.Fatalf("disable IPv6 in %s: %v\n%s", name, err, out)
	}
	ipCmd("-n", fabric, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", name)
	ipCmd("-n", fabric, "link", "set", "out0", "master", "br0", "up")
	ipCmd("-n", name, "link", "set", "lo", "up")
	ipCmd("-n", name, "addr", "add", netip.PrefixFrom(svcOutsideIP, 24).String(), "dev", "eth0")
	ipCmd("-n", name, "link", "set", "eth0", "up")
	return host
}

// ---- assertions --------------------------------------------------------------------------

// svcCounters are one node's counters by name.
type svcCounters map[string]counter

func (c *svcCluster) counters(t *testing.T, ctx context.Context) map[int]svcCounters {
	t.Helper()
	return map[int]svcCounters{1: stats(t, ctx, c.n1), 2: stats(t, ctx, c.n2)}
}

// svcGrew is after minus before for one counter of one node.
func svcGrew(before, after map[int]svcCounters, node int, name string) counter {
	b, a := before[node][name], after[node][name]
	return counter{Packets: a.Packets - b.Packets, Bytes: a.Bytes - b.Bytes}
}

// svcChatter bounds what a node's pods send to the host stack by themselves during a
// second of pings (ARP for the gateway; router solicitations and MLD reports in a new
// pod's first seconds), well below the svcPings packets pod-to-pod pings would add to
// to_host if they took the host path.
const (
	svcChatter = 12
	svcPings   = 30
)

// checkRedirect proves that pod-to-pod traffic still takes the fast path: pings
// between c1 and b1 (same node) are redirected, pings between c1 and b2 (across) are
// encapsulated and decapsulated, and neither goes through the host stack.
func (c *svcCluster) checkRedirect(t *testing.T, ctx context.Context) {
	t.Helper()
	const count = svcPings
	before := c.counters(t, ctx)
	for _, dst := range []*lab.Pod{c.b1, c.b2} {
		out, err := c.c1.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", "0.02", "-W", "2", dst.IP.String())
		if err != nil || !strings.Contains(string(out), " 0% packet loss") {
			t.Fatalf("ping %s -> %s: %v\n%s", c.c1.Name, dst.Name, err, out)
		}
	}
	after := c.counters(t, ctx)
	grew := func(node int, name string) uint64 { return svcGrew(before, after, node, name).Packets }
	t.Logf("node1: local_redirect +%d encap +%d decap +%d to_host +%d to_host_nat +%d; node2: encap +%d decap +%d to_host +%d to_host_nat +%d",
		grew(1, "local_redirect"), grew(1, "encap"), grew(1, "decap"), grew(1, "to_host"), grew(1, "to_host_nat"),
		grew(2, "encap"), grew(2, "decap"), grew(2, "to_host"), grew(2, "to_host_nat"))
	want := map[string]uint64{"1/local_redirect": 2 * count, "1/encap": count, "1/decap": count, "2/encap": count, "2/decap": count}
	for key, least := range want {
		node, name, _ := strings.Cut(key, "/")
		i, _ := strconv.Atoi(node)
		if got := grew(i, name); got < least {
			t.Errorf("node%d %s grew by %d during %d pings each way, want at least %d", i, name, got, count, least)
		}
	}
	for _, i := range []int{1, 2} {
		if got := grew(i, "to_host"); got > svcChatter {
			t.Errorf("node%d to_host grew by %d during pod-to-pod pings (at most %d expected): pod traffic took the host path", i, got, svcChatter)
		}
		if got := grew(i, "to_host_nat"); got != 0 {
			t.Errorf("node%d to_host_nat grew by %d during pod-to-pod pings", i, got)
		}
	}
}

// checkService sends one GET and one UDP datagram from client to the service at ip,
// whose only backend is want, and checks that the answers come from the service's
// address, from want, and that the client's own address reached want unchanged.
func (c *svcCluster) checkService(t *testing.T, ctx context.Context, client *lab.Pod, ip netip.Addr, want *lab.Pod) {
	t.Helper()
	r := c.svcGet(t, ctx, client, ip.String(), svcHTTPPort, "/", 5*time.Second)
	if r.who() != want.Name || r.peerIP() != client.IP.String() {
		t.Errorf("GET http://%s/ from %s: got %q, want %s to answer and see %s (no SNAT inside the cluster)", ip, client.Name, r.Body, want.Name, client.IP)
	}
	u := c.svcUDP(t, ctx, client, ip.String(), svcDNSPort)
	wantFrom := netip.AddrPortFrom(ip, svcDNSPort).String()
	if u.From != wantFrom {
		t.Errorf("UDP to %s:%d from %s: reply came from %s, want %s (the ClusterIP: conntrack must reverse the DNAT)", ip, svcDNSPort, client.Name, u.From, wantFrom)
	}
	if who := strings.Fields(u.Body); len(who) == 0 || who[0] != want.Name {
		t.Errorf("UDP to %s:%d from %s: answered %q, want %s", ip, svcDNSPort, client.Name, u.Body, want.Name)
	}
}

// svcInvalidDrops is how many packets kube-proxy's "KUBE-FORWARD -m conntrack
// --ctstate INVALID -j DROP" dropped on n so far. Conntrack calls a packet INVALID when
// it saw its connection only in part, e.g. a reply whose request bypassed the stack.
func svcInvalidDrops(t *testing.T, ctx context.Context, n *lab.Node) uint64 {
	t.Helper()
	out, err := n.Exec(ctx, "iptables", "-w", "-t", "filter", "-L", "KUBE-FORWARD", "-v", "-n", "-x")
	if err != nil {
		t.Fatalf("list KUBE-FORWARD on %s: %v", n.NetNS, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "DROP" && strings.Contains(line, "ctstate INVALID") {
			v, _ := strconv.ParseUint(f[0], 10, 64)
			return v
		}
	}
	return 0
}

// explainFailure, deferred at the start of a subtest, says on failure where conntrack
// dropped packets as INVALID during it.
func (c *svcCluster) explainFailure(t *testing.T, ctx context.Context) func() {
	t.Helper()
	before := map[int]uint64{1: svcInvalidDrops(t, ctx, c.n1), 2: svcInvalidDrops(t, ctx, c.n2)}
	return func() {
		if !t.Failed() {
			return
		}
		for _, n := range []*lab.Node{c.n1, c.n2} {
			if d := svcInvalidDrops(t, ctx, n) - before[n.Index]; d > 0 {
				t.Logf("node%d: kube-proxy's KUBE-FORWARD dropped %d packets as conntrack INVALID during this test: its stack saw those connections only in part", n.Index, d)
			}
		}
	}
}

// svcConntrackStates counts n's conntrack entries of TCP connections to ip by state,
// plus "UNREPLIED" (no reply seen) and "total".
func svcConntrackStates(t *testing.T, ctx context.Context, n *lab.Node, ip netip.Addr) map[string]int {
	t.Helper()
	out, err := n.Exec(ctx, "conntrack", "-L", "-p", "tcp", "--orig-dst", ip.String())
	if err != nil {
		t.Fatalf("conntrack -L on %s: %v", n.NetNS, err)
	}
	states := map[string]int{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		// tcp 6 <timeout> <STATE> src=...
		if len(f) < 4 || f[0] != "tcp" {
			continue
		}
		states["total"]++
		states[f[3]]++
		if strings.Contains(line, "[UNREPLIED]") {
			states["UNREPLIED"]++
		}
	}
	return states
}

// svcMasqChain tells whether the agent's masquerade chain is in n's nat table.
func svcMasqChain(t *testing.T, ctx context.Context, n *lab.Node) bool {
	t.Helper()
	out, err := n.Exec(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatalf("iptables-save on %s: %v", n.NetNS, err)
	}
	return strings.Contains(string(out), ":PATCHCORD-MASQ ")
}

// restartAgent stops node i's agent and starts it again with args.
func (c *svcCluster) restartAgent(t *testing.T, ctx context.Context, i int, args ...string) {
	t.Helper()
	if err := c.agents[i].Stop(); err != nil {
		t.Fatalf("stop agent on node%d: %v", i, err)
	}
	c.agents[i] = startAgent(t, ctx, c.lab.Node(i), c.nodesFile, args...)
}

// ---- tests -------------------------------------------------------------------------------

// TestServicesKubeProxyChainNames checks the chain-name hash against names every
// kube-proxy cluster has: the apiserver's service and kube-dns.
func TestServicesKubeProxyChainNames(t *testing.T) {
	for _, tc := range []struct {
		port svcPort
		want string
	}{
		{svcPort{Namespace: "default", Name: "kubernetes", PortName: "https", Protocol: "tcp"}, "KUBE-SVC-NPX46M4PTMTKRN6Y"},
		{svcPort{Namespace: "kube-system", Name: "kube-dns", PortName: "dns", Protocol: "udp"}, "KUBE-SVC-TCOU7JCQXEZGVUNU"},
		{svcPort{Namespace: "kube-system", Name: "kube-dns", PortName: "dns-tcp", Protocol: "tcp"}, "KUBE-SVC-ERIFXISQEP7F7OF4"},
		{svcPort{Namespace: "kube-system", Name: "kube-dns", PortName: "metrics", Protocol: "tcp"}, "KUBE-SVC-JD5MR3NA4I4DYORP"},
	} {
		if got := tc.port.svcChain(); got != tc.want {
			t.Errorf("%s/%s: chain %s, want %s", tc.port.name(), tc.port.Protocol, got, tc.want)
		}
	}
}

// TestServices runs the service cases on one cluster, in order, with pod-to-pod checks
// before, between and after them.
func TestServices(t *testing.T) {
	ctx := testCtx(t)
	c := newSvcCluster(t, ctx)
	web := c.svcs[0]

	t.Run("kube-proxy-rules", func(t *testing.T) {
		// What iptables-save prints for kube-proxy's rules is well known from every
		// cluster; the kernel's normalised form of ours must read the same.
		out, err := c.n1.Exec(ctx, "iptables-save", "-t", "nat")
		if err != nil {
			t.Fatal(err)
		}
		sorted := slices.Clone(web.Endpoints)
		sepA, sepB := web.sepChain(sorted[0]), web.sepChain(sorted[1])
		for _, line := range []string{
			`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
			`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
			`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`,
			`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000`,
			`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN`,
			`-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0`,
			`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`,
			`-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j ` + web.svcChain(),
			`-A ` + web.svcChain() + ` ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ`,
			`-A ` + web.svcChain() + ` -m comment --comment "default/web:http -> ` + sorted[0].String() + `" -m statistic --mode random --probability 0.50000000000 -j ` + sepA,
			`-A ` + web.svcChain() + ` -m comment --comment "default/web:http -> ` + sorted[1].String() + `" -j ` + sepB,
			`-A ` + sepA + ` -s ` + sorted[0].Addr().String() + `/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ`,
			`-A ` + sepA + ` -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination ` + sorted[0].String(),
			`-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j ` + web.extChain(),
			`-A ` + web.extChain() + ` -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ`,
			`-A ` + web.extChain() + ` -j ` + web.svcChain(),
			`-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`,
		} {
			if !strings.Contains(string(out), line+"\n") {
				t.Errorf("iptables-save -t nat on node1 lacks\n\t%s", line)
			}
		}
		if t.Failed() {
			t.Logf("iptables-save -t nat:\n%s", out)
		}
	})

	t.Run("redirect-before", func(t *testing.T) { c.checkRedirect(t, ctx) })

	t.Run("clusterip-same-node", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		before := c.counters(t, ctx)
		c.checkService(t, ctx, c.c1, svcWebN1, c.b1)
		r := c.svcGet(t, ctx, c.c1, svcWebN1.String(), svcHTTPPort, "/bytes/50000000", 30*time.Second)
		if r.Bytes != 50_000_000 {
			t.Errorf("downloaded %d bytes through %s, want 50000000", r.Bytes, svcWebN1)
		}
		after := c.counters(t, ctx)
		nat := svcGrew(before, after, 1, "to_host_nat")
		t.Logf("50 MB in %.2fs; node1 to_host_nat +%d packets, +%d bytes", r.Seconds, nat.Packets, nat.Bytes)
		// Every reply of b1 to c1 belongs to a DNATed connection: none may be
		// redirected past the stack.
		if nat.Bytes < 50_000_000 {
			t.Errorf("node1 to_host_nat grew by %d bytes while b1 sent 50 MB through the service", nat.Bytes)
		}
	})

	t.Run("clusterip-other-node", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		before := c.counters(t, ctx)
		c.checkService(t, ctx, c.c1, svcWebN2, c.b2)
		// GSO packets of the backend cross the tunnel whole and must survive the
		// decap-to-stack path and the forwarding after it.
		r := c.svcGet(t, ctx, c.c1, svcWebN2.String(), svcHTTPPort, "/bytes/50000000", 30*time.Second)
		if r.Bytes != 50_000_000 {
			t.Errorf("downloaded %d bytes through %s, want 50000000", r.Bytes, svcWebN2)
		}
		after := c.counters(t, ctx)
		nat := svcGrew(before, after, 1, "to_host_nat")
		t.Logf("50 MB in %.2fs; node1 to_host_nat +%d packets, +%d bytes, decap +%d packets; node1 encap +%d; node2 encap +%d",
			r.Seconds, nat.Packets, nat.Bytes, svcGrew(before, after, 1, "decap").Packets,
			svcGrew(before, after, 1, "encap").Packets, svcGrew(before, after, 2, "encap").Packets)
		if nat.Bytes < 50_000_000 {
			t.Errorf("node1 to_host_nat grew by %d bytes while b2 sent 50 MB through the service", nat.Bytes)
		}
		// The DNATed requests leave node1 through to_uplink; b2's replies through
		// from_pod on node2.
		if got := svcGrew(before, after, 1, "encap").Packets; got == 0 {
			t.Error("node1 encapsulated nothing: the DNATed requests did not cross to node2 through to_uplink")
		}
		if got := svcGrew(before, after, 2, "encap").Bytes; got < 50_000_000 {
			t.Errorf("node2 encapsulated %d bytes while b2 sent 50 MB to c1", got)
		}
	})

	// A reply of 4000 bytes leaves the backend in fragments; conntrack cannot be
	// asked about fragments on the fast path, so they cross the stack, which
	// reassembles them and reverses the DNAT.
	for _, svc := range []struct {
		name    string
		ip      netip.Addr
		backend *lab.Pod
	}{{"same-node", svcWebN1, c.b1}, {"other-node", svcWebN2, c.b2}} {
		t.Run("clusterip-udp-fragmented-"+svc.name, func(t *testing.T) {
			defer c.explainFailure(t, ctx)()
			before := c.counters(t, ctx)
			u := c.svcUDP(t, ctx, c.c1, svc.ip.String(), svcDNSPort, "big 4000")
			if want := netip.AddrPortFrom(svc.ip, svcDNSPort).String(); u.From != want || u.Bytes != 4000 {
				t.Errorf("fragmented UDP reply through %s: %d bytes from %s, want 4000 from %s", svc.ip, u.Bytes, u.From, want)
			}
			if who := strings.Fields(u.Body); len(who) == 0 || who[0] != svc.backend.Name {
				t.Errorf("fragmented UDP reply through %s: answered %q, want %s", svc.ip, u.Body, svc.backend.Name)
			}
			if got := svcGrew(before, c.counters(t, ctx), 1, "to_host_untracked").Packets; got < 3 {
				t.Errorf("node1 to_host_untracked grew by %d packets, want the reply's 3 fragments at least", got)
			}
		})
	}

	t.Run("clusterip-from-other-node-client", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		// The mirror image: the service is NATed on node2, the backend on node1.
		c.checkService(t, ctx, c.c2, svcWebN1, c.b1)
	})

	t.Run("redirect-during", func(t *testing.T) { c.checkRedirect(t, ctx) })

	t.Run("clusterip-many-connections", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		const n = 200
		r, err := c.svcClient(ctx, c.c1, "many", svcWeb.String(), strconv.Itoa(svcHTTPPort), strconv.Itoa(n), "5")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%d of %d GETs through %s answered: %v", r.OK, n, svcWeb, r.Names)
		if r.OK != n {
			t.Errorf("%d of %d connections through %s failed; first errors: %v", n-r.OK, n, svcWeb, r.Errors)
		}
		// Two endpoints at probability 0.5: both answer 200 connections unless
		// one path is broken (a miss happens with probability 2^-199).
		for _, b := range []string{"b1", "b2"} {
			if r.Names[b] == 0 {
				t.Errorf("backend %s answered none of %d connections through %s: %v", b, n, svcWeb, r.Names)
			}
		}
		// Every connection was closed by both sides, so node1's conntrack, which
		// NATed them, must have seen each through to its end: an entry left
		// unreplied or half open means a direction bypassed the stack.
		var states map[string]int
		err = lab.WaitFor(ctx, "conntrack entries of "+svcWeb.String()+" to close", func(ctx context.Context) error {
			states = svcConntrackStates(t, ctx, c.n1, svcWeb)
			var stale []string
			for _, st := range []string{"UNREPLIED", "SYN_SENT", "SYN_RECV", "ESTABLISHED"} {
				if states[st] > 0 {
					stale = append(stale, fmt.Sprintf("%s: %d", st, states[st]))
				}
			}
			if len(stale) > 0 {
				return errors.New(strings.Join(stale, ", "))
			}
			return nil
		})
		t.Logf("node1 conntrack entries for %s by state: %v", svcWeb, states)
		if err != nil {
			t.Error(err)
		}
		if states["total"] < n {
			t.Errorf("node1 conntrack holds %d entries for %s after %d connections", states["total"], svcWeb, n)
		}
	})

	t.Run("node-to-clusterip", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		// The node's own connections are masqueraded by KUBE-SVC (source outside the
		// cluster CIDR), so the backends see the node's address.
		for _, tc := range []struct {
			ip   netip.Addr
			want *lab.Pod
		}{{svcWebN1, c.b1}, {svcWebN2, c.b2}} {
			r, err := c.svcClient(ctx, c.n1, "get", tc.ip.String(), strconv.Itoa(svcHTTPPort), "/", "5")
			if err != nil {
				t.Errorf("node1 -> %s (backend %s): %v", tc.ip, tc.want.Name, err)
				continue
			}
			if r.who() != tc.want.Name || r.peerIP() != c.n1.IP.String() {
				t.Errorf("node1 -> %s: got %q, want %s to answer and see %s", tc.ip, r.Body, tc.want.Name, c.n1.IP)
			}
		}
	})

	t.Run("node-to-pod", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		// A node reaching pods directly (kubelet probes on its own node; an
		// apiserver or a hostNetwork scraper on another): no NAT, and the pod sees
		// the node's address.
		for _, tc := range []struct {
			from *lab.Node
			to   *lab.Pod
		}{{c.n1, c.b1}, {c.n2, c.b1}, {c.n1, c.b2}} {
			r, err := c.svcClient(ctx, tc.from, "get", tc.to.IP.String(), strconv.Itoa(svcBackendTCP), "/", "5")
			if err != nil {
				t.Errorf("node%d -> %s on node%d: %v", tc.from.Index, tc.to.Name, tc.to.Node.Index, err)
				continue
			}
			if r.who() != tc.to.Name || r.peerIP() != tc.from.IP.String() {
				t.Errorf("node%d -> %s: got %q, want %s to answer and see %s", tc.from.Index, tc.to.Name, r.Body, tc.to.Name, tc.from.IP)
			}
		}
	})

	t.Run("nodeport-from-other-node", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		// node2 reaches node1's NodePorts; node1 DNATs and masquerades.
		for _, tc := range []struct {
			port int
			want *lab.Pod
		}{{svcNodePortWebN1, c.b1}, {svcNodePortWebN2, c.b2}} {
			r, err := c.svcClient(ctx, c.n2, "get", c.n1.IP.String(), strconv.Itoa(tc.port), "/", "5")
			if err != nil {
				t.Errorf("node2 -> %s:%d (backend %s on node%d): %v", c.n1.IP, tc.port, tc.want.Name, tc.want.Node.Index, err)
				continue
			}
			if r.who() != tc.want.Name || r.peerIP() != c.n1.IP.String() {
				t.Errorf("node2 -> %s:%d: got %q, want %s to answer and see %s (KUBE-EXT masquerades)", c.n1.IP, tc.port, r.Body, tc.want.Name, c.n1.IP)
			}
		}
	})

	t.Run("hairpin", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		// A backend reaching itself through its service: KUBE-SEP masquerades it,
		// or its own reply would go straight back to itself.
		for _, tc := range []struct {
			self *lab.Pod
			ip   netip.Addr
		}{{c.b1, svcWebN1}, {c.b2, svcWebN2}} {
			r, err := c.svcClient(ctx, tc.self, "get", tc.ip.String(), strconv.Itoa(svcHTTPPort), "/", "5")
			if err != nil {
				t.Errorf("%s -> %s (itself): %v", tc.self.Name, tc.ip, err)
				continue
			}
			if r.who() != tc.self.Name || r.peerIP() == tc.self.IP.String() {
				t.Errorf("%s -> %s: got %q, want %s to answer a masqueraded peer", tc.self.Name, tc.ip, r.Body, tc.self.Name)
			}
			u := c.svcUDP(t, ctx, tc.self, tc.ip.String(), svcDNSPort)
			if want := netip.AddrPortFrom(tc.ip, svcDNSPort).String(); u.From != want {
				t.Errorf("%s -> %s:%d (itself, UDP): reply from %s, want %s", tc.self.Name, tc.ip, svcDNSPort, u.From, want)
			}
		}
	})

	t.Run("masquerade", func(t *testing.T) {
		defer c.explainFailure(t, ctx)()
		outside := svcOutsideIP.String()
		// On: the outside host answers the node, which it can reach.
		r := c.svcGet(t, ctx, c.c1, outside, svcBackendTCP, "/", 5*time.Second)
		if r.peerIP() != c.n1.IP.String() {
			t.Errorf("outside host saw %s, want node1's %s (masquerade)", r.peer(), c.n1.IP)
		}
		// Inside the cluster nothing is masqueraded: a pod on another node and
		// another node see the pod's own address.
		if r, err := c.svcClient(ctx, c.c1, "get", c.b2.IP.String(), strconv.Itoa(svcBackendTCP), "/", "5"); err != nil {
			t.Errorf("c1 -> b2 directly: %v", err)
		} else if r.peerIP() != c.c1.IP.String() {
			t.Errorf("b2 saw c1 as %s, want %s (pod-to-pod is never masqueraded)", r.peer(), c.c1.IP)
		}
		if r, err := c.svcClient(ctx, c.c1, "get", c.n2.IP.String(), strconv.Itoa(svcNodeServerPort), "/", "5"); err != nil {
			t.Errorf("c1 -> node2 %s:%d: %v", c.n2.IP, svcNodeServerPort, err)
		} else if r.peerIP() != c.c1.IP.String() {
			t.Errorf("node2 saw c1 as %s, want %s (pod-to-node is never masqueraded)", r.peer(), c.c1.IP)
		}

		// Off: the chain goes, and the outside host cannot answer a pod address.
		c.restartAgent(t, ctx, 1, "--masquerade=false")
		if svcMasqChain(t, ctx, c.n1) {
			t.Error("PATCHCORD-MASQ still in node1's nat table with --masquerade=false")
		}
		if r, err := c.svcClient(ctx, c.c1, "get", outside, strconv.Itoa(svcBackendTCP), "/", "2"); err == nil {
			t.Errorf("c1 reached the outside host without masquerade: %q (it has no route to pods)", r.Body)
		}

		// On again: back as it was.
		c.restartAgent(t, ctx, 1)
		if !svcMasqChain(t, ctx, c.n1) {
			t.Error("PATCHCORD-MASQ missing from node1's nat table after restarting with masquerade")
		}
		r = c.svcGet(t, ctx, c.c1, outside, svcBackendTCP, "/", 5*time.Second)
		if r.peerIP() != c.n1.IP.String() {
			t.Errorf("outside host saw %s after masquerade came back, want %s", r.peer(), c.n1.IP)
		}
	})

	t.Run("redirect-after", func(t *testing.T) { c.checkRedirect(t, ctx) })
}
