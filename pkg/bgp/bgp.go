// Package bgp is the agent's BGP speaker: GoBGP as a library, peered with
// the configured neighbours (top-of-rack routers, route reflectors, or the
// other nodes), announcing this node's pod CIDR and learning the others'.
// What it learns reaches the agent as native nodes merged into the node
// source's sets (Source), so the node map and the kernel's routes follow
// BGP through the agent's one sync.
//
// Restarts withdraw nothing: every session offers graceful restart, so a
// neighbour keeps this node's routes while the agent is away (killed or
// upgraded: the agent never sends a Cease, its sockets just close); and a
// restarted agent sends no node set until every neighbour has sent its
// End-of-RIB (or ConvergeTimeout passed), so it never removes a learned
// route it has not yet learned again.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	api "github.com/osrg/gobgp/v3/api"
	gobgplog "github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/server"
	"google.golang.org/protobuf/types/known/anypb"
)

// Neighbor is one BGP peer.
type Neighbor struct {
	Addr netip.Addr
	ASN  uint32
}

// ParseNeighbor reads "ADDR,ASN" (e.g. "198.18.1.254,65000").
func ParseNeighbor(s string) (Neighbor, error) {
	addr, asn, ok := strings.Cut(s, ",")
	if !ok {
		return Neighbor{}, fmt.Errorf("%q: want ADDR,ASN (e.g. 198.18.1.254,65000)", s)
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || !a.Is4() {
		return Neighbor{}, fmt.Errorf("%q: %q is not an IPv4 address", s, addr)
	}
	n, err := ParseASN(asn)
	if err != nil {
		return Neighbor{}, fmt.Errorf("%q: %w", s, err)
	}
	return Neighbor{Addr: a, ASN: n}, nil
}

// ParseASN reads an AS number, 1..4294967295.
func ParseASN(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not an AS number (1..4294967295)", s)
	}
	return uint32(n), nil
}

func (n Neighbor) String() string { return fmt.Sprintf("%s,%d", n.Addr, n.ASN) }

// Config is the speaker's setting.
type Config struct {
	ASN       uint32
	RouterID  netip.Addr // and the sessions' source address: the node IP
	PodCIDR   netip.Prefix
	Neighbors []Neighbor
	// RestartTime is what the sessions' graceful restart asks neighbours
	// to keep this node's routes for while it is away.
	RestartTime time.Duration
	// ConvergeTimeout bounds the wait for the neighbours' End-of-RIB
	// before the first node set (a neighbour down at start).
	ConvergeTimeout time.Duration
	// ListenPort is where the speaker takes sessions neighbours open, on
	// RouterID only; -1 dials out only (a router that dials nobody
	// then never reaches it). Nodes peering with each other need it.
	ListenPort int32
	// Accept, when valid, is where learned prefixes must lie (the
	// cluster CIDR): a neighbour announcing anything else is not taken
	// for a node.
	Accept netip.Prefix
}

// Validate checks what a caller may have got wrong, naming the flag.
func (c Config) Validate() error {
	switch {
	case c.ASN == 0:
		return errors.New("--bgp-asn: give this node's AS number")
	case len(c.Neighbors) == 0:
		return errors.New("--bgp-neighbor: give at least one neighbour (ADDR,ASN)")
	case !c.RouterID.Is4():
		return fmt.Errorf("bgp: router ID %s is not an IPv4 address", c.RouterID)
	case c.ListenPort < -1 || c.ListenPort == 0 || c.ListenPort > 65535:
		return fmt.Errorf("--bgp-listen-port: %d is out of 1..65535 (-1: do not listen)", c.ListenPort)
	case c.RestartTime < time.Second || c.RestartTime > 4095*time.Second:
		return fmt.Errorf("--bgp-restart-time: %s is out of 1s..4095s (the capability's 12 bits)", c.RestartTime)
	}
	for _, n := range c.Neighbors {
		if n.Addr == c.RouterID {
			return fmt.Errorf("--bgp-neighbor %s: that is this node", n)
		}
	}
	return nil
}

// Route is a learned best route to a pod CIDR.
type Route struct {
	Prefix  netip.Prefix
	NextHop netip.Addr
	Peer    netip.Addr // the neighbour it came from
}

