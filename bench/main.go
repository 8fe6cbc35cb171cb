// Command bench is `make bench`: it builds, in network namespaces only, the
// datapaths patchcord replaces and competes with, next to patchcord itself,
// and measures them all on the same machine with real tools:
//
//   - same node: a bare veth pair (the floor), patchcord, the reference
//     bridge and ptp plugins;
//   - across two emulated nodes: host-gw routing (the ceiling), the
//     kernel's vxlan set up as Flannel does, patchcord;
//   - patchcord again with 1,000 endpoints and 5,000 nodes in its maps;
//   - the BPF programs' own cost per path (BPF_PROG_RUN);
//   - CNI ADD/DEL latency against bridge + host-local, and the agent's sync
//     time for a nodes file of 5,000 nodes.
//
// Traffic runs in interleaved rounds and every figure is also given as a
// ratio to a reference measured in the same round, because the absolute
// figures of a shared machine drift. The report goes to stdout as Markdown,
// every sample to a JSON file; progress goes to stderr. It needs root, and
// the tools `make bench` installs (iperf3, sockperf, cnitool, the reference
// plugins, the patchcord binaries).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/patchcord/patchcord/internal/lab"
)

type options struct {
	rounds   int
	duration time.Duration
	quick    bool
	out      string
	only     []string
	bpfRuns  int
	cniPods  int
	links    []lab.Links
	// kubeProxy loads kube-proxy's rules into every cross-node node.
	kubeProxy bool
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, opts)
	stop()
	if err != nil {
		slog.Error(err.Error())
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	var o options
	var only, links string
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.IntVar(&o.rounds, "rounds", 3, "interleaved rounds of every traffic figure, BPF path and CNI batch")
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "length of each iperf3 and sockperf run (whole seconds)")
	fs.BoolVar(&o.quick, "quick", false, "smoke run: 1 round of 2 s runs, fewer BPF runs and pods (explicit flags win)")
	fs.StringVar(&o.out, "out", filepath.Join("bench", "results.json"), "where to write the JSON results")
	fs.StringVar(&only, "only", strings.Join(allGroups, ","), "groups to run: "+strings.Join(allGroups, ","))
	fs.IntVar(&o.bpfRuns, "bpf-runs", 20000, "cold BPF_PROG_RUN calls per path per round (a tenth as many steady-state pairs)")
	fs.IntVar(&o.cniPods, "cni-pods", 50, "sequential ADDs (then DELs) per plugin per round")
	fs.BoolVar(&o.kubeProxy, "kube-proxy", false, fmt.Sprintf("load kube-proxy's iptables rules for %d services into every cross-node node, as every Kubernetes node has them: traffic the host stack forwards then passes conntrack and kube-proxy's chains", kubeProxyServices))
	fs.StringVar(&links, "links", "both", "cross-node uplinks: veth (GSO packets cross whole), nic (NIC-like: TSO/GSO off, GRO on) or both, interleaved")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.quick {
		quick := map[string]func(){
			"rounds":   func() { o.rounds = 1 },
			"duration": func() { o.duration = 2 * time.Second },
			"bpf-runs": func() { o.bpfRuns = 2000 },
			"cni-pods": func() { o.cniPods = 20 },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	for _, g := range strings.Split(only, ",") {
		g = strings.TrimSpace(g)
		if !slices.Contains(allGroups, g) {
			return o, fmt.Errorf("--only: unknown group %q (groups: %s)", g, strings.Join(allGroups, ","))
		}
		o.only = append(o.only, g)
	}
	var err error
	if o.links, err = parseLinks(links); err != nil {
		return o, err
	}
	if o.rounds < 1 || o.duration < time.Second || o.bpfRuns < 1 || o.cniPods < 1 {
		return o, errors.New("--rounds, --bpf-runs and --cni-pods must be at least 1, --duration at least 1s")
	}
	return o, nil
}

func (o options) has(group string) bool { return slices.Contains(o.only, group) }

func (o options) secs() int { return max(1, int(math.Round(o.duration.Seconds()))) }

// tools are the binaries the bench drives.
type tools struct {
	binDir  string   // patchcord and patchcord-cni
	cniDirs []string // the reference plugins
	cnitool string
}

func (t tools) cniPath() string { return strings.Join(append([]string{t.binDir}, t.cniDirs...), ":") }

// env returns the variable, or def.
func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// findTools resolves what `make bench` installs, from the environment the
// Makefile sets or the repository's bin/.
func findTools() (tools, error) {
	var t tools
	bin, err := filepath.Abs(env("PATCHCORD_BIN", "bin"))
	if err != nil {
		return t, err
	}
	t.binDir = bin
	for _, b := range []string{"patchcord", "patchcord-cni"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return t, fmt.Errorf("%s not found in %s: run `make bench` (or `make build`), or set PATCHCORD_BIN", b, bin)
		}
	}
	var tried []string
	for _, dir := range []string{os.Getenv("CNI_PLUGINS"), "bin/cni", "/opt/cni/bin"} {
		if dir == "" {
			continue
		}
		tried = append(tried, dir)
		if hasAll(dir, "host-local", "ptp", "bridge") {
			abs, err := filepath.Abs(dir)
			if err != nil {
				return t, err
			}
			t.cniDirs = []string{abs}
			break
		}
	}
	if t.cniDirs == nil {
		return t, fmt.Errorf("reference CNI plugins (host-local, ptp, bridge) not found in %v: run `make tools` or set CNI_PLUGINS", tried)
	}
	if t.cnitool, err = exec.LookPath(env("CNITOOL", "bin/tools/cnitool")); err != nil {
		if t.cnitool, err = exec.LookPath("cnitool"); err != nil {
			return t, errors.New("cnitool not found: run `make tools` or set CNITOOL")
		}
	}
	if t.cnitool, err = filepath.Abs(t.cnitool); err != nil {
		return t, err
	}
	for _, name := range []string{"iperf3", "sockperf", "ping", "ip", "ss", "nsenter"} {
		if _, err := exec.LookPath(name); err != nil {
			return t, fmt.Errorf("%s not found: run `make deps` (Debian packages iperf3, sockperf, iputils-ping, iproute2)", name)
		}
	}
	return t, nil
}

