package bgp

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// The speaker's metrics, by name, and their labels: `patchcord status`
// reads them back from the agent.
const (
	MetricEstablished = "patchcord_bgp_neighbor_established"
	MetricRoutes      = "patchcord_bgp_neighbor_routes"
	LabelNeighbor     = "neighbor"
	LabelASN          = "asn"
)

var (
	establishedDesc = prometheus.NewDesc(MetricEstablished,
		"1 while the BGP session with the neighbour is established.", []string{LabelNeighbor, LabelASN}, nil)
	receivedDesc = prometheus.NewDesc(MetricRoutes,
		"Best routes learned from the neighbour (the agent drops those overlapping its own pod CIDR).", []string{LabelNeighbor, LabelASN}, nil)
)

// Collector reports every neighbour's session and routes.
func (s *Speaker) Collector() prometheus.Collector { return collector{s} }

type collector struct{ s *Speaker }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- establishedDesc
	ch <- receivedDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.s.Peers() {
		labels := []string{p.Neighbor.Addr.String(), strconv.FormatUint(uint64(p.Neighbor.ASN), 10)}
		up := 0.0
		if p.Established() {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(establishedDesc, prometheus.GaugeValue, up, labels...)
		ch <- prometheus.MustNewConstMetric(receivedDesc, prometheus.GaugeValue, float64(p.Received), labels...)
	}
}