// PeerState is a neighbour's session as `status` and the metrics show it.
type PeerState struct {
	Neighbor Neighbor
	State    string // idle, connect, active, opensent, openconfirm, established
	// EndOfRIB: the neighbour has sent everything it had (graceful
	// restart's End-of-RIB).
	EndOfRIB bool
	// Synced: the neighbour has sent its whole table, by its End-of-RIB
	// or, for one without graceful restart (which sends none),
	// noEORSettle after the session came up.
	Synced   bool
	Received int // prefixes learned from it
}

// noEORSettle is how long a session without graceful restart must be up
// before its table counts as received: its first updates follow the OPEN
// at once.
const noEORSettle = 2 * time.Second

// Established reports whether the session is up.
func (p PeerState) Established() bool { return p.State == "established" }

// Speaker runs the BGP server. Its zero value is not usable: see Start.
type Speaker struct {
	cfg   Config
	log   *slog.Logger
	srv   *server.BgpServer
	start time.Time

	changed chan struct{} // poked by GoBGP's events; capacity 1

	mu     sync.Mutex
	routes []Route
	peers  []PeerState
}

var ipv4Unicast = &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}

// Start starts the BGP server, announces the pod CIDR and adds the
// neighbours. The server runs until ctx ends; then its sockets close
// without a Cease, which neighbours treat as a restart.
func Start(ctx context.Context, cfg Config, log *slog.Logger) (*Speaker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.ConvergeTimeout == 0 {
		cfg.ConvergeTimeout = 30 * time.Second
	}
	s := &Speaker{cfg: cfg, log: log.With("component", "bgp"), start: time.Now(), changed: make(chan struct{}, 1)}
	s.srv = server.NewBgpServer(server.LoggerOption(gobgpLogger{s.log}))
	go s.srv.Serve()
	// Two nodes peering with each other both dial and listen; BGP's
	// collision rule keeps one session.
	if err := s.srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn: cfg.ASN, RouterId: cfg.RouterID.String(), ListenPort: cfg.ListenPort,
		ListenAddresses: []string{cfg.RouterID.String()},
	}}); err != nil {
		s.srv.Stop()
		return nil, fmt.Errorf("start bgp: %w", err)
	}
	if err := s.announce(ctx); err != nil {
		s.srv.Stop()
		return nil, err
	}
	if err := s.srv.WatchEvent(ctx, &api.WatchEventRequest{
		Peer: &api.WatchEventRequest_Peer{},
		Table: &api.WatchEventRequest_Table{Filters: []*api.WatchEventRequest_Table_Filter{
			{Type: api.WatchEventRequest_Table_Filter_BEST, Init: true},
			{Type: api.WatchEventRequest_Table_Filter_EOR, Init: true},
		}},
	}, func(*api.WatchEventResponse) { s.poke() }); err != nil {
		s.srv.Stop()
		return nil, fmt.Errorf("watch bgp events: %w", err)
	}
	for _, n := range cfg.Neighbors {
		if err := s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: s.peer(n)}); err != nil {
			s.srv.Stop()
			return nil, fmt.Errorf("add bgp neighbour %s: %w", n, err)
		}
	}
	s.log.Info("bgp started", "asn", cfg.ASN, "router_id", cfg.RouterID, "announce", cfg.PodCIDR,
		"neighbors", cfg.Neighbors, "restart_time", cfg.RestartTime)
	return s, nil
}

// Stop ends every session with a Cease: the neighbours withdraw this
// node's routes at once. For tests and a node leaving for good; an agent
// that stops for a restart just exits.
func (s *Speaker) Stop() { s.srv.Stop() }

func (s *Speaker) poke() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *Speaker) peer(n Neighbor) *api.Peer {
	return &api.Peer{
		Conf: &api.PeerConf{NeighborAddress: n.Addr.String(), PeerAsn: n.ASN},
		// A lost neighbour is dialled again within seconds, not
		// GoBGP's default two minutes.
		Timers:    &api.Timers{Config: &api.TimersConfig{ConnectRetry: 3, HoldTime: 9, KeepaliveInterval: 3}},
		Transport: &api.Transport{LocalAddress: s.cfg.RouterID.String()},
		GracefulRestart: &api.GracefulRestart{
			Enabled:     true,
			RestartTime: uint32(s.cfg.RestartTime / time.Second),
		},
		AfiSafis: []*api.AfiSafi{{
			Config:            &api.AfiSafiConfig{Family: ipv4Unicast, Enabled: true},
			MpGracefulRestart: &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}},
		}},
	}
}