func hasAll(dir string, names ...string) bool {
	for _, n := range names {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			return false
		}
	}
	return true
}

// progress reports on stderr; stdout carries only the report.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func run(ctx context.Context, o options) (err error) {
	if err := lab.CheckRoot("bench"); err != nil {
		return err
	}
	t, err := findTools()
	if err != nil {
		return err
	}
	started := time.Now()
	res := &Results{Machine: machineFacts(), Settings: Settings{
		Rounds: o.rounds, RunSeconds: o.secs(), Groups: o.only, BPFRuns: o.bpfRuns,
		CNIPods: o.cniPods, ScaleNodes: scaleNodes, ScaleEndpoints: scaleEndpoints,
	}}
	if o.kubeProxy {
		res.Settings.KubeProxyServices = kubeProxyServices
	}
	progress("bench: groups %s, %d rounds of %d s runs; machine %s ×%d, kernel %s, load %.2f",
		strings.Join(o.only, ","), o.rounds, o.secs(), res.Machine.Model, res.Machine.CPUs, res.Machine.Kernel, res.Machine.LoadStart)

	// Leftovers of a killed run; labs of live processes are never touched.
	if err := lab.Sweep(""); err != nil {
		progress("sweep old labs: %v", err)
	}
	l, err := lab.New(lab.Options{
		Log:     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		BinDir:  t.binDir,
		CNIPath: t.cniDirs,
		CNITool: t.cnitool,
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, l.Close()) }()
	b := newBuilder(l, t)

	subjects, err := runGroups(ctx, o, b, res)
	if err != nil {
		return err
	}

	res.Summaries = summarize(subjects, res.Samples)
	res.Targets = evaluate(subjects, res)
	res.Machine.LoadEnd = loadAverage()
	res.Elapsed = time.Since(started).Round(time.Second).String()
	render(os.Stdout, res, subjects)
	if err := res.write(o.out); err != nil {
		return err
	}
	progress("results written to %s", o.out)
	return nil
}

// runGroups sets up every group o asks for, then runs their rounds, adding
// samples to res; it returns the traffic subjects for the summaries.
func runGroups(ctx context.Context, o options, b *builder, res *Results) (subjects []*subject, err error) {
	subjects, err = setupTraffic(ctx, o, b, res)
	if err != nil {
		return nil, err
	}
	var bpfPairs []*bpfPair
	if o.has(groupBPF) {
		bpfPairs, err = setupBPF(b)
		defer func() {
			for _, p := range bpfPairs {
				p.close()
			}
		}()
		if err != nil {
			return nil, err
		}
	}
	var cniSubjects []*cniSubject
	if o.has(groupCNI) {
		progress("setup: CNI nodes, %d pod namespaces per plugin", o.cniPods)
		if cniSubjects, err = b.cniSubjects(ctx, o.cniPods); err != nil {
			return nil, err
		}
	}

	if err := trafficRounds(ctx, o, subjects, res); err != nil {
		return nil, err
	}
	if len(subjects) > 0 {
		if res.Scale, err = checkScale(ctx, b.loaded); err != nil {
			return nil, err
		}
	}
	if err := bpfRounds(o, bpfPairs, res); err != nil {
		return nil, err
	}
	if err := controlPlane(ctx, o, b, cniSubjects, res); err != nil {
		return nil, err
	}

	return subjects, nil
}

// controlPlane times CNI ADD and DEL in rounds, then the agent's sync.
func controlPlane(ctx context.Context, o options, b *builder, subjects []*cniSubject, res *Results) error {
	if len(subjects) == 0 {
		return nil
	}
	res.CNI = &CNIResults{GroupResults: GroupResults[CNISample, CNISummary]{Method: cniMethod}, Pods: o.cniPods}
	for round := 1; round <= o.rounds; round++ {
		progress("cni: round %d/%d", round, o.rounds)
		samples, err := b.tools.cniRound(ctx, subjects, round)
		if err != nil {
			return err
		}
		res.CNI.Samples = append(res.CNI.Samples, samples...)
	}
	res.CNI.Summary = summarizeCNI(res.CNI.Samples)
	progress("agent: sync with %d nodes in the nodes file", scaleNodes)
	var err error
	res.Agent, err = b.measureAgentSync(ctx, o.rounds)
	return err
}

