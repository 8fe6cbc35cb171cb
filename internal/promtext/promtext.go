// Package promtext reads the Prometheus text exposition format as far as the
// tests and the bench need it: every sample by its name and labels as
// printed, e.g. `patchcord_datapath_packets_total{counter="encap"}`.
package promtext

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Parse returns every sample in r. Comments (HELP, TYPE) are skipped.
func Parse(r io.Reader) (map[string]float64, error) {
	samples := make(map[string]float64)
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("sample line %q has no value", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("sample line %q: %w", line, err)
		}
		samples[line[:i]] = v
	}
	return samples, sc.Err()
}
