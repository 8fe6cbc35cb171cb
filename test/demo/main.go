// Command demo is `make demo`: it builds a two-node lab in network
// namespaces, runs the real agent on each node, adds two pods per node
// through cnitool and the patchcord CNI plugin, and shows traffic taking the
// datapath: same-node (bpf_redirect_peer) and cross-node (VXLAN built in
// eBPF). Everything is removed at the end, on failure and on Ctrl-C.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx)
	stop()
	if err != nil {
		slog.Error(err.Error())
		os.Exit(1)
	}
}

// env returns the variable, or def.
func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func run(ctx context.Context) (err error) {
	if err := lab.CheckRoot("the demo"); err != nil {
		return err
	}
	cnitool, err := exec.LookPath(env("CNITOOL", "bin/tools/cnitool"))
	if err != nil {
		return fmt.Errorf("cnitool: %w (run `make demo`, which installs it)", err)
	}
	l, err := lab.New(lab.Options{
		Name:    "demo",
		Log:     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		BinDir:  env("PATCHCORD_BIN", "bin"),
		CNIPath: []string{env("CNI_PLUGINS", "bin/cni")},
		CNITool: cnitool,
	})
	if err != nil {
		return err
	}
	defer func() {
		step("tearing the lab down")
		err = errors.Join(err, l.Close())
	}()

	nodes, err := startNodes(ctx, l)
	if err != nil {
		return err
	}
	pods, err := addPods(ctx, nodes)
	if err != nil {
		return err
	}
	if err := exercise(ctx, nodes, pods); err != nil {
		return err
	}
	for _, n := range nodes {
		step("node%d: patchcord bpf stats (traffic took the datapath: local_redirect, encap, decap)", n.Index)
		if err := show(ctx, n, "bpf", "stats"); err != nil {
			return err
		}
	}

	step("removing the pods with cnitool del")
	for _, p := range pods {
		if err := p.Del(ctx); err != nil {
			return err
		}
	}
	step("node1 after DEL: patchcord bpf endpoint list")
	return show(ctx, nodes[0], "bpf", "endpoint", "list")
}

// exercise shows node1's maps, then pings and runs iperf3 between pods of
// one node and of two.
func exercise(ctx context.Context, nodes []*lab.Node, pods []*lab.Pod) error {
	a1, a2, b1 := pods[0], pods[1], pods[2]

	for _, st := range []struct {
		title string
		run   func() error
	}{
		{"node1: patchcord bpf endpoint list", func() error { return show(ctx, nodes[0], "bpf", "endpoint", "list") }},
		{"node1: patchcord bpf node list", func() error { return show(ctx, nodes[0], "bpf", "node", "list") }},
		{fmt.Sprintf("same node: ping %s -> %s", a1.IP, a2.IP), func() error { return pingOut(ctx, a1, a2) }},
		{fmt.Sprintf("cross node: ping %s (node1) -> %s (node2)", a1.IP, b1.IP), func() error { return pingOut(ctx, a1, b1) }},
		{fmt.Sprintf("same node: iperf3 %s -> %s", a1.IP, a2.IP), func() error { return iperf(ctx, a1, a2) }},
		{fmt.Sprintf("cross node: iperf3 %s -> %s", a1.IP, b1.IP), func() error { return iperf(ctx, a1, b1) }},
	} {
		step("%s", st.title)
		if err := st.run(); err != nil {
			return err
		}
	}

	return nil
}

