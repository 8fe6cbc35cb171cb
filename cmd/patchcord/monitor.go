// `patchcord monitor`: the datapath's drops and traces as they happen, one
// decoded line (or JSON object) each.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/events"
	"github.com/spf13/cobra"
)

// lostEvery is how often the events_lost counter is looked at.
const lostEvery = time.Second

type monitorOpts struct {
	typ       string
	count     int
	readyFile string
}

var monitorTypes = []string{"drop", "trace", "all"}

func newMonitorCmd(g *globals) *cobra.Command {
	var o monitorOpts
	cmd := &cobra.Command{
		Use:   "monitor",
		Short: "Stream drops and traces from the datapath, decoded",
		Long: `Print every event the datapath reports, one line each: time, CPU, kind,
program, interface (and target interface for traces), reason in words, and
the packet's 5-tuple, or "arp" and the like for other frames. With -o json
each event is one JSON object per line (JSON lines).

Drops are always reported. Traces, one per forwarded packet (local_redirect,
encap, decap), cost nothing until asked for: --type trace or all switches
them on in the datapath while the monitor runs, and the last such monitor to
exit switches them off. A monitor killed with SIGKILL cannot; tracing then
stays on until the next trace monitor exits (patchcord status shows it).

A full ring buffer loses events, never packets; the monitor reports how many
were lost ("N events lost", or {"lost": N} in JSON). Drop events are
rate-limited per CPU and per drop reason (patchcord agent
--monitor-event-rate, --monitor-event-burst; every drop is still counted):
the monitor reports how many were held back ("N drop events suppressed",
or {"suppressed": N}) once a second. Events are read from a
ring buffer with a single read position: two monitors at once each see only
part of them.

Run it in the node's network namespace so that interface names resolve.`,
		Example: `  patchcord monitor                          # drops
  patchcord monitor --type all               # drops and traces
  patchcord monitor -o json --count 1 | jq -r .reason   # why is my packet dropped?
  patchcord monitor --type trace -o json | jq 'select(.dst == "10.244.1.5")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return runMonitor(cmd.Context(), g, cmd.OutOrStdout(), log, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.typ, "type", "drop", "events to show: drop, trace or all")
	f.IntVar(&o.count, "count", 0, "exit after this many events (0: run until interrupted)")
	f.StringVar(&o.readyFile, "ready-file", "", "file written once the monitor listens (and tracing is on)")
	cmd.RegisterFlagCompletionFunc("type", cobra.FixedCompletions(monitorTypes, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func runMonitor(ctx context.Context, g *globals, w io.Writer, log *slog.Logger, o monitorOpts) (err error) {
	want, err := monitorFilter(o.typ)
	if err != nil {
		return err
	}
	if o.count < 0 {
		return fmt.Errorf("--count: %d is negative", o.count)
	}
	// Event timestamps come from bpf_ktime_get_ns: CLOCK_MONOTONIC.
	boot, err := events.MonotonicEpoch()
	if err != nil {
		return err
	}
	dp, err := g.open()
	if err != nil {
		return err
	}
	defer dp.Close()

	// The reader opens before tracing is switched on, so that no trace
	// is emitted before someone reads.
	rd, err := events.NewReader(dp.Maps.Events)
	if err != nil {
		return err
	}
	defer rd.Close()
	if want[events.KindTrace] {
		stop, err := bpfmaps.StartTracing(g.root, bpfmaps.NewConfig(&dp.Maps))
		if err != nil {
			return err
		}
		defer func() {
			if serr := stop(); serr != nil {
				err = errors.Join(err, serr)
			}
		}()
	}

	out := &eventWriter{bw: bufio.NewWriter(w), json: g.output == "json"}
	defer out.bw.Flush()
	loss, err := newLossReporter(bpfmaps.NewStats(&dp.Maps), out, log)
	if err != nil {
		return err
	}
	if err := writeReady(o.readyFile); err != nil {
		return err
	}
	log.Info("listening", "type", o.typ, "root", g.root)

	defer closeOnCancel(ctx, rd)()
	dec := events.Decoder{Names: (&events.Names{}).Name, Boot: boot}
	return monitorLoop(rd, dec, want, o.count, out, loss)
}

// closeOnCancel closes rd when ctx ends, until the returned func is
// called: closing the reader is what interrupts a blocked Read on SIGINT.
func closeOnCancel(ctx context.Context, rd *events.Reader) (stop func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			rd.Close()
		case <-done:
		}
	}()
	return func() { close(done) }
}

// writeReady writes the ready file, if one is asked for.
func writeReady(path string) error {
	if path == "" {
		return nil
	}
	if err := os.WriteFile(path, []byte("ready\n"), 0o644); err != nil {
		return fmt.Errorf("write ready file: %w", err)
	}
	return nil
}

// monitorFilter is the set of event kinds --type asks for.
func monitorFilter(typ string) (map[string]bool, error) {
	switch typ {
	case "drop":
		return map[string]bool{events.KindDrop: true}, nil
	case "trace":
		return map[string]bool{events.KindTrace: true}, nil
	case "all":
		return map[string]bool{events.KindDrop: true, events.KindTrace: true}, nil
	}
	return nil, fmt.Errorf("--type: %q is not one of drop, trace, all", typ)
}

// monitorLoop prints events of the wanted kinds until count (0: no limit)
// or the reader closes, and reports losses every lostEvery.
func monitorLoop(rd *events.Reader, dec events.Decoder, want map[string]bool, count int, out *eventWriter, loss *lossReporter) error {
	next := time.Now().Add(lostEvery)
	for n := 0; count == 0 || n < count; {
		rd.SetDeadline(next)
		ev, err := rd.Read()
		switch {
		case errors.Is(err, events.ErrClosed):
			return loss.check()
		case errors.Is(err, os.ErrDeadlineExceeded):
			if err := loss.check(); err != nil {
				return err
			}
			next = time.Now().Add(lostEvery)
			continue
		case err != nil:
			return fmt.Errorf("read events: %w", err)
		}
		d := dec.Decode(ev)
		if !want[d.Kind] {
			continue
		}
		if err := out.emit(d); err != nil {
			return err
		}
		n++
		// Flushing once the ring is drained keeps a busy node's output
		// to a few writes, and an idle node's lines immediate.
		if !rd.Pending() {
			if err := out.bw.Flush(); err != nil {
				return err
			}
		}
	}
	return loss.check()
}

// eventWriter prints events as lines of text or JSON, buffered.
type eventWriter struct {
	bw   *bufio.Writer
	json bool
}

func (e *eventWriter) emit(v fmt.Stringer) error {
	if e.json {
		return writeJSONLine(e.bw, v)
	}
	_, err := fmt.Fprintln(e.bw, v.String())
	return err
}

// lossReporter reports events lost in a full ring and drop events the
// rate limit suppressed, as the growth of their counters since last time.
type lossReporter struct {
	stats            *bpfmaps.Stats
	out              *eventWriter
	log              *slog.Logger
	lost, suppressed uint64
}

func newLossReporter(stats *bpfmaps.Stats, out *eventWriter, log *slog.Logger) (*lossReporter, error) {
	lost, suppressed, err := eventCounts(stats)
	if err != nil {
		return nil, err
	}
	return &lossReporter{stats: stats, out: out, log: log, lost: lost, suppressed: suppressed}, nil
}

// check prints what was lost or suppressed since the last check and flushes.
func (r *lossReporter) check() error {
	n, s, err := eventCounts(r.stats)
	if err != nil {
		r.log.Warn("cannot read lost events", "err", err)
		return nil
	}
	if n > r.lost {
		if err := r.out.emit(events.Lost{Lost: n - r.lost}); err != nil {
			return err
		}
	}
	if s > r.suppressed {
		if err := r.out.emit(events.Suppressed{Suppressed: s - r.suppressed}); err != nil {
			return err
		}
	}
	// Below the last value: someone ran `bpf stats --reset`.
	r.lost, r.suppressed = n, s
	return r.out.bw.Flush()
}

// eventCounts reads the events_lost and events_suppressed counters.
func eventCounts(s *bpfmaps.Stats) (lost, suppressed uint64, err error) {
	counters, err := s.Read()
	if err != nil {
		return 0, 0, err
	}
	return counters["events_lost"].Packets, counters["events_suppressed"].Packets, nil
}

// writeJSONLine writes v as one line of JSON.
func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err
}
