package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/views"
	"github.com/spf13/cobra"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// golden compares got with testdata/<name>.golden.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s--- want\n%s", path, got, want)
	}
}

// table renders a formatter as g.print does.
func table(fn func(w *tabwriter.Writer)) []byte {
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 4, 2, ' ', 0)
	fn(tw)
	tw.Flush()
	return buf.Bytes()
}

const root = "/sys/fs/bpf/patchcord"

func pin(prog, ifname string) string { return filepath.Join(root, "links", prog, ifname) }

// A node with three pods: pc1 is fine, pc2's link outlived a recreated veth,
// pc3 lost its link; pcgone's veth is gone with no endpoint left; the uplink
// has from_uplink but no to_uplink.
var (
	testAtts = []datapath.Attachment{
		{Program: "from_pod", Ifname: "pc1", Ifindex: 5, Direction: "ingress", Mode: datapath.AttachTCX, LinkID: 11, ProgID: 101, Pin: pin("from_pod", "pc1")},
		{Program: "from_pod", Ifname: "pc2", Ifindex: 6, Direction: "ingress", Mode: datapath.AttachTCX, LinkID: 12, ProgID: 101, Pin: pin("from_pod", "pc2"), Stale: true},
		{Program: "from_pod", Ifname: "pcgone", Direction: "ingress", Mode: datapath.AttachTC, ProgID: 99, Pin: pin("from_pod", "pcgone"), Stale: true},
		{Program: "from_uplink", Ifname: "eth0", Ifindex: 2, Direction: "ingress", Mode: datapath.AttachTCX, LinkID: 14, ProgID: 102, Pin: pin("from_uplink", "eth0")},
	}
	testEps = []bpfmaps.EndpointInfo{
		{IP: netip.MustParseAddr("10.244.1.3"), Ifindex: 7, Ifname: "pc3"},
		{IP: netip.MustParseAddr("10.244.1.2"), Ifindex: 6, Ifname: "pc2"},
		{IP: netip.MustParseAddr("10.244.1.1"), Ifindex: 5, Ifname: "pc1"},
	}
	testTags = map[ebpf.ProgramID]string{101: "1a2b3c4d5e6f7a8b", 102: "0011223344556677"}
)

func testTag(id ebpf.ProgramID) string { return testTags[id] }

func TestProgListTable(t *testing.T) {
	rows := views.BuildProgRows(testAtts, testEps, "eth0", 2, testTag)
	golden(t, "prog_list", table(func(w *tabwriter.Writer) { formatProgTable(w, rows) }))
}

func TestProgListRows(t *testing.T) {
	rows := views.BuildProgRows(testAtts, testEps, "eth0", 2, testTag)
	type key struct{ prog, ifname, status, podIP string }
	var got []key
	for _, r := range rows {
		got = append(got, key{r.Program, r.Ifname, r.Status, r.PodIP})
	}
	want := []key{
		{"from_pod", "pc1", "ok", "10.244.1.1"},
		{"from_pod", "pc2", "stale", "10.244.1.2"},
		{"from_pod", "pc3", "missing", "10.244.1.3"},
		{"from_pod", "pcgone", "stale", ""},
		{"from_uplink", "eth0", "ok", ""},
		{"to_uplink", "eth0", "missing", ""},
	}
	if !slices.Equal(got, want) {
		t.Errorf("rows:\n got %v\nwant %v", got, want)
	}
	// Without a configured uplink nothing is missing on it.
	for _, r := range views.BuildProgRows(nil, nil, "", 0, testTag) {
		t.Errorf("unexpected row %+v", r)
	}
}

