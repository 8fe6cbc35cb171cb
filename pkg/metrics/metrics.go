// Package metrics serves the agent's Prometheus metrics: the datapath's
// counters, how many endpoints and remote nodes its maps hold, and how often
// a node sync failed.
//
// The maps are read from their pins on every scrape rather than through
// handles held open: the server can start before anything is loaded, and a
// datapath the CNI plugin or a newer agent re-pinned is the one reported.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metric names, all under the patchcord_ prefix.
const (
	PacketsTotal    = "patchcord_datapath_packets_total"
	BytesTotal      = "patchcord_datapath_bytes_total"
	Loaded          = "patchcord_datapath_loaded"
	Endpoints       = "patchcord_endpoints"
	Nodes           = "patchcord_nodes"
	SyncErrorsTotal = "patchcord_sync_errors_total"
)

var (
	packetsDesc = prometheus.NewDesc(PacketsTotal,
		"Packets counted by the datapath, summed over CPUs, by counter (local_redirect, encap, drop_spoofed, ...).",
		[]string{"counter"}, nil)
	bytesDesc = prometheus.NewDesc(BytesTotal,
		"Bytes counted by the datapath, summed over CPUs, by counter.",
		[]string{"counter"}, nil)
	loadedDesc = prometheus.NewDesc(Loaded,
		"1 when the datapath is pinned under the bpffs root, 0 before the agent or the CNI plugin loaded it.",
		nil, nil)
	endpointsDesc = prometheus.NewDesc(Endpoints,
		"Local pods in the endpoint map.", nil, nil)
	nodesDesc = prometheus.NewDesc(Nodes,
		"Remote nodes (pod CIDRs) in the node map.", nil, nil)
)

// Metrics is the agent's registry.
type Metrics struct {
	reg        *prometheus.Registry
	syncErrors prometheus.Counter
	log        *slog.Logger
}

// New returns the metrics of the datapath pinned under root (the agent's
// --bpffs-root), plus the Go runtime and process metrics.
func New(root string, log *slog.Logger) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		syncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: SyncErrorsTotal,
			Help: "Node syncs that failed (maps, routes or neighbours not as the node source wants).",
		}),
		log: log,
	}
	m.reg.MustRegister(
		&datapathCollector{root: root, log: log},
		m.syncErrors,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Register adds a collector of another part of the agent (the BGP
// speaker's).
func (m *Metrics) Register(c prometheus.Collector) { m.reg.MustRegister(c) }

// SyncError counts one failed node sync.
func (m *Metrics) SyncError() { m.syncErrors.Inc() }

// Handler serves the metrics in the Prometheus exposition formats. A map
// that cannot be read costs its own metrics only, not the scrape.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      slogPrintln{m.log},
	})
}

// Start listens on addr and serves /metrics until ctx ends; it returns the
// address bound (addr may say port 0). Only listening can fail here, so that
// a taken port is an error at start, not a log line.
func (m *Metrics) Start(ctx context.Context, addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.log.Error("metrics server stopped", "addr", addr, "err", err)
		}
	}()
	m.log.Info("serving metrics", "addr", ln.Addr().String(), "path", "/metrics")
	return ln.Addr(), nil
}

// datapathCollector reads the pinned maps on each scrape.
type datapathCollector struct {
	root string
	log  *slog.Logger
}

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{packetsDesc, bytesDesc, loadedDesc, endpointsDesc, nodesDesc} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	dp, err := datapath.OpenPinned(c.root)
	if errors.Is(err, datapath.ErrNotLoaded) {
		ch <- prometheus.MustNewConstMetric(loadedDesc, prometheus.GaugeValue, 0)
		return
	}
	if err != nil {
		ch <- prometheus.NewInvalidMetric(loadedDesc, fmt.Errorf("open datapath: %w", err))
		return
	}
	defer dp.Close()
	ch <- prometheus.MustNewConstMetric(loadedDesc, prometheus.GaugeValue, 1)

	stats, err := bpfmaps.NewStats(&dp.Maps).Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(packetsDesc, err)
	}
	for name, s := range stats {
		ch <- prometheus.MustNewConstMetric(packetsDesc, prometheus.CounterValue, float64(s.Packets), name)
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(s.Bytes), name)
	}
	if eps, err := bpfmaps.NewEndpoints(&dp.Maps).List(); err != nil {
		ch <- prometheus.NewInvalidMetric(endpointsDesc, err)
	} else {
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(len(eps)))
	}
	if nodes, err := bpfmaps.NewNodes(&dp.Maps).List(); err != nil {
		ch <- prometheus.NewInvalidMetric(nodesDesc, err)
	} else {
		ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(len(nodes)))
	}
}

// slogPrintln lets promhttp log through slog.
type slogPrintln struct{ log *slog.Logger }

func (l slogPrintln) Println(v ...any) { l.log.Error("serve metrics: " + fmt.Sprint(v...)) }