// setupTraffic builds the traffic datapaths of the selected groups, starts
// their servers and checks that each forwards.
func setupTraffic(ctx context.Context, o options, b *builder, res *Results) ([]*subject, error) {
	if !o.has(groupSame) && !o.has(groupCross) {
		return nil, nil
	}
	progress("setup: patchcord nodes and agents (the loaded pair syncs %d nodes)", scaleNodes)
	pc, err := b.patchcordPair(ctx, nodePatchcordA, nodePatchcordB, 0)
	if err != nil {
		return nil, err
	}
	if b.loaded, err = b.loadedPair(ctx); err != nil {
		return nil, err
	}
	var subjects []*subject
	for _, g := range []struct {
		name  string
		build func(context.Context, *pcPair, *pcPair) ([]*subject, error)
	}{{groupSame, b.sameNode}, {groupCross, b.crossNode}} {
		if !o.has(g.name) {
			continue
		}
		progress("setup: " + g.name + " datapaths")
		s, err := g.build(ctx, pc, b.loaded)
		if err != nil {
			return nil, err
		}
		if g.name == groupCross {
			if o.kubeProxy {
				if err := loadKubeProxy(ctx, s); err != nil {
					return nil, err
				}
			}
			s = withLinks(s, o.links)
		}
		subjects = append(subjects, s...)
	}
	// Link-mode copies share their server: started once.
	serving := map[host]bool{}
	for _, s := range subjects {
		if !serving[s.Server] {
			if err := startServers(ctx, s); err != nil {
				return nil, fmt.Errorf("%s: %w", s.Name, err)
			}
			serving[s.Server] = true
		}
		if err := warmUp(ctx, s); err != nil {
			return nil, err
		}
		res.Datapaths = append(res.Datapaths, s.DatapathInfo)
	}
	return subjects, nil
}

// trafficRounds measures every datapath once per round. Within a round
// each measurement runs on every datapath back to back, so that a datapath
// and the reference its ratio is taken to run seconds apart, not minutes;
// each round starts one datapath further down the list, so that none
// always runs first.
func trafficRounds(ctx context.Context, o options, subjects []*subject, res *Results) error {
	modes := uplinkModes{}
	for round := 1; round <= o.rounds && len(subjects) > 0; round++ {
		k := (round - 1) % len(subjects)
		order := append(slices.Clone(subjects[k:]), subjects[:k]...)
		for _, m := range measurements {
			progress("traffic: round %d/%d, %s", round, o.rounds, m.name)
			for _, s := range order {
				if err := modes.set(ctx, s); err != nil {
					return err
				}
				samples, err := measure(ctx, s, m, round, o.secs())
				if err != nil {
					return err
				}
				res.Samples = append(res.Samples, samples...)
			}
		}
	}
	return nil
}

// setupBPF loads, for each map state, a plain and a self-feeding datapath
// on lab nodes' bpffs, and checks that every packet takes the path it names.
func setupBPF(b *builder) ([]*bpfPair, error) {
	progress("setup: BPF datapaths (minimal maps, and %d endpoints + %d nodes)", scaleEndpoints, scaleNodes)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var pairs []*bpfPair
	for _, c := range []struct {
		plain, feeds int
		state        string
	}{{nodeBPFMinimal, nodeBPFMinimalFeed, mapsMinimal}, {nodeBPFLoaded, nodeBPFLoadedFeed, mapsLoaded}} {
		p := &bpfPair{maps: c.state}
		for _, d := range []struct {
			index int
			feeds bool
			dst   **bpfDatapath
		}{{c.plain, false, &p.plain}, {c.feeds, true, &p.feeds}} {
			n, err := b.node(d.index)
			if err != nil {
				return pairs, err
			}
			if *d.dst, err = openBPFDatapath(n, c.state, d.feeds, log); err != nil {
				if p.plain != nil {
					p.plain.dp.Close()
				}
				return pairs, err
			}
		}
		pairs = append(pairs, p)
		if err := p.verify(bpfPaths()); err != nil {
			return pairs, err
		}
	}
	return pairs, nil
}

func bpfRounds(o options, pairs []*bpfPair, res *Results) error {
	if len(pairs) == 0 {
		return nil
	}
	empty, err := emptyProgram()
	if err != nil {
		return fmt.Errorf("load empty program: %w", err)
	}
	defer empty.Close()
	res.BPF = &BPFResults{Method: bpfMethod}
	paths := bpfPaths()
	for round := 1; round <= o.rounds; round++ {
		progress("bpf: round %d/%d", round, o.rounds)
		for _, p := range pairs {
			samples, err := p.measure(paths, empty, round, o.bpfRuns)
			if err != nil {
				return err
			}
			res.BPF.Samples = append(res.BPF.Samples, samples...)
		}
	}
	res.BPF.Summary = summarizeBPF(paths, res.BPF.Samples)
	return nil
}
