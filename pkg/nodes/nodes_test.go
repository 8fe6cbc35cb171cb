package nodes

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/sourcetest"
)

func TestParse(t *testing.T) {
	good := `{"nodes":[{"name":"node1","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"},` +
		`{"name":"node2","nodeIP":"198.18.0.2","podCIDR":"10.244.2.0/24","vtepMAC":"0e:00:00:00:00:02"},` +
		`{"name":"node3","nodeIP":"198.18.0.3","podCIDR":"10.244.3.0/24","routing":"native"}]}`
	nodes, err := Parse([]byte(good))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if len(nodes) != 3 || nodes[0].Routing != RoutingDefault || nodes[2].Routing != Native || nodes[1].VtepMAC.String() != "0e:00:00:00:00:02" || nodes[0].VtepMAC != nil ||
		nodes[0].PodCIDR.String() != "10.244.1.0/24" || nodes[1].NodeIP.String() != "198.18.0.2" {
		t.Errorf("parse: got %+v", nodes)
	}

	bad := []struct{ name, in, want string }{
		{"not json", `{"nodes":`, "parse nodes file"},
		{"no array", `{}`, `no "nodes" array`},
		{"unknown field", `{"nodes":[],"extra":1}`, "unknown field"},
		{"missing name", `{"nodes":[{"nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"}]}`, "nodes[0].name"},
		{"bad ip", `{"nodes":[{"name":"a","nodeIP":"198.18.0","podCIDR":"10.244.1.0/24"}]}`, "nodes[0].nodeIP"},
		{"ipv6 ip", `{"nodes":[{"name":"a","nodeIP":"fd00::1","podCIDR":"10.244.1.0/24"}]}`, "nodes[0].nodeIP"},
		{"bad cidr", `{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0"}]}`, "nodes[0].podCIDR"},
		{"host bits", `{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.1/24"}]}`, "did you mean 10.244.1.0/24"},
		{"duplicate cidr", `{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"},{"name":"b","nodeIP":"198.18.0.2","podCIDR":"10.244.1.0/24"}]}`, "nodes[1].podCIDR"},
		{"bad routing", `{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24","routing":"bgp"}]}`, "nodes[0].routing"},
		{"bad mac", `{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24","vtepMAC":"zz"}]}`, "nodes[0].vtepMAC"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// The file source delivers the first set, each change, and keeps quiet
// about a bad file (the agent keeps the last good set).
func TestFileFollowsChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nodes.json")
	write := func(s string) {
		t.Helper()
		// Replace by rename, as editors and config management do.
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"}]}`)

	src := &File{Path: path, Interval: 20 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	updates := sourcetest.Start(t, src.Run)
	if set := updates.Next(t); len(set) != 1 {
		t.Fatalf("first set: %+v", set)
	}
	write(`{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"`) // cut short
	write(`{"nodes":[{"name":"a","nodeIP":"198.18.0.1","podCIDR":"10.244.1.0/24"},{"name":"b","nodeIP":"198.18.0.2","podCIDR":"10.244.2.0/24"}]}`)
	if set := updates.Next(t); len(set) != 2 {
		t.Fatalf("after change: %+v, want 2 nodes (the bad file in between must not be sent)", set)
	}
}

// TestWriteFile checks that what WriteFile writes, Parse reads back, and
// that no temporary file stays beside it.
func TestWriteFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nodes.json")
	entries := []Entry{
		{Name: "a", NodeIP: "198.18.0.1", PodCIDR: "10.244.1.0/24"},
		{Name: "f", NodeIP: "198.18.0.4", PodCIDR: "10.244.4.0/24", VtepMAC: "0e:00:00:00:00:04"},
	}
	if err := WriteFile(path, entries); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(data)
	if err != nil {
		t.Fatalf("parse what WriteFile wrote: %v\n%s", err, data)
	}
	if len(got) != 2 || got[0].Name != "a" || got[1].PodCIDR.String() != "10.244.4.0/24" || got[1].VtepMAC.String() != "0e:00:00:00:00:04" {
		t.Errorf("read back %+v from\n%s", got, data)
	}
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file left: %v", err)
	}
}
