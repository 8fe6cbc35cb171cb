// The agent's Prometheus metrics, scraped the way Prometheus would, from
// inside the node: the datapath counters move with traffic, and the
// endpoint and node counts follow the maps.
package test

import (
	"bufio"
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// metricsPort is where the agent serves metrics; each lab node has its own
// loopback, so every test can use the same port.
const metricsPort = 9964

// scrapeMetrics fetches the node's metrics from inside its namespace and
// returns each sample by name and labels as printed, e.g.
// `patchcord_datapath_packets_total{counter="encap"}`.
func scrapeMetrics(t *testing.T, out []byte) map[string]float64 {
	t.Helper()
	samples := make(map[string]float64)
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("bad sample line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

func TestMetrics(t *testing.T) {
	l := newLab(t)
	ctx := testCtx(t)
	n, err := l.AddNode(1)
	if err != nil {
		t.Fatal(err)
	}
	// A remote node that does not exist: the map holds it all the same.
	remote := nodeEntry{Name: "remote", NodeIP: "198.18.0.2", PodCIDR: "10.244.2.0/24"}
	nodesFile := filepath.Join(l.Dir, "nodes.json")
	writeNodes(t, nodesFile, entryOf(n), remote)
	addr := "127.0.0.1:" + strconv.Itoa(metricsPort)
	agent := startAgent(t, ctx, n, nodesFile, "--metrics-addr", addr)
	if err := agent.WaitListening(ctx, metricsPort); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
		t.Fatal(err)
	}
	p1, err := n.AddPod(ctx, "p1", "patchcord")
	if err != nil {
		t.Fatal(err)
	}
	p2, err := n.AddPod(ctx, "p2", "patchcord")
	if err != nil {
		t.Fatal(err)
	}
	ping(t, ctx, p1, p2.IP.String())

	// The node's loopback is reachable only from inside the node.
	out, err := n.Exec(ctx, "curl", "-fsS", "--max-time", "10", "http://"+addr+"/metrics")
	if err != nil {
		t.Fatalf("scrape %s in %s: %v", addr, n.NetNS, err)
	}
	got := scrapeMetrics(t, out)
	if v := got[`patchcord_datapath_packets_total{counter="local_redirect"}`]; v == 0 {
		t.Errorf("local_redirect packets = 0 after pod-to-pod pings\n%s", out)
	}
	if v := got[`patchcord_datapath_bytes_total{counter="local_redirect"}`]; v == 0 {
		t.Errorf("local_redirect bytes = 0 after pod-to-pod pings")
	}
	for name, want := range map[string]float64{
		"patchcord_datapath_loaded":   1,
		"patchcord_endpoints":         2,
		"patchcord_nodes":             1, // the node's own entry is skipped
		"patchcord_sync_errors_total": 0,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", name, v, ok, want)
		}
	}
	// The CLI and the metrics read the same counters.
	cli := stats(t, ctx, n)
	if m := got[`patchcord_datapath_packets_total{counter="arp_reply"}`]; m == 0 || uint64(m) > cli["arp_reply"].Packets {
		t.Errorf("arp_reply: metrics %v, CLI later %d", m, cli["arp_reply"].Packets)
	}

	// Endpoints follow the map: a deleted pod is gone from the next scrape.
	if err := p2.Del(ctx); err != nil {
		t.Fatal(err)
	}
	out, err = n.Exec(ctx, "curl", "-fsS", "--max-time", "10", "http://"+addr+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v := scrapeMetrics(t, out)["patchcord_endpoints"]; v != 1 {
		t.Errorf("patchcord_endpoints = %v after a DEL, want 1", v)
	}
}