// TestProgListJSON decodes the JSON into the shape the README documents.
func TestProgListJSON(t *testing.T) {
	rows := views.BuildProgRows(testAtts, testEps, "eth0", 2, testTag)
	var buf bytes.Buffer
	g := &globals{output: "json"}
	if err := g.print(&buf, rows, nil); err != nil {
		t.Fatal(err)
	}
	var doc []map[string]any
	if err := json.Unmarshal(buf.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	wantKeys := []string{"direction", "ifindex", "ifname", "linkID", "mode", "pin", "podIP", "progID", "program", "status", "tag"}
	if got := slices.Sorted(keys(doc[0])); !slices.Equal(got, wantKeys) {
		t.Errorf("keys: got %v, want %v", got, wantKeys)
	}
	first := map[string]any{
		"ifname": "pc1", "ifindex": 5.0, "direction": "ingress", "program": "from_pod", "progID": 101.0,
		"tag": "1a2b3c4d5e6f7a8b", "linkID": 11.0, "mode": "tcx", "pin": pin("from_pod", "pc1"), "status": "ok", "podIP": "10.244.1.1",
	}
	if !reflect.DeepEqual(doc[0], first) {
		t.Errorf("first row:\n got %v\nwant %v", doc[0], first)
	}
	if doc[2]["status"] != "missing" || doc[2]["pin"] != "" || doc[2]["progID"] != 0.0 {
		t.Errorf("missing row: %v", doc[2])
	}
}

func TestJudgeAttachments(t *testing.T) {
	rows := views.BuildProgRows(testAtts, testEps, "eth0", 2, testTag)
	n, problems, warnings := views.JudgeAttachments(rows, "eth0")
	if n != (views.AttachmentCounts{OK: 2, Stale: 2, Missing: 2}) {
		t.Errorf("counts: %+v", n)
	}
	wantProblems := []string{
		"from_pod on pc2 (pod 10.244.1.2) is stale (interface recreated or old program): the agent replaces it within 10 s (is it running?)",
		"from_pod is not attached to pc3 (pod 10.244.1.3): the agent restores it within 10 s (is it running?)",
		"to_uplink is not attached to eth0 (uplink): the agent restores it within 10 s (is it running?)",
	}
	if !slices.Equal(problems, wantProblems) {
		t.Errorf("problems:\n got %q\nwant %q", problems, wantProblems)
	}
	wantWarnings := []string{"from_pod link on pcgone is stale and serves no pod: the agent removes it"}
	if !slices.Equal(warnings, wantWarnings) {
		t.Errorf("warnings:\n got %q\nwant %q", warnings, wantWarnings)
	}
}

func testStatus() views.Status {
	loaded := time.Date(2025, 1, 2, 15, 4, 5, 0, time.Local)
	return views.Status{
		Root:   root,
		Loaded: true,
		Programs: []views.Program{
			{Name: "from_pod", ID: 101, Tag: "1a2b3c4d5e6f7a8b", LoadedAt: &loaded},
			{Name: "from_uplink", ID: 102, Tag: "0011223344556677", LoadedAt: &loaded},
			{Name: "to_uplink", ID: 103, Tag: "8899aabbccddeeff", LoadedAt: &loaded},
		},
		Config:       &views.Config{Configured: true, NodeIP: "198.18.0.1", Uplink: "eth0", UplinkIfindex: 2, VNI: 1, VXLANPort: 4789, PodMTU: 1450},
		AgentRunning: true,
		AttachMode:   string(datapath.AttachTCX),
		NATDetection: views.NAT{On: true},
		Kernel:       "6.18.0",
		Attachments:  views.AttachmentCounts{OK: 4},
		Endpoints:    2,
		Nodes:        3,
		NativeNodes:  2,
		BGP: []views.BGPNeighbor{
			{Neighbor: "198.18.1.253", ASN: "65000", Routes: 0},
			{Neighbor: "198.18.1.254", ASN: "65000", Established: true, Routes: 2},
		},
		Drops:     map[string]uint64{"drop_spoofed": 3, "drop_bad_vni": 1, "drop_malformed": 0},
		DropTotal: 4,
		Healthy:   true,
		Problems:  []string{},
		Warnings:  []string{},
	}
}

func TestStatusTable(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		v := testStatus()
		golden(t, "status_ok", table(func(w *tabwriter.Writer) { formatStatus(w, v) }))
	})
	t.Run("broken", func(t *testing.T) {
		v := testStatus()
		v.AgentRunning, v.Tracing, v.Healthy = false, true, false
		v.AttachMode = string(datapath.AttachTC)
		v.NATDetection = views.NAT{Why: "nf_conntrack not loaded: its kfuncs bpf_skb_ct_lookup/bpf_ct_release are missing from kernel BTF"}
		v.Attachments = views.AttachmentCounts{OK: 3, Missing: 1}
		v.Kernel, v.Features = "6.1.0-57-amd64", datapath.Features{
			{Name: datapath.FeatureRedirectPeer, Since: "5.10", Have: true},
			{Name: datapath.FeatureDecapFlags, Since: "6.3", Why: "refused", Without: "decap with FIXED_GSO alone"},
			{Name: datapath.FeatureCTKfuncs, Since: "6.0", Why: "nf_conntrack not loaded", Without: "NAT check off"},
		}
		v.Problems = []string{
			"from_pod is not attached to pc3 (pod 10.244.1.3): the agent restores it within 10 s (is it running?)",
			"agent not running: start `patchcord agent` (pods keep forwarding, but node changes and repairs wait for it)",
		}
		v.Warnings = []string{"tracing is on but no monitor runs (one crashed?): start and stop `patchcord monitor --type trace` to switch it off"}
		golden(t, "status_broken", table(func(w *tabwriter.Writer) { formatStatus(w, v) }))
	})
	t.Run("not loaded", func(t *testing.T) {
		v := views.Status{Root: root, Problems: []string{"datapath not loaded under " + root + ": is the agent or the CNI plugin installed?"}}
		golden(t, "status_not_loaded", table(func(w *tabwriter.Writer) { formatStatus(w, v) }))
	})
}

