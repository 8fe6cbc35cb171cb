// Prometheus metrics of the agent, as a scraper reads them.
package e2e

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
	"testing"
)

// MetricsPort is where the agent serves metrics; each lab node has its own
// loopback, so every test can use the same port.
const MetricsPort = 9964

// ScrapeMetrics fetches the node's metrics from inside its namespace and
// returns each sample by name and labels as printed, e.g.
// `patchcord_datapath_packets_total{counter="encap"}`.
func ScrapeMetrics(t *testing.T, out []byte) map[string]float64 {
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
