// The agent's Prometheus metrics, scraped the way Prometheus would, from
// inside the node: the datapath counters move with traffic, and the
// endpoint and node counts follow the maps.
package cli

import (
	"path/filepath"
	"strconv"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/pkg/nodes"
)

func TestMetrics(t *testing.T) {
	l := e2e.NewLab(t)
	ctx := e2e.Ctx(t)
	n := e2e.AddNodes(t, l, 1)[0]
	// A remote node that does not exist: the map holds it all the same.
	remote := nodes.Entry{Name: "remote", NodeIP: "198.18.0.2", PodCIDR: "10.244.2.0/24"}
	nodesFile := filepath.Join(l.Dir, "nodes.json")
	e2e.WriteNodes(t, nodesFile, e2e.EntryOf(n), remote)
	addr := "127.0.0.1:" + strconv.Itoa(e2e.MetricsPort)
	agent := e2e.StartAgent(t, ctx, n, nodesFile, "--metrics-addr", addr)
	if err := agent.WaitListening(ctx, e2e.MetricsPort); err != nil {
		t.Fatal(err)
	}
	e2e.WriteConflist(t, n, "patchcord", n.PrimaryConflist())
	p1 := e2e.AddPod(t, ctx, n, "p1", "patchcord")
	p2 := e2e.AddPod(t, ctx, n, "p2", "patchcord")
	e2e.Ping(t, ctx, p1, p2.IP.String())

	// The node's loopback is reachable only from inside the node.
	out, err := n.Exec(ctx, "curl", "-fsS", "--max-time", "10", "http://"+addr+"/metrics")
	if err != nil {
		t.Fatalf("scrape %s in %s: %v", addr, n.NetNS, err)
	}
	got := e2e.ScrapeMetrics(t, out)
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
	cli := e2e.Stats(t, ctx, n)
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
	if v := e2e.ScrapeMetrics(t, out)["patchcord_endpoints"]; v != 1 {
		t.Errorf("patchcord_endpoints = %v after a DEL, want 1", v)
	}
}
