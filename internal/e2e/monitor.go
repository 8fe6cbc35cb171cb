// `patchcord monitor` in a lab: starting it and reading what it printed.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
)

// MonitorEvent is one line of `monitor -o json`, in the shape the README
// documents; decoding into it rather than into pkg/events' type catches a
// renamed field. Lost and Suppressed are set only on the monitor's own
// reports ({"lost": N}, {"suppressed": N}).
type MonitorEvent struct {
	Time         time.Time `json:"time"`
	CPU          uint32    `json:"cpu"`
	Kind         string    `json:"kind"`
	Program      string    `json:"program"`
	Ifindex      int       `json:"ifindex"`
	Ifname       string    `json:"ifname"`
	Reason       string    `json:"reason"`
	Message      string    `json:"message"`
	Target       int       `json:"target"`
	TargetIfname string    `json:"targetIfname"`
	Len          uint32    `json:"len"`
	EthProto     string    `json:"ethProto"`
	Proto        string    `json:"proto"`
	Src          string    `json:"src"`
	Dst          string    `json:"dst"`
	Sport        uint16    `json:"sport"`
	Dport        uint16    `json:"dport"`
	Lost         *uint64   `json:"lost"`
	Suppressed   *uint64   `json:"suppressed"`
}

// StartMonitor runs `patchcord monitor args...` on n in the background and
// returns once it listens (with tracing on, if asked for).
func StartMonitor(t *testing.T, ctx context.Context, n *lab.Node, args ...string) *lab.Process {
	t.Helper()
	ready := filepath.Join(t.TempDir(), "monitor.ready")
	return StartReady(t, ctx, n, "monitor", ready, append([]string{"monitor", "--ready-file", ready}, args...)...)
}

// ParseEvents reads the JSON lines of a monitor's log; the other lines are
// its log on stderr.
func ParseEvents(t *testing.T, out []byte) []MonitorEvent {
	t.Helper()
	var evs []MonitorEvent
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		line := s.Bytes()
		if !bytes.HasPrefix(line, []byte("{")) {
			continue
		}
		var ev MonitorEvent
		if err := json.Unmarshal(line, &ev); err != nil {
			t.Fatalf("monitor line %q: %v", line, err)
		}
		evs = append(evs, ev)
	}
	return evs
}