// announce adds this node's pod CIDR, next hop the node IP, before any
// session is up: a neighbour gets it in the first update, before our
// End-of-RIB, and a restart leaves no gap.
func (s *Speaker) announce(ctx context.Context) error {
	nlri, err := anypb.New(&api.IPAddressPrefix{Prefix: s.cfg.PodCIDR.Masked().Addr().String(), PrefixLen: uint32(s.cfg.PodCIDR.Bits())})
	if err != nil {
		return err
	}
	origin, err := anypb.New(&api.OriginAttribute{Origin: 0}) // IGP
	if err != nil {
		return err
	}
	nh, err := anypb.New(&api.NextHopAttribute{NextHop: s.cfg.RouterID.String()})
	if err != nil {
		return err
	}
	_, err = s.srv.AddPath(ctx, &api.AddPathRequest{Path: &api.Path{Family: ipv4Unicast, Nlri: nlri, Pattrs: []*anypb.Any{origin, nh}}})
	if err != nil {
		return fmt.Errorf("announce %s: %w", s.cfg.PodCIDR, err)
	}
	return nil
}

// refresh reads the learned best routes and the sessions from GoBGP.
func (s *Speaker) refresh(ctx context.Context) error {
	// Sessions first, then routes: GoBGP puts a neighbour's updates in
	// the table before it marks its End-of-RIB, so routes read after a
	// session says End-of-RIB hold all it sent. Read the other way round,
	// an End-of-RIB arriving in between would pass for convergence with
	// the routes before it missing, and the first node sync would remove
	// them.
	var peers []PeerState
	err := s.srv.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
		addr, _ := netip.ParseAddr(p.GetConf().GetNeighborAddress())
		st := PeerState{Neighbor: Neighbor{Addr: addr, ASN: p.GetConf().GetPeerAsn()}}
		st.State = strings.ToLower(strings.TrimPrefix(p.GetState().GetSessionState().String(), "SESSION_"))
		for _, af := range p.GetAfiSafis() {
			if af.GetMpGracefulRestart().GetState().GetEndOfRibReceived() {
				st.EndOfRIB = true
			}
		}
		st.Synced = st.EndOfRIB
		if st.Established() && !remoteGR(p) {
			up := p.GetTimers().GetState().GetUptime()
			st.Synced = up != nil && time.Since(up.AsTime()) >= noEORSettle
		}
		peers = append(peers, st)
	})
	if err != nil {
		return fmt.Errorf("list bgp neighbours: %w", err)
	}
	var routes []Route
	err = s.srv.ListPath(ctx, &api.ListPathRequest{TableType: api.TableType_GLOBAL, Family: ipv4Unicast}, func(d *api.Destination) {
		for _, p := range d.Paths {
			if !p.Best || p.IsWithdraw {
				continue
			}
			if r, ok := s.learned(p); ok {
				routes = append(routes, r)
			}
		}
	})
	if err != nil {
		return fmt.Errorf("list bgp routes: %w", err)
	}
	for i := range peers {
		for _, r := range routes {
			if r.Peer == peers[i].Neighbor.Addr {
				peers[i].Received++
			}
		}
	}
	slices.SortFunc(routes, func(a, b Route) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	slices.SortFunc(peers, func(a, b PeerState) int { return a.Neighbor.Addr.Compare(b.Neighbor.Addr) })
	s.mu.Lock()
	old := s.peers
	s.routes, s.peers = routes, peers
	s.mu.Unlock()
	for _, p := range peers {
		i := slices.IndexFunc(old, func(o PeerState) bool { return o.Neighbor == p.Neighbor })
		if i < 0 || old[i].State != p.State || old[i].Synced != p.Synced {
			s.log.Info("bgp neighbour", "neighbor", p.Neighbor, "state", p.State, "synced", p.Synced, "end_of_rib", p.EndOfRIB, "routes", p.Received)
		}
	}
	return nil
}

