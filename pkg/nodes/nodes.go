// Package nodes knows the cluster's nodes: where each one's pods live and how
// to reach it. A Source (File: a nodes file, for labs and static clusters;
// Kube: the Kubernetes API's Node objects) delivers whole node sets; the
// agent turns them into maps and routes.
package nodes

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"
)

// Node is one cluster node.
type Node struct {
	Name    string
	NodeIP  netip.Addr
	PodCIDR netip.Prefix
	// VtepMAC is the inner destination MAC the node's kernel vxlan device
	// expects (Flannel publishes it); nil for patchcord nodes.
	VtepMAC net.HardwareAddr
	// Routing is how this node's pods are reached, when the source says;
	// RoutingDefault leaves it to the agent's --routing.
	Routing Routing
	// Via, when valid, is the next hop of native routing to the node's
	// pods, where it is not NodeIP: the router a BGP route names.
	Via netip.Addr
}

// Routing is how a remote node's pods are reached.
type Routing string

const (
	RoutingDefault Routing = ""
	// Tunnel: VXLAN to the node's IP; the network needs to know only nodes.
	Tunnel Routing = "tunnel"
	// Native: no encapsulation; the network must route the node's pod
	// CIDR to it (one L2 segment, where the agent routes via the node's
	// IP, or a fabric that learned it by BGP).
	Native Routing = "native"
	// Auto: native to nodes on the uplink's subnet, tunnel to the rest
	// (Calico's CrossSubnet).
	Auto Routing = "auto"
)

// ParseRouting reads "tunnel", "native" or "auto".
func ParseRouting(s string) (Routing, error) {
	switch r := Routing(s); r {
	case Tunnel, Native, Auto:
		return r, nil
	}
	return "", fmt.Errorf("%q is not a routing mode (tunnel, native or auto)", s)
}

// Source delivers the complete node set each time it changes.
type Source interface {
	// Run sends the current set, then every changed set, until ctx ends.
	Run(ctx context.Context, updates chan<- []Node) error
}

// Entry is the JSON shape of one entry of a nodes file: the file's one
// definition, which the writers (labs, bench) share with Parse.
type Entry struct {
	Name    string `json:"name"`
	NodeIP  string `json:"nodeIP"`
	PodCIDR string `json:"podCIDR"`
	VtepMAC string `json:"vtepMAC,omitempty"`
	Routing string `json:"routing,omitempty"`
}

// Parse reads a nodes file: {"nodes": [{"name", "nodeIP", "podCIDR", "vtepMAC", "routing"}]}.
// Errors name the offending field, e.g. `nodes[1].podCIDR`.
func Parse(data []byte) ([]Node, error) {
	var f struct {
		Nodes []Entry `json:"nodes"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse nodes file: %w", err)
	}
	if f.Nodes == nil {
		return nil, fmt.Errorf(`parse nodes file: no "nodes" array`)
	}
	out := make([]Node, 0, len(f.Nodes))
	seenCIDR := make(map[netip.Prefix]string)
	for i, fn := range f.Nodes {
		field := func(name string) string { return fmt.Sprintf("nodes[%d].%s", i, name) }
		n := Node{Name: fn.Name}
		if fn.Name == "" {
			return nil, fmt.Errorf("%s: missing", field("name"))
		}
		ip, err := netip.ParseAddr(fn.NodeIP)
		if err != nil || !ip.Is4() {
			return nil, fmt.Errorf("%s: %q is not an IPv4 address", field("nodeIP"), fn.NodeIP)
		}
		n.NodeIP = ip
		cidr, err := netip.ParsePrefix(fn.PodCIDR)
		if err != nil || !cidr.Addr().Is4() {
			return nil, fmt.Errorf("%s: %q is not an IPv4 CIDR", field("podCIDR"), fn.PodCIDR)
		}
		if cidr != cidr.Masked() {
			return nil, fmt.Errorf("%s: %q has host bits set; did you mean %s?", field("podCIDR"), fn.PodCIDR, cidr.Masked())
		}
		if other, dup := seenCIDR[cidr]; dup {
			return nil, fmt.Errorf("%s: %s is also the pod CIDR of %s", field("podCIDR"), cidr, other)
		}
		seenCIDR[cidr] = fn.Name
		n.PodCIDR = cidr
		if fn.VtepMAC != "" {
			mac, err := net.ParseMAC(fn.VtepMAC)
			if err != nil || len(mac) != 6 {
				return nil, fmt.Errorf("%s: %q is not a MAC address", field("vtepMAC"), fn.VtepMAC)
			}
			n.VtepMAC = mac
		}
		if fn.Routing != "" {
			if n.Routing, err = ParseRouting(fn.Routing); err != nil {
				return nil, fmt.Errorf("%s: %w", field("routing"), err)
			}
		}
		out = append(out, n)
	}
	return out, nil
}

// WriteFile writes a nodes file of entries atomically (a rename, as config
// management does), so that an agent never reads half of it.
func WriteFile(path string, entries []Entry) error {
	b, err := json.Marshal(struct {
		Nodes []Entry `json:"nodes"`
	}{entries})
	if err != nil {
		return fmt.Errorf("encode nodes file: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("write nodes file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write nodes file: %w", err)
	}
	return nil
}

// File is a Source reading a nodes file. It polls rather than using inotify:
// editors and config management replace files by rename, which a poll of the
// content handles without special cases, well within a second.
type File struct {
	Path     string
	Interval time.Duration // default 250ms
	Log      *slog.Logger
}

// Load reads and parses the file once.
func (f *File) Load() ([]Node, error) {
	data, err := os.ReadFile(f.Path)
	if err != nil {
		return nil, fmt.Errorf("read nodes file: %w", err)
	}
	nodes, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Path, err)
	}
	return nodes, nil
}

// Run sends the file's node set now and whenever its content changes. A file
// that stops parsing is logged and skipped: the last good set stays.
func (f *File) Run(ctx context.Context, updates chan<- []Node) error {
	interval := f.Interval
	if interval == 0 {
		interval = 250 * time.Millisecond
	}
	var last []byte
	first := true
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		data, err := os.ReadFile(f.Path)
		switch {
		case err != nil:
			if first || last != nil {
				f.Log.Error("cannot read nodes file; keeping the last good node set", "path", f.Path, "err", err)
			}
			last = nil
		case !bytes.Equal(data, last):
			last = data
			nodes, err := Parse(data)
			if err != nil {
				f.Log.Error("bad nodes file; keeping the last good node set", "path", f.Path, "err", err)
				break
			}
			select {
			case updates <- nodes:
			case <-ctx.Done():
				return nil
			}
		}
		first = false
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil
		}
	}
}