// TestStatusJSON decodes status JSON into the shape the README documents.
func TestStatusJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := (&globals{output: "json"}).print(&buf, testStatus(), nil); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(buf.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	want := []string{"agentRunning", "attachMode", "attachments", "bgp", "config", "dropTotal", "drops", "endpoints", "eventsLost", "features",
		"healthy", "kernel", "loaded", "monitoring", "natDetection", "nativeNodes", "nodes", "problems", "programs", "root", "tracing", "warnings"}
	if got := slices.Sorted(keys(doc)); !slices.Equal(got, want) {
		t.Errorf("keys:\n got %v\nwant %v", got, want)
	}
	if nat := doc["natDetection"]; !reflect.DeepEqual(nat, map[string]any{"on": true}) {
		t.Errorf("natDetection: got %v, want {on: true}", nat)
	}
	var typed struct {
		Config struct {
			Configured bool   `json:"configured"`
			NodeIP     string `json:"nodeIP"`
			Uplink     string `json:"uplink"`
			VNI        uint32 `json:"vni"`
			VXLANPort  uint16 `json:"vxlanPort"`
			PodMTU     int    `json:"podMTU"`
		} `json:"config"`
		Programs []struct {
			Name, Tag string
			ID        uint32
			LoadedAt  time.Time
		} `json:"programs"`
		Attachments struct{ OK, Stale, Missing int } `json:"attachments"`
		Drops       map[string]uint64                `json:"drops"`
	}
	if err := json.Unmarshal(buf.Bytes(), &typed); err != nil {
		t.Fatal(err)
	}
	if c := typed.Config; !c.Configured || c.NodeIP != "198.18.0.1" || c.Uplink != "eth0" || c.VNI != 1 || c.VXLANPort != 4789 || c.PodMTU != 1450 {
		t.Errorf("config: %+v", c)
	}
	if len(typed.Programs) != 3 || typed.Programs[0].Tag != "1a2b3c4d5e6f7a8b" || typed.Programs[0].LoadedAt.IsZero() {
		t.Errorf("programs: %+v", typed.Programs)
	}
	if typed.Attachments.OK != 4 || typed.Drops["drop_spoofed"] != 3 {
		t.Errorf("attachments %+v, drops %v", typed.Attachments, typed.Drops)
	}
	// Empty lists are [], never null: scripts iterate over them.
	for _, k := range []string{"problems", "warnings"} {
		if _, ok := doc[k].([]any); !ok {
			t.Errorf("%s: got %v, want a list", k, doc[k])
		}
	}
}

func keys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// TestEveryCommandHasExamples walks the command tree: --help of every
// command shows how to use it.
func TestEveryCommandHasExamples(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Name() == "completion" || c.Name() == "help" || c.Hidden {
			return
		}
		if c.Example == "" {
			t.Errorf("%q has no examples", c.CommandPath())
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRootCmd())
}

func TestUnknownOutputFormat(t *testing.T) {
	cmd := newRootCmd()
	cmd.SetArgs([]string{"--bpffs-root", t.TempDir(), "-o", "yaml", "bpf", "stats"})
	cmd.SetOut(new(bytes.Buffer))
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), "use table or json") {
		t.Errorf("got %v, want an error listing the formats", err)
	}
}

func TestCompletionBash(t *testing.T) {
	cmd := newRootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"completion", "bash"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "__start_patchcord") {
		t.Errorf("no bash completion script:\n%.200s", out.String())
	}
}
