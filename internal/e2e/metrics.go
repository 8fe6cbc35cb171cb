// Prometheus metrics of the agent, as a scraper reads them.
package e2e

import (
	"bytes"
	"testing"

	"github.com/patchcord/patchcord/internal/promtext"
)

// MetricsPort is where the agent serves metrics; each lab node has its own
// loopback, so every test can use the same port.
const MetricsPort = 9964

// ScrapeMetrics fetches the node's metrics from inside its namespace and
// returns each sample by name and labels as printed, e.g.
// `patchcord_datapath_packets_total{counter="encap"}`.
func ScrapeMetrics(t *testing.T, out []byte) map[string]float64 {
	t.Helper()
	samples, err := promtext.Parse(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	return samples
}