// learned turns a best path from a neighbour into a Route; our own
// announcement and what is not a pod CIDR we may take are not.
func (s *Speaker) learned(p *api.Path) (Route, bool) {
	peer, err := netip.ParseAddr(p.GetNeighborIp())
	if err != nil || p.GetSourceAsn() == 0 {
		return Route{}, false // local: our own announcement
	}
	m, err := p.GetNlri().UnmarshalNew()
	if err != nil {
		return Route{}, false
	}
	pfx, ok := m.(*api.IPAddressPrefix)
	if !ok {
		return Route{}, false
	}
	a, err := netip.ParseAddr(pfx.GetPrefix())
	if err != nil || !a.Is4() || pfx.GetPrefixLen() > 32 {
		return Route{}, false
	}
	prefix := netip.PrefixFrom(a, int(pfx.GetPrefixLen())).Masked()
	r := Route{Prefix: prefix, Peer: peer}
	for _, attr := range p.GetPattrs() {
		m, err := attr.UnmarshalNew()
		if err != nil {
			continue
		}
		if nh, ok := m.(*api.NextHopAttribute); ok {
			r.NextHop, _ = netip.ParseAddr(nh.GetNextHop())
		}
	}
	if !r.NextHop.Is4() || r.NextHop == s.cfg.RouterID {
		return Route{}, false
	}
	if s.cfg.Accept.IsValid() && !(s.cfg.Accept.Contains(prefix.Addr()) && prefix.Bits() >= s.cfg.Accept.Bits()) {
		return Route{}, false
	}
	return r, true
}

// Routes is what the speaker last learned, sorted by prefix.
func (s *Speaker) Routes() []Route {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.routes)
}

// Peers is every neighbour's session, sorted by address.
func (s *Speaker) Peers() []PeerState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.peers)
}

// converged reports whether every neighbour has sent its End-of-RIB, or
// the wait for them is over.
func (s *Speaker) converged() bool {
	if time.Since(s.start) >= s.cfg.ConvergeTimeout {
		return true
	}
	peers := s.Peers()
	if len(peers) < len(s.cfg.Neighbors) {
		return false
	}
	for _, p := range peers {
		if !p.Established() || !p.Synced {
			return false
		}
	}
	return true
}

// remoteGR reports whether the neighbour offered graceful restart, and so
// ends its table with an End-of-RIB.
func remoteGR(p *api.Peer) bool {
	for _, c := range p.GetState().GetRemoteCap() {
		if m, err := c.UnmarshalNew(); err == nil {
			if _, ok := m.(*api.GracefulRestartCapability); ok {
				return true
			}
		}
	}
	return false
}

// gobgpLogger hands GoBGP's log to slog, a level down: its Info is
// chatty per message. Fatal and Panic keep their meaning: GoBGP does not
// go on after them.
type gobgpLogger struct{ log *slog.Logger }

func (l gobgpLogger) attrs(f map[string]any) []any {
	out := make([]any, 0, 2*len(f))
	for k, v := range f {
		out = append(out, strings.ToLower(k), v)
	}
	return out
}

func (l gobgpLogger) Panic(msg string, f gobgplog.Fields) {
	l.log.Error(msg, l.attrs(f)...)
	panic("bgp: " + msg)
}

func (l gobgpLogger) Fatal(msg string, f gobgplog.Fields) {
	l.log.Error(msg, l.attrs(f)...)
	os.Exit(1)
}

func (l gobgpLogger) Error(msg string, f gobgplog.Fields) { l.log.Error(msg, l.attrs(f)...) }
func (l gobgpLogger) Warn(msg string, f gobgplog.Fields)  { l.log.Warn(msg, l.attrs(f)...) }
func (l gobgpLogger) Info(msg string, f gobgplog.Fields)  { l.log.Debug(msg, l.attrs(f)...) }
func (l gobgpLogger) Debug(string, gobgplog.Fields)       {}
func (l gobgpLogger) SetLevel(gobgplog.LogLevel)          {}
func (l gobgpLogger) GetLevel() gobgplog.LogLevel         { return gobgplog.InfoLevel }
