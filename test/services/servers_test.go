// The servers and clients the service tests run in pods and nodes: small
// Python scripts that say who answered and whom they saw.
package services

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
)

// ---- servers and clients -----------------------------------------------------------------

// serverScript answers HTTP GET / with "<name> <peer ip>:<port>", GET /bytes/N with N
// bytes, and each UDP datagram with "<name> <peer ip>:<port>", so that clients can tell
// which backend answered and from which address it saw them. It binds UDP before it
// listens on TCP: a listening TCP port means both are up.
const serverScript = `
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

// clientScript is the client side, one JSON line per run:
//
//	get HOST PORT PATH TIMEOUT    {"status", "body", "bytes"}
//	many HOST PORT N TIMEOUT      N GETs of /, one connection each: {"ok", "names", "errors", "ports"}
//	udp HOST PORT TIMEOUT [DATA]  {"from": "ip:port", "body", "bytes"}
//
// http.client rather than urllib: no proxy from the environment can get in the way.
const clientScript = `
import http.client, json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def get(path, timeout):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        local_port = c.sock.getsockname()[1]
        r = c.getresponse()
        n, body = 0, b""
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            if len(body) < 256:
                body += chunk[:256]
        return r.status, body.decode(errors="replace").strip(), n, local_port
    finally:
        c.close()

if mode == "get":
    start = time.monotonic()
    status, body, n, _ = get(sys.argv[4], float(sys.argv[5]))
    print(json.dumps({"status": status, "body": body if n < 256 else "", "bytes": n,
                      "seconds": time.monotonic() - start}))
elif mode == "many":
    count, timeout = int(sys.argv[4]), float(sys.argv[5])
    ok, names, errors, ports = 0, {}, [], []
    for i in range(count):
        try:
            status, body, _, local_port = get("/", timeout)
            ports.append(local_port)
            if status != 200:
                raise Exception("status %d" % status)
            who = body.split()[0]
            names[who] = names.get(who, 0) + 1
            ok += 1
        except Exception as e:
            errors.append("%d: %r" % (i, e))
    print(json.dumps({"ok": ok, "names": names, "errors": errors[:10], "ports": ports}))
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(float(sys.argv[4]))
    s.sendto(sys.argv[5].encode() if len(sys.argv) > 5 else b"ping", (host, port))
    data, peer = s.recvfrom(65535)
    print(json.dumps({"from": "%s:%d" % peer, "body": data.decode().rstrip(), "bytes": len(data)}))
`

// python is Debian's python3 when present: the pyenv shim on PATH costs a shell
// script per start.
func python() string {
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return "python3"
}

// host is a pod or a node that serves.
type host interface {
	Exec(context.Context, string, ...string) ([]byte, error)
	Start(context.Context, string, ...string) (*lab.Process, error)
	WaitListening(context.Context, int) error
}

// serve starts the server script as name in e, on TCP tcpPort and (if not 0) UDP
// udpPort, and returns once it listens.
func (c *serviceLab) serve(t *testing.T, ctx context.Context, e host, name string, tcpPort, udpPort int) *lab.Process {
	t.Helper()
	args := []string{c.serverPy, name, strconv.Itoa(tcpPort)}
	if udpPort != 0 {
		args = append(args, strconv.Itoa(udpPort))
	}
	p, err := e.Start(ctx, python(), args...)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitListening(ctx, tcpPort); err != nil {
		out, _ := p.Output()
		t.Fatalf("server %s: %v\n%s", name, err, out)
	}
	return p
}

// serverReply is a client's answer.
type serverReply struct {
	Status  int            `json:"status"`
	Body    string         `json:"body"`
	Bytes   int64          `json:"bytes"`
	Seconds float64        `json:"seconds"`
	OK      int            `json:"ok"`
	Names   map[string]int `json:"names"`
	Errors  []string       `json:"errors"`
	Ports   []int          `json:"ports"`
	From    string         `json:"from"`
}

// who is the backend name in a body "<name> <peer>"; peer the address it saw.
func (r serverReply) who() string  { f := strings.Fields(r.Body); return field(f, 0) }
func (r serverReply) peer() string { f := strings.Fields(r.Body); return field(f, 1) }

func field(f []string, i int) string {
	if i < len(f) {
		return f[i]
	}
	return ""
}

// peerIP is the address part of peer().
func (r serverReply) peerIP() string {
	ap, err := netip.ParseAddrPort(r.peer())
	if err != nil {
		return r.peer()
	}
	return ap.Addr().String()
}

// runClient runs the client script in e and parses its answer.
func (c *serviceLab) runClient(ctx context.Context, e host, args ...string) (serverReply, error) {
	var r serverReply
	out, err := e.Exec(ctx, python(), append([]string{c.clientPy}, args...)...)
	if err != nil {
		return r, fmt.Errorf("client %s: %w", strings.Join(args, " "), err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		return r, fmt.Errorf("client %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return r, nil
}

// httpGet is one HTTP GET of path from e that must succeed within timeout.
func (c *serviceLab) httpGet(t *testing.T, ctx context.Context, e host, host string, port int, path string, timeout time.Duration) serverReply {
	t.Helper()
	r, err := c.runClient(ctx, e, "get", host, strconv.Itoa(port), path, secondsArg(timeout))
	if err != nil {
		t.Fatalf("GET http://%s:%d%s: %v", host, port, path, err)
	}
	if r.Status != 200 {
		t.Fatalf("GET http://%s:%d%s: status %d", host, port, path, r.Status)
	}
	return r
}

// udpQuery sends one datagram from e ("ping", or payload) and returns the
// reply, which must come within 3s.
func (c *serviceLab) udpQuery(t *testing.T, ctx context.Context, e host, host string, port int, payload ...string) serverReply {
	t.Helper()
	r, err := c.runClient(ctx, e, append([]string{"udp", host, strconv.Itoa(port), "3"}, payload...)...)
	if err != nil {
		t.Fatalf("UDP %s:%d: %v", host, port, err)
	}
	return r
}

func secondsArg(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) }
