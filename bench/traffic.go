// Traffic figures, measured with real tools run inside the lab's
// namespaces: iperf3 for TCP throughput and small UDP packets, sockperf for
// request/response latency, and /proc/stat for the CPU the transfer cost.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
)

// figure is one number a traffic run yields.
type figure struct {
	ID, Title, Unit string
	// Higher is true when more is better (throughput), false for costs
	// and latencies.
	Higher bool
}

var figures = []figure{
	{"tcp1", "TCP throughput, 1 stream", "Gbit/s", true},
	{"tcp4", "TCP throughput, 4 streams", "Gbit/s", true},
	{"udp64", "UDP 64-byte packets received", "kpps", true},
	{"rtt_p50", "UDP request/response RTT p50", "µs", false},
	{"rtt_p99", "UDP request/response RTT p99", "µs", false},
	{"tcp1_cpu", "CPU time per GB, TCP 1 stream", "CPU-s/GB", false},
	{"tcp4_cpu", "CPU time per GB, TCP 4 streams", "CPU-s/GB", false},
}

func figureByID(id string) figure {
	for _, f := range figures {
		if f.ID == id {
			return f
		}
	}
	panic("unknown figure " + id)
}

// Ports of the servers in each server namespace.
const (
	iperfPort    = 5201
	sockperfPort = 11111
)

// startServers starts an iperf3 and a sockperf server on the subject's
// server side; they serve every round and stop with the lab. Both sleep in
// the kernel between tests, so idle servers cost the other measurements
// nothing.
func startServers(ctx context.Context, s *subject) error {
	iperf, err := s.Server.Start(ctx, "iperf3", "-s", "-p", fmt.Sprint(iperfPort))
	if err != nil {
		return err
	}
	if err := iperf.WaitListening(ctx, iperfPort); err != nil {
		return err
	}
	sp, err := s.Server.Start(ctx, "sockperf", "server", "-i", s.ServerIP.String(), "-p", fmt.Sprint(sockperfPort))
	if err != nil {
		return err
	}
	// sockperf serves UDP: lab's WaitListening only knows TCP.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return e2e.Poll(wctx, "sockperf server on "+s.ServerIP.String(), func() error {
		select {
		case <-sp.Done():
			out, _ := sp.Output()
			return fmt.Errorf("%w: %s", e2e.ErrExited, out)
		default:
		}
		out, err := s.Server.Exec(wctx, "ss", "-Hlun", fmt.Sprintf("sport = :%d", sockperfPort))
		if err != nil {
			return err
		}
		if len(strings.TrimSpace(string(out))) == 0 {
			return errors.New("not listening")
		}
		return nil
	})
}

// warmUp pings the server until it answers, so that neighbour resolution
// and the first packets of every path are behind us before any figure.
func warmUp(ctx context.Context, s *subject) error {
	_, err := s.Client.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", s.ServerIP.String())
	if err != nil {
		return fmt.Errorf("%s: no ping from client to server: %w", s.Name, err)
	}
	return nil
}

// result is what one tool run yields: figures by ID, and raw details kept
// in the JSON.
type result struct {
	values map[string]float64
	extra  map[string]any
}

// measurement is one tool run producing one or more figures.
type measurement struct {
	name string
	run  func(ctx context.Context, s *subject, secs int) (result, error)
}

var measurements = []measurement{
	{"iperf3 TCP, 1 stream", func(ctx context.Context, s *subject, secs int) (result, error) {
		return iperfTCP(ctx, s, secs, 1, "tcp1")
	}},
	{"iperf3 TCP, 4 streams", func(ctx context.Context, s *subject, secs int) (result, error) {
		return iperfTCP(ctx, s, secs, 4, "tcp4")
	}},
	{"iperf3 UDP, 64-byte payload", iperfUDP},
	{"sockperf ping-pong", sockperfRTT},
}

