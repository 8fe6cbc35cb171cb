package crossnode

import (
	"context"
	"regexp"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// fragNeeded is how ping reports the ICMP "fragmentation needed" it got, or
// the path MTU it learnt from it: the pod MTU, 1450.
var fragNeeded = regexp.MustCompile(`mtu ?= ?1450`)

// TestPathMTU: a pod whose interface MTU is larger than the pod MTU (its
// own setting, or a conflist's "mtu") sends packets that would not fit the
// uplink once encapsulated. A DF packet must get ICMP "fragmentation needed"
// back, never vanish; the rest is fragmented and crosses; packets of the pod
// MTU are encapsulated as ever.
func TestPathMTU(t *testing.T) {
	c, ctx := e2e.NewPair(t)
	n1, p1, p2 := c.Nodes[0], c.Pod(1, 0), c.Pod(2, 0)
	veth := e2e.Endpoints(t, ctx, n1)[p1.IP.String()].Ifname
	for _, set := range []struct {
		e   e2e.Execer
		dev string
	}{{p1, "eth0"}, {n1, veth}} {
		if out, err := set.e.Exec(ctx, "ip", "link", "set", set.dev, "mtu", "1500"); err != nil {
			t.Fatalf("set %s mtu 1500: %v\n%s", set.dev, err, out)
		}
	}
	dst := p2.IP.String()
	wantFragNeeded(t, ctx, n1, p1, dst)

	// Without DF the node fragments what the pod sent; each fragment is
	// encapsulated, and p2 reassembles the echo request.
	before := e2e.Stats(t, ctx, n1)
	e2e.Ping(t, ctx, p1, dst, "-M", "dont", "-s", "1472")
	if enc := e2e.Delta(before, e2e.Stats(t, ctx, n1), "encap"); enc.Packets < 6 {
		t.Errorf("%d packets encapsulated for 3 fragmented echo requests, want >= 6", enc.Packets)
	}

	// As long as the pod MTU: the fast path, as ever.
	before = e2e.Stats(t, ctx, n1)
	e2e.Ping(t, ctx, p1, dst, "-M", "do", "-s", "1422")
	if d := e2e.Delta(before, e2e.Stats(t, ctx, n1), "to_host_too_big"); d.Packets != 0 {
		t.Errorf("%d packets of the pod MTU counted to_host_too_big", d.Packets)
	}
}

// wantFragNeeded: a 1500-byte DF packet from a pod with the uplink's MTU,
// 1550 bytes encapsulated, must come back refused with the tunnel's MTU, the
// node's from_pod having left it to the stack.
func wantFragNeeded(t *testing.T, ctx context.Context, n *lab.Node, from *lab.Pod, dst string) {
	t.Helper()
	before := e2e.Stats(t, ctx, n)
	out, err := from.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1472", dst)
	if err == nil || !fragNeeded.Match(out) {
		t.Errorf("ping -M do -s 1472 %s: %v; want it refused with the path MTU 1450:\n%s", dst, err, out)
	}
	if big := e2e.Delta(before, e2e.Stats(t, ctx, n), "to_host_too_big"); big.Packets == 0 {
		t.Errorf("%s: no packet counted to_host_too_big", n.NetNS)
	}
}
