// What a run produces: every raw sample, the summaries built from them, and
// the machine they were measured on. All of it goes to the JSON file; the
// Markdown report is rendered from the same values.
package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Results is the JSON file's content.
type Results struct {
	Machine  Machine  `json:"machine"`
	Settings Settings `json:"settings"`
	// Datapaths describes how each traffic datapath was built.
	Datapaths []DatapathInfo `json:"datapaths,omitempty"`
	// Samples holds every traffic measurement, one value per figure per run.
	Samples []Sample `json:"samples,omitempty"`
	// Summaries are the medians over rounds, with ratios to the references.
	Summaries []Summary    `json:"summaries,omitempty"`
	BPF       *BPFResults  `json:"bpf,omitempty"`
	CNI       *CNIResults  `json:"cni,omitempty"`
	Agent     *AgentResult `json:"agent,omitempty"`
	Scale     *ScaleCheck  `json:"scale,omitempty"`
	Targets   []Target     `json:"targets,omitempty"`
	// Elapsed is the wall time of the whole run.
	Elapsed string `json:"elapsed"`
}

// GroupResults is a measured group's part of the JSON: how one sample is
// taken, every sample, and the summaries made of them.
type GroupResults[S, M any] struct {
	// Method says what one sample times.
	Method  string `json:"method"`
	Samples []S    `json:"samples"`
	Summary []M    `json:"summary"`
}

// Settings are the options the run used.
type Settings struct {
	Rounds         int      `json:"rounds"`
	RunSeconds     int      `json:"runSeconds"`
	Groups         []string `json:"groups"`
	BPFRuns        int      `json:"bpfRuns"`
	CNIPods        int      `json:"cniPods"`
	ScaleNodes     int      `json:"nodesInMaps"`
	ScaleEndpoints int      `json:"endpointsInMaps"`
	// KubeProxyServices is how many services' kube-proxy rules every
	// cross-node node had (--kube-proxy); 0: none.
	KubeProxyServices int `json:"kubeProxyServices,omitempty"`
}

// DatapathInfo names a datapath, its group and how it is built.
type DatapathInfo struct {
	Group string `json:"group"`
	Name  string `json:"name"`
	Role  string `json:"role,omitempty"`
	Setup string `json:"setup"`
	// Links is how the uplinks carry packets (lab.Links: veth or nic);
	// empty for same-node datapaths.
	Links string `json:"links,omitempty"`
}

// Sample is one figure of one run of one datapath.
type Sample struct {
	Group    string  `json:"group"`
	Datapath string  `json:"datapath"`
	Figure   string  `json:"figure"`
	Unit     string  `json:"unit"`
	Round    int     `json:"round"`
	Value    float64 `json:"value"`
	// Load is the 1-minute load average when the run ended: other work on the
	// machine shows up here.
	Load  float64        `json:"load"`
	Extra map[string]any `json:"extra,omitempty"`
}

// Summary is one figure of one datapath over all rounds.
type Summary struct {
	Group    string  `json:"group"`
	Datapath string  `json:"datapath"`
	Figure   string  `json:"figure"`
	Unit     string  `json:"unit"`
	Median   float64 `json:"median"`
	Min      float64 `json:"min"`
	Max      float64 `json:"max"`
	N        int     `json:"n"`
	// Ratios maps a reference datapath to the median, over rounds, of this
	// datapath's value divided by the reference's value in the same round.
	Ratios map[string]float64 `json:"ratios,omitempty"`
}

// Target is one of the goals, checked against this run.
type Target struct {
	Goal     string  `json:"goal"`
	Datapath string  `json:"datapath"`
	Value    float64 `json:"value"`
	Want     string  `json:"want"`
	Met      bool    `json:"met"`
}

func (r *Results) write(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("write results: %w", err)
		}
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}

// median of v; NaN when empty.
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile is the nearest-rank percentile p (0 < p <= 100) of v.
func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[max(rank, 1)-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