// startNodes builds two nodes on the lab's fabric and starts an agent on
// each, with a nodes file listing both.
func startNodes(ctx context.Context, l *lab.Lab) ([]*lab.Node, error) {
	step("building 2 nodes on a fabric bridge (namespaces %s-*)", l.Prefix)
	var ns []*lab.Node
	var entries []nodes.Entry
	for i := 1; i <= 2; i++ {
		n, err := l.AddNode(i)
		if err != nil {
			return nil, err
		}
		ns = append(ns, n)
		entries = append(entries, nodes.Entry{Name: fmt.Sprintf("node%d", i), NodeIP: n.IP.String(), PodCIDR: n.PodCIDR.String()})
		fmt.Printf("  node%d  uplink eth0 %s  pod CIDR %s  bpffs %s\n", i, n.IP, n.PodCIDR, n.BpffsRoot)
	}
	nodesFile := filepath.Join(l.Dir, "nodes.json")
	if err := nodes.WriteFile(nodesFile, entries); err != nil {
		return nil, err
	}
	step("starting `patchcord agent` on each node")
	for _, n := range ns {
		if err := startAgent(ctx, l, n, nodesFile); err != nil {
			return nil, err
		}
	}
	return ns, nil
}

// startAgent starts n's agent and waits until it says it is ready.
func startAgent(ctx context.Context, l *lab.Lab, n *lab.Node, nodesFile string) error {
	ready := filepath.Join(l.Dir, fmt.Sprintf("n%d.ready", n.Index))
	agent, err := n.Start(ctx, l.Bin("patchcord"), "--bpffs-root", n.BpffsRoot, "agent",
		"--uplink", "eth0", "--node-ip", n.IP.String(), "--pod-cidr", n.PodCIDR.String(),
		"--nodes", nodesFile, "--ready-file", ready)
	if err != nil {
		return err
	}
	err = lab.WaitFor(ctx, "agent ready", func(context.Context) error {
		if _, err := os.Stat(ready); err != nil {
			select {
			case <-agent.Done():
				return errors.New("agent exited")
			default:
			}
			return err
		}
		return nil
	})
	if err != nil {
		log, _ := os.ReadFile(agent.LogPath)
		return fmt.Errorf("%w\n%s", err, log)
	}
	return nil
}

// addPods adds two pods to each node through cnitool.
func addPods(ctx context.Context, ns []*lab.Node) ([]*lab.Pod, error) {
	step("adding 2 pods per node with cnitool (patchcord-cni + host-local)")
	var pods []*lab.Pod
	for _, n := range ns {
		if err := n.WriteConflist("patchcord", n.PrimaryConflist()); err != nil {
			return nil, err
		}
		for j := 1; j <= 2; j++ {
			p, err := n.AddPod(ctx, fmt.Sprintf("pod%d", j), "patchcord")
			if err != nil {
				return nil, err
			}
			pods = append(pods, p)
			fmt.Printf("  %-12s on node%d  %s\n", p.Name, n.Index, p.IP)
		}
	}
	return pods, nil
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func show(ctx context.Context, n *lab.Node, args ...string) error {
	out, err := n.CLI(ctx, args...)
	fmt.Print(indent(string(out)))
	return err
}

func pingOut(ctx context.Context, from, to *lab.Pod) error {
	out, err := from.Exec(ctx, "ping", "-c", "3", "-i", "0.2", "-W", "2", to.IP.String())
	fmt.Print(indent(string(out)))
	return err
}

func iperf(ctx context.Context, from, to *lab.Pod) error {
	srv, err := to.Start(ctx, "iperf3", "-s", "-1")
	if err != nil {
		return err
	}
	if err := to.WaitListening(ctx, 5201); err != nil {
		return err
	}
	out, err := from.Exec(ctx, "iperf3", "-c", to.IP.String(), "-t", "3", "-J")
	if err != nil {
		return fmt.Errorf("iperf3: %w", err)
	}
	var res struct {
		End struct {
			SumReceived struct {
				Bytes         float64 `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
			SumSent struct {
				Retransmits int `json:"retransmits"`
			} `json:"sum_sent"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return fmt.Errorf("parse iperf3 output: %w", err)
	}
	fmt.Printf("    %.2f Gbit/s, %.0f MB received, %d retransmits (3 s, 1 TCP stream)\n",
		res.End.SumReceived.BitsPerSecond/1e9, res.End.SumReceived.Bytes/1e6, res.End.SumSent.Retransmits)
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	return nil
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ") + "\n"
}