// measure runs one measurement on s and returns its samples.
func measure(ctx context.Context, s *subject, m measurement, round, secs int) ([]Sample, error) {
	res, err := retryOnce(ctx, func() (result, error) { return m.run(ctx, s, secs) })
	if err != nil {
		return nil, fmt.Errorf("%s, %s, round %d: %w", s.Name, m.name, round, err)
	}
	load := loadAverage()
	var samples []Sample
	for id, v := range res.values {
		f := figureByID(id)
		samples = append(samples, Sample{Group: s.Group, Datapath: s.Name, Figure: id, Unit: f.Unit,
			Round: round, Value: v, Load: load, Extra: res.extra})
	}
	return samples, nil
}

// retryOnce retries a failed run once: a server still finishing the
// previous test refuses the next for a moment.
func retryOnce(ctx context.Context, run func() (result, error)) (result, error) {
	res, err := run()
	if err == nil {
		return res, nil
	}
	select {
	case <-ctx.Done():
		return res, err
	case <-time.After(time.Second):
	}
	return run()
}

// runCtx bounds one tool run: its duration plus generous slack.
func runCtx(ctx context.Context, secs int) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, time.Duration(secs)*time.Second+time.Minute)
}

// iperfReport is the part of `iperf3 -J` we read.
type iperfReport struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			Bytes       float64 `json:"bytes"`
			Seconds     float64 `json:"seconds"`
			Packets     float64 `json:"packets"`
			Retransmits int     `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			Seconds       float64 `json:"seconds"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Packets       float64 `json:"packets"`
			LostPackets   float64 `json:"lost_packets"`
		} `json:"sum_received"`
		CPU struct {
			HostTotal   float64 `json:"host_total"`
			RemoteTotal float64 `json:"remote_total"`
		} `json:"cpu_utilization_percent"`
	} `json:"end"`
}

func runIperf(ctx context.Context, s *subject, secs int, args ...string) (iperfReport, error) {
	ctx, cancel := runCtx(ctx, secs)
	defer cancel()
	args = append([]string{"-c", s.ServerIP.String(), "-p", fmt.Sprint(iperfPort), "-t", fmt.Sprint(secs), "-J"}, args...)
	out, err := s.Client.Exec(ctx, "iperf3", args...)
	var rep iperfReport
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		return rep, errors.Join(err, fmt.Errorf("parse iperf3 output: %w", jerr))
	}
	if rep.Error != "" {
		return rep, fmt.Errorf("iperf3: %s", rep.Error)
	}
	return rep, err
}

// iperfTCP measures bulk TCP throughput, and the CPU time the whole machine
// spent per GB received while it ran.
func iperfTCP(ctx context.Context, s *subject, secs, streams int, id string) (result, error) {
	var rx0 rxCounters
	if len(s.uplinks) > 0 {
		var err error
		if rx0, err = readRx(ctx, s.Server); err != nil {
			return result{}, err
		}
	}
	before, err := readCPUTicks()
	if err != nil {
		return result{}, err
	}
	rep, err := runIperf(ctx, s, secs, "-P", fmt.Sprint(streams))
	if err != nil {
		return result{}, err
	}
	after, err := readCPUTicks()
	if err != nil {
		return result{}, err
	}
	extra := map[string]any{}
	if len(s.uplinks) > 0 {
		rx1, err := readRx(ctx, s.Server)
		if err != nil {
			return result{}, err
		}
		if p := rx1.packets - rx0.packets; p > 0 {
			extra["serverRxBytesPerPacket"] = float64(rx1.bytes-rx0.bytes) / float64(p)
		}
	}
	rx := rep.End.SumReceived
	if rx.Bytes == 0 || rx.Seconds == 0 {
		return result{}, errors.New("iperf3 received nothing")
	}
	cpuSeconds := float64(after.busy-before.busy) / userHZ
	for k, v := range map[string]any{
		"bytes":              rx.Bytes,
		"retransmits":        rep.End.SumSent.Retransmits,
		"cpuSeconds":         cpuSeconds,
		"iperfCPUHostPct":    rep.End.CPU.HostTotal,
		"iperfCPURemotePct":  rep.End.CPU.RemoteTotal,
		"iperfReceiverSecs":  rx.Seconds,
		"iperfSenderSecs":    rep.End.SumSent.Seconds,
		"iperfSenderBytes":   rep.End.SumSent.Bytes,
		"machineBusyPercent": 100 * float64(after.busy-before.busy) / float64(max(after.total-before.total, 1)),
	} {
		extra[k] = v
	}
	return result{
		values: map[string]float64{
			id:          rx.BitsPerSecond / 1e9,
			id + "_cpu": cpuSeconds / (rx.Bytes / 1e9),
		},
		extra: extra,
	}, nil
}

