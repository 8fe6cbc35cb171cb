// Traffic through a lab: ping and iperf3 from a pod or a node.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/patchcord/patchcord/internal/lab"
)

// Execer is a pod or a node: something commands run in.
type Execer interface {
	Exec(ctx context.Context, name string, args ...string) ([]byte, error)
}

// IPJSON runs `ip -j args...` in e's namespace and decodes its output into
// v; it returns the raw output for failure messages.
func IPJSON(t *testing.T, ctx context.Context, e Execer, v any, args ...string) []byte {
	t.Helper()
	out, err := e.Exec(ctx, "ip", append([]string{"-j"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("ip -j %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// Starter runs background commands too.
type Starter interface {
	Execer
	Start(ctx context.Context, name string, args ...string) (*lab.Process, error)
}

// Ping sends 3 pings from from to dst and fails the test on any loss.
func Ping(t *testing.T, ctx context.Context, from Execer, dst string, args ...string) {
	t.Helper()
	if err := PingErr(ctx, from, dst, 3, args...); err != nil {
		t.Fatal(err)
	}
}

// PingErr sends count pings 0.2 s apart and says why not all came back;
// unlike Ping it may run in a goroutine. args come last ("-i", "0.05").
func PingErr(ctx context.Context, from Execer, dst string, count int, args ...string) error {
	out, err := from.Exec(ctx, "ping", append([]string{"-q", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "2", dst}, args...)...)
	if err != nil || !strings.Contains(string(out), " 0% packet loss") {
		return fmt.Errorf("ping %s: %v\n%s", dst, err, out)
	}
	return nil
}

// PingMesh pings every ordered pair of pods at once (at most 8 pings in
// flight), count pings each with args, and fails t for each pair that lost
// one. It returns how many echo requests it sent.
func PingMesh(t *testing.T, ctx context.Context, pods []*lab.Pod, count int, args ...string) int {
	t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sent int
	)
	sem := make(chan struct{}, 8)
	for _, from := range pods {
		for _, to := range pods {
			if from == to {
				continue
			}
			sent += count
			wg.Go(func() {
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := PingErr(ctx, from, to.IP.String(), count, args...); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s -> %s: %w", from.NetNS, to.NetNS, err))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	return sent
}

// PingRedirected pings dst from from count times, 10 ms apart, and checks
// that node n redirected every request and reply past its stack.
func PingRedirected(t *testing.T, ctx context.Context, n *lab.Node, from Execer, dst netip.Addr, count int) {
	t.Helper()
	before := Stats(t, ctx, n)
	if err := PingErr(ctx, from, dst.String(), count, "-i", "0.01"); err != nil {
		t.Fatal(err)
	}
	if got := Delta(before, Stats(t, ctx, n), "local_redirect").Packets; got < uint64(2*count) {
		t.Errorf("%s: local_redirect grew by %d for %d pings to %s: want at least %d (the fast path)", n.NetNS, got, count, dst, 2*count)
	}
}

// NoPing sends count pings and reports an error if any is answered.
func NoPing(ctx context.Context, from Execer, dst string, count int) error {
	out, err := from.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "1", dst)
	if err == nil || !strings.Contains(string(out), " 100% packet loss") {
		return fmt.Errorf("ping %s: want no reply, got: %v\n%s", dst, err, out)
	}
	return nil
}

// Iperf is what we read of `iperf3 -J` (3.12 and later).
type Iperf struct {
	Intervals []struct {
		Sum IperfSum `json:"sum"`
	} `json:"intervals"`
	End struct {
		Sum         IperfSum `json:"sum"`
		SumSent     IperfSum `json:"sum_sent"`
		SumReceived IperfSum `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// IperfSum is one of iperf3's totals.
type IperfSum struct {
	Bytes         uint64  `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
	Packets       int64   `json:"packets"`
	LostPackets   int64   `json:"lost_packets"`
}

// Gbps is the received rate.
func (r Iperf) Gbps() float64 { return r.End.SumReceived.BitsPerSecond / 1e9 }

// ParseIperf parses iperf3 -J output; an iperf3 error (also one with exit
// status 0), or a run that moved nothing, is returned as an error.
func ParseIperf(out []byte, runErr error) (Iperf, error) {
	var r Iperf
	// -J prints one JSON object; anything before it (nsenter, a warning) is skipped.
	start := strings.IndexByte(string(out), '{')
	if start < 0 {
		return r, fmt.Errorf("iperf3: no JSON output: %v\n%s", runErr, out)
	}
	if err := json.Unmarshal(out[start:], &r); err != nil {
		return r, fmt.Errorf("iperf3: parse JSON: %v (run: %v)\n%s", err, runErr, out)
	}
	if r.Error != "" || runErr != nil {
		return r, fmt.Errorf("iperf3: %s (run: %v)", r.Error, runErr)
	}
	return r, nil
}

// IperfErr runs an iperf3 client in from against dst:port with args (-t 2,
// -R, -u) and returns its result.
func IperfErr(ctx context.Context, from Execer, dst string, port int, args ...string) (Iperf, error) {
	out, err := from.Exec(ctx, "iperf3", append([]string{"-c", dst, "-p", strconv.Itoa(port), "-J", "--connect-timeout", "5000"}, args...)...)
	r, err := ParseIperf(out, err)
	if err == nil && r.End.SumReceived.Bytes == 0 && r.End.Sum.Bytes == 0 {
		err = fmt.Errorf("iperf3 moved nothing:\n%s", out)
	}
	if err != nil {
		return r, fmt.Errorf("iperf3 to %s:%d: %w", dst, port, err)
	}
	return r, nil
}

// IperfRun is IperfErr that fails the test.
func IperfRun(t *testing.T, ctx context.Context, from Execer, dst string, port int, args ...string) Iperf {
	t.Helper()
	r, err := IperfErr(ctx, from, dst, port, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// IperfServer starts an iperf3 server on port in p and returns once it
// listens; it stops with the test.
func IperfServer(t *testing.T, ctx context.Context, p Starter, port int) *lab.Process {
	t.Helper()
	s, err := p.Start(ctx, "iperf3", "-s", "-p", strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(ctx, fmt.Sprintf("iperf3 listening on :%d", port), func(ctx context.Context) error {
		select {
		case <-s.Done():
			out, _ := s.Output()
			return fmt.Errorf("iperf3 server exited: %s", out)
		default:
		}
		out, err := p.Exec(ctx, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if err != nil || len(strings.TrimSpace(string(out))) == 0 {
			return fmt.Errorf("not listening: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// DefaultGateway is the gateway of a pod's default route: 169.254.1.1 in
// primary mode, the first address of the pod CIDR with ptp.
func DefaultGateway(t *testing.T, ctx context.Context, p Execer) string {
	t.Helper()
	var routes []struct {
		Gateway string `json:"gateway"`
	}
	out := IPJSON(t, ctx, p, &routes, "-4", "route", "show", "default")
	if len(routes) != 1 || routes[0].Gateway == "" {
		t.Fatalf("want one default route with a gateway:\n%s", out)
	}
	return routes[0].Gateway
}
