package metrics

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/internal/promtext"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// scrape fetches url and returns every sample by its name and labels as
// printed, e.g. `patchcord_datapath_packets_total{counter="encap"}`.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s\n%s", url, resp.Status, body)
	}
	return parse(t, string(body))
}

// parse reads the Prometheus text format.
func parse(t *testing.T, text string) map[string]float64 {
	t.Helper()
	samples, err := promtext.Parse(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return samples
}

func statID(t *testing.T, name string) uint32 {
	t.Helper()
	i := slices.Index(datapath.StatNames(), name)
	if i < 0 {
		t.Fatalf("no counter %s in %v", name, datapath.StatNames())
	}
	return uint32(i)
}

func TestNotLoaded(t *testing.T) {
	m := New(datapathtest.MustBPFFS(t), datapathtest.Logger(t))
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	got := scrape(t, srv.URL)
	if v, ok := got[Loaded]; !ok || v != 0 {
		t.Errorf("%s = %v (present %v), want 0", Loaded, v, ok)
	}
	for name := range got {
		if strings.HasPrefix(name, Endpoints) || strings.HasPrefix(name, PacketsTotal) {
			t.Errorf("%s served without a datapath", name)
		}
	}
}

func TestScrape(t *testing.T) {
	dp := datapathtest.MustOpen(t)
	m := New(dp.Root, datapathtest.Logger(t))
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()

	eps := bpfmaps.NewEndpoints(&dp.Maps)
	for i, ip := range []string{"10.244.1.2", "10.244.1.3", "10.244.1.4"} {
		err := eps.Put(bpfmaps.EndpointInfo{
			IP: netip.MustParseAddr(ip), Ifindex: 100 + i, Ifname: "pc" + strconv.Itoa(i),
			MAC: net.HardwareAddr{2, 0, 0, 0, 0, byte(i)}, HostMAC: net.HardwareAddr{2, 0, 0, 0, 1, byte(i)},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	nodes := bpfmaps.NewNodes(&dp.Maps)
	for _, n := range []bpfmaps.Node{
		{PodCIDR: netip.MustParsePrefix("10.244.2.0/24"), NodeIP: netip.MustParseAddr("198.18.0.2")},
		{PodCIDR: netip.MustParsePrefix("10.244.3.0/24"), NodeIP: netip.MustParseAddr("198.18.0.3")},
	} {
		if err := nodes.Put(n); err != nil {
			t.Fatal(err)
		}
	}
	// Per-CPU values: the metric is their sum.
	perCPU := make([]datapath.StatCounter, ebpf.MustPossibleCPU())
	perCPU[0] = datapath.StatCounter{Packets: 3, Bytes: 300}
	perCPU[len(perCPU)-1].Packets += 4
	perCPU[len(perCPU)-1].Bytes += 400
	if err := dp.Maps.Stats.Put(statID(t, "local_redirect"), perCPU); err != nil {
		t.Fatal(err)
	}
	m.SyncError()
	m.SyncError()

	got := scrape(t, srv.URL)
	for name, want := range map[string]float64{
		Loaded:          1,
		Endpoints:       3,
		Nodes:           2,
		SyncErrorsTotal: 2,
		PacketsTotal + `{counter="local_redirect"}`: 7,
		BytesTotal + `{counter="local_redirect"}`:   700,
		PacketsTotal + `{counter="drop_spoofed"}`:   0,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", name, v, ok, want)
		}
	}
	// Every counter the datapath has is served, under its C name.
	for _, name := range datapath.StatNames() {
		if _, ok := got[PacketsTotal+`{counter="`+name+`"}`]; !ok {
			t.Errorf("counter %s not served", name)
		}
	}
	if _, ok := got["go_goroutines"]; !ok {
		t.Error("Go runtime metrics not served")
	}

	// Scrapes read the maps afresh.
	if err := eps.Delete(netip.MustParseAddr("10.244.1.2")); err != nil {
		t.Fatal(err)
	}
	if v := scrape(t, srv.URL)[Endpoints]; v != 2 {
		t.Errorf("after a delete %s = %v, want 2", Endpoints, v)
	}
}

func TestStart(t *testing.T) {
	dp := datapathtest.MustOpen(t)
	m := New(dp.Root, datapathtest.Logger(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := m.Start(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + addr.String() + "/metrics"
	if v := scrape(t, url)[Loaded]; v != 1 {
		t.Errorf("%s = %v over HTTP, want 1", Loaded, v)
	}
	// A taken port fails at start.
	if _, err := New(dp.Root, datapathtest.Logger(t)).Start(ctx, addr.String()); err == nil || !strings.Contains(err.Error(), "listen for metrics on") {
		t.Errorf("second Start on %s: %v, want a listen error", addr, err)
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := net.DialTimeout("tcp", addr.String(), time.Second); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("metrics server still listening after ctx ended")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
