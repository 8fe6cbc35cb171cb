// The machine a run measured: results are only comparable on the same one,
// and only as ratios while other work shares it.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine holds the facts printed in the report's header.
type Machine struct {
	CPUs      int    `json:"nproc"`
	Model     string `json:"cpuModel"`
	Kernel    string `json:"kernel"`
	Date      string `json:"date"`
	GoVersion string `json:"goVersion"`
	// Commit is the tree measured: HEAD, "-dirty" if it has local changes.
	Commit   string `json:"commit"`
	Iperf3   string `json:"iperf3"`
	Sockperf string `json:"sockperf"`
	// LoadStart and LoadEnd are the 1-minute load averages around the run;
	// above zero, something else was using the CPUs too.
	LoadStart float64 `json:"loadAverageStart"`
	LoadEnd   float64 `json:"loadAverageEnd"`
}

func machineFacts() Machine {
	m := Machine{
		CPUs:      runtime.NumCPU(),
		Model:     cpuModel(),
		Date:      time.Now().UTC().Format(time.RFC3339),
		GoVersion: runtime.Version(),
		Commit:    gitCommit(),
		Iperf3:    firstLine("iperf3", "--version"),
		Sockperf:  strings.TrimPrefix(firstLine("sockperf", "--version"), "sockperf, "),
		LoadStart: loadAverage(),
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	return m
}

func gitCommit() string {
	head, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	commit := strings.TrimSpace(string(head))
	// Only tracked files count, and not the results file a previous run
	// rewrote.
	status := exec.Command("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results.json")
	if out, err := status.Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
		commit += "-dirty"
	}
	return commit
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func firstLine(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil && len(out) == 0 {
		return "not found"
	}
	line, _, _ := bytes.Cut(bytes.TrimSpace(out), []byte("\n"))
	return string(bytes.TrimSpace(line))
}

// loadAverage is the 1-minute load average, or -1 if unreadable.
func loadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// cpuTicks are the kernel's CPU counters summed over all CPUs, in USER_HZ
// ticks. Softirq work (where most of a datapath's cost lands) runs on any
// CPU, in any process's context, so only the machine-wide sum sees all of it.
type cpuTicks struct {
	busy, total uint64
}

// userHZ is the unit of /proc/stat: 100 on every Linux architecture Go
// supports, whatever the kernel's HZ.
const userHZ = 100

func readCPUTicks() (cpuTicks, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTicks{}, err
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 8 || f[0] != "cpu" {
		return cpuTicks{}, errBadStat
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return cpuTicks{}, errBadStat
		}
	}
	busy := v[0] + v[1] + v[2] + v[5] + v[6] // guest time is already in user
	return cpuTicks{busy: busy, total: busy + v[3] + v[4] + v[7]}, nil
}

var errBadStat = errors.New("unexpected /proc/stat format")