// iperfUDP measures how many 64-byte UDP datagrams per second reach the
// server when the client sends as fast as it can.
func iperfUDP(ctx context.Context, s *subject, secs int) (result, error) {
	rep, err := runIperf(ctx, s, secs, "-u", "-l", "64", "-b", "0")
	if err != nil {
		return result{}, err
	}
	rx := rep.End.SumReceived
	if rx.Seconds == 0 {
		return result{}, errors.New("iperf3 reported no UDP receive time")
	}
	received := rx.Packets - rx.LostPackets
	return result{
		values: map[string]float64{"udp64": received / rx.Seconds / 1e3},
		extra: map[string]any{
			"sentPackets":     rep.End.SumSent.Packets,
			"receivedPackets": received,
			"lostPackets":     rx.LostPackets,
			"seconds":         rx.Seconds,
		},
	}, nil
}

var (
	ansi       = regexp.MustCompile(`\x1b\[[0-9;]*m`)
	percentLn  = regexp.MustCompile(`percentile\s+([0-9.]+)\s*=\s*([0-9.]+)`)
	avgRTTLine = regexp.MustCompile(`avg-rtt=([0-9.]+)`)
)

// sockperfRTT measures UDP request/response round trips of 64-byte
// messages, one outstanding at a time. With --full-rtt sockperf prints
// round-trip times; without it, half of them.
func sockperfRTT(ctx context.Context, s *subject, secs int) (result, error) {
	ctx, cancel := runCtx(ctx, secs)
	defer cancel()
	out, err := s.Client.Exec(ctx, "sockperf", "ping-pong", "-i", s.ServerIP.String(), "-p", fmt.Sprint(sockperfPort),
		"-t", fmt.Sprint(secs), "-m", "64", "--full-rtt")
	if err != nil {
		return result{}, err
	}
	p, avg, err := parseSockperf(string(out))
	if err != nil {
		return result{}, err
	}
	return result{
		values: map[string]float64{"rtt_p50": p["50.000"], "rtt_p99": p["99.000"]},
		extra:  map[string]any{"avgRTT": avg, "p90": p["90.000"], "p99.9": p["99.900"]},
	}, nil
}

// parseSockperf returns sockperf's percentiles by their printed label
// ("50.000") and its average, in µs.
func parseSockperf(out string) (map[string]float64, float64, error) {
	out = ansi.ReplaceAllString(out, "")
	p := map[string]float64{}
	for _, m := range percentLn.FindAllStringSubmatch(out, -1) {
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			return nil, 0, fmt.Errorf("parse sockperf percentile %q: %w", m[0], err)
		}
		p[m[1]] = v
	}
	if _, ok := p["50.000"]; !ok {
		return nil, 0, fmt.Errorf("sockperf printed no percentiles:\n%s", out)
	}
	if _, ok := p["99.000"]; !ok {
		return nil, 0, fmt.Errorf("sockperf printed no 99th percentile:\n%s", out)
	}
	avg := 0.0 // JSON has no NaN
	if m := avgRTTLine.FindStringSubmatch(out); m != nil {
		avg, _ = strconv.ParseFloat(m[1], 64)
	}
	return p, avg, nil
}

// lastLines returns the last n non-empty lines of s, joined by " / ".
func lastLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}
