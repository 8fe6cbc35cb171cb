package bgp

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	api "github.com/osrg/gobgp/v3/api"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/patchcord/patchcord/pkg/nodes"
)

func TestParseNeighbor(t *testing.T) {
	n, err := ParseNeighbor("198.18.1.254,65000")
	if err != nil || n != (Neighbor{Addr: netip.MustParseAddr("198.18.1.254"), ASN: 65000}) {
		t.Fatalf("ParseNeighbor: %+v, %v", n, err)
	}
	for _, bad := range []string{"198.18.1.254", "198.18.1.254,", "fd00::1,65000", "198.18.1.254,0", "198.18.1.254,4294967296", "x,1"} {
		if _, err := ParseNeighbor(bad); err == nil {
			t.Errorf("ParseNeighbor(%q) took it", bad)
		}
	}
}

func validConfig() Config {
	return Config{ASN: 64601, RouterID: netip.MustParseAddr("198.18.1.1"), PodCIDR: netip.MustParsePrefix("10.244.1.0/24"),
		Neighbors: []Neighbor{{Addr: netip.MustParseAddr("198.18.1.254"), ASN: 65000}}, RestartTime: 120 * time.Second, ListenPort: 179}
}

func TestValidate(t *testing.T) {
	if err := validConfig().Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for _, tc := range []struct {
		flag string
		edit func(*Config)
	}{
		{"--bgp-asn", func(c *Config) { c.ASN = 0 }},
		{"--bgp-neighbor", func(c *Config) { c.Neighbors = nil }},
		{"--bgp-neighbor", func(c *Config) { c.Neighbors[0].Addr = c.RouterID }},
		{"--bgp-restart-time", func(c *Config) { c.RestartTime = 4096 * time.Second }},
		{"--bgp-restart-time", func(c *Config) { c.RestartTime = 0 }},
		{"--bgp-listen-port", func(c *Config) { c.ListenPort = 0 }},
		{"router ID", func(c *Config) { c.RouterID = netip.MustParseAddr("fd00::1") }},
	} {
		c := validConfig()
		tc.edit(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.flag) {
			t.Errorf("%s: error %v, want one naming %s", tc.flag, err, tc.flag)
		}
	}
}

func path(t *testing.T, neighbor string, srcASN uint32, prefix, nextHop string) *api.Path {
	t.Helper()
	p := netip.MustParsePrefix(prefix)
	pack := func(m proto.Message) *anypb.Any {
		a, err := anypb.New(m)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	return &api.Path{
		Nlri:       pack(&api.IPAddressPrefix{Prefix: p.Addr().String(), PrefixLen: uint32(p.Bits())}),
		Pattrs:     []*anypb.Any{pack(&api.OriginAttribute{}), pack(&api.NextHopAttribute{NextHop: nextHop})},
		NeighborIp: neighbor, SourceAsn: srcASN, Best: true,
	}
}

// What a neighbour announces is a pod CIDR to route only where it could be
// one: not our own announcement, not via ourselves, inside Accept.
func TestLearned(t *testing.T) {
	cfg := validConfig()
	cfg.Accept = netip.MustParsePrefix("10.244.0.0/16")
	s := &Speaker{cfg: cfg}
	r, ok := s.learned(path(t, "198.18.1.254", 65000, "10.244.2.0/24", "198.18.1.254"))
	want := Route{Prefix: netip.MustParsePrefix("10.244.2.0/24"), NextHop: netip.MustParseAddr("198.18.1.254"), Peer: netip.MustParseAddr("198.18.1.254")}
	if !ok || r != want {
		t.Errorf("learned: %+v %v, want %+v", r, ok, want)
	}
	for name, p := range map[string]*api.Path{
		"our own":        path(t, "<nil>", 0, "10.244.1.0/24", "0.0.0.0"),
		"via this node":  path(t, "198.18.1.254", 65000, "10.244.3.0/24", "198.18.1.1"),
		"outside accept": path(t, "198.18.1.254", 65000, "192.0.2.0/24", "198.18.1.254"),
		"covers accept":  path(t, "198.18.1.254", 65000, "10.0.0.0/8", "198.18.1.254"),
		"default route":  path(t, "198.18.1.254", 65000, "0.0.0.0/0", "198.18.1.254"),
		"ipv6 next hop":  path(t, "198.18.1.254", 65000, "10.244.4.0/24", "fd00::1"),
		"bad next hop":   path(t, "198.18.1.254", 65000, "10.244.5.0/24", "x"),
	} {
		if r, ok := s.learned(p); ok {
			t.Errorf("%s: learned %+v", name, r)
		}
	}
}

func TestMerge(t *testing.T) {
	router := netip.MustParseAddr("198.18.1.254")
	n2 := nodes.Node{Name: "n2", NodeIP: netip.MustParseAddr("198.18.2.2"), PodCIDR: netip.MustParsePrefix("10.244.2.0/24"), Routing: nodes.Native}
	n3 := nodes.Node{Name: "n3", NodeIP: netip.MustParseAddr("198.18.1.3"), PodCIDR: netip.MustParsePrefix("10.244.3.0/24")}
	got := Merge([]nodes.Node{n2, n3}, []Route{
		{Prefix: n2.PodCIDR, NextHop: router, Peer: router},
		{Prefix: netip.MustParsePrefix("10.244.9.0/24"), NextHop: router, Peer: router},
	})
	n2via := n2
	n2via.Via = router
	want := []nodes.Node{n2via, n3, {Name: "bgp:10.244.9.0/24", NodeIP: router, PodCIDR: netip.MustParsePrefix("10.244.9.0/24"), Routing: nodes.Native, Via: router}}
	if !slices.EqualFunc(got, want, func(a, b nodes.Node) bool { return sameSet([]nodes.Node{a}, []nodes.Node{b}) }) {
		t.Errorf("Merge:\n got %+v\nwant %+v", got, want)
	}
}
