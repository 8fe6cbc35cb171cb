// Link modes of the cross-node group: over veth uplinks GSO packets cross
// whole and GRO never runs, which no physical link does. NIC-like uplinks
// (lab.LinksNIC: TSO/GSO off on send, GRO on receive) carry MTU-sized frames
// that the receiver merges again, and only where something lets GRO merge:
// TCP directly for host-gw, a UDP tunnel socket for VXLAN (flannel.1's own,
// patchcord's idle GRO device). Every cross-node datapath runs in each mode
// asked for, the modes interleaved within each round.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/patchcord/patchcord/internal/lab"
)

// groupCrossNIC holds the cross-node datapaths measured over NIC-like
// links; --only cross-node selects it with the veth group, --links picks.
const groupCrossNIC = "cross-node-nic"

// parseLinks reads --links: veth, nic or both.
func parseLinks(v string) ([]lab.Links, error) {
	switch v {
	case "both":
		return []lab.Links{lab.LinksVeth, lab.LinksNIC}, nil
	case string(lab.LinksVeth), string(lab.LinksNIC):
		return []lab.Links{lab.Links(v)}, nil
	}
	return nil, fmt.Errorf("--links: %q is not veth, nic or both", v)
}

// withLinks makes one copy of each cross-node subject per link mode; the
// copies share nodes, pods and servers, and set the uplinks before each run.
func withLinks(subjects []*subject, modes []lab.Links) []*subject {
	var out []*subject
	for _, mode := range modes {
		for _, s := range subjects {
			c := *s
			c.Links = string(mode)
			if mode == lab.LinksNIC {
				c.Group = groupCrossNIC
			}
			out = append(out, &c)
		}
	}
	return out
}

// uplinkModes is what each node's uplink is set to now; nodes start as
// veths.
type uplinkModes map[*lab.Node]lab.Links

// set puts the uplinks of s into the mode s is measured in.
func (u uplinkModes) set(ctx context.Context, s *subject) error {
	if s.Links == "" {
		return nil
	}
	want := lab.Links(s.Links)
	for _, n := range s.uplinks {
		cur, ok := u[n]
		if !ok {
			cur = lab.LinksVeth
		}
		if cur == want {
			continue
		}
		if err := n.SetLinks(ctx, want); err != nil {
			return fmt.Errorf("%s: %w", s.Name, err)
		}
		u[n] = want
	}
	return nil
}

// rxCounters are the server pod's eth0 receive counters: the packets the pod
// gets after GRO, so bytes per packet above the MTU prove merging.
type rxCounters struct{ packets, bytes uint64 }

func readRx(ctx context.Context, h host) (rxCounters, error) {
	out, err := h.Exec(ctx, "ip", "-j", "-s", "link", "show", "dev", "eth0")
	if err != nil {
		return rxCounters{}, err
	}
	var links []struct {
		Stats64 struct {
			Rx struct {
				Packets uint64 `json:"packets"`
				Bytes   uint64 `json:"bytes"`
			} `json:"rx"`
		} `json:"stats64"`
	}
	start := strings.IndexByte(string(out), '[')
	if start < 0 || json.Unmarshal(out[start:], &links) != nil || len(links) != 1 {
		return rxCounters{}, fmt.Errorf("ip -j -s link show eth0: %s", out)
	}
	return rxCounters{links[0].Stats64.Rx.Packets, links[0].Stats64.Rx.Bytes}, nil
}

// rxPacketSize is the median over rounds of the server pod's bytes per
// received packet during the 1-stream TCP runs (0: not measured).
func rxPacketSize(samples []Sample, group, name string) float64 {
	var v []float64
	for _, s := range samples {
		if s.Group == group && s.Datapath == name && s.Figure == "tcp1" {
			if size, ok := s.Extra["serverRxBytesPerPacket"].(float64); ok {
				v = append(v, size)
			}
		}
	}
	if len(v) == 0 {
		return 0
	}
	return median(v)
}

// renderLinks sets the cross-node datapaths' TCP figures side by side in
// both link modes, with the server pod's received packet size that shows
// whether GRO merged.
func renderLinks(w io.Writer, r *Results, subjects []*subject) {
	veth, nic := groupSubjects(subjects, groupCross), groupSubjects(subjects, groupCrossNIC)
	if len(veth) == 0 || len(nic) == 0 {
		return
	}
	fmt.Fprintf(w, "\n## Cross-node: veth links vs. NIC-like links\n\n")
	fmt.Fprintf(w, "NIC-like: TSO and GSO off on both ends of every uplink, GRO on (`ethtool -K`), so the wire carries "+
		"MTU-sized frames and the receiver merges them as a NIC driver's GRO does. Packet size is the server pod's "+
		"eth0 received bytes per packet during the 1-stream runs (median over rounds): above the MTU, GRO merged.\n\n")
	fmt.Fprintf(w, "| datapath | TCP 1 stream veth | NIC-like | NIC/veth | TCP 4 streams veth | NIC-like | NIC/veth | pod rx packet, veth | NIC-like |\n")
	fmt.Fprintf(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range veth {
		i := slices.IndexFunc(nic, func(n *subject) bool { return n.Name == s.Name })
		if i < 0 {
			continue
		}
		fmt.Fprintf(w, "| %s |", s.Name)
		for _, fig := range []string{"tcp1", "tcp4"} {
			a, okA := findSummary(r.Summaries, groupCross, s.Name, fig)
			b, okB := findSummary(r.Summaries, groupCrossNIC, s.Name, fig)
			if !okA || !okB {
				fmt.Fprintf(w, " – | – | – |")
				continue
			}
			fmt.Fprintf(w, " %s | %s | %s |", format(a.Median, a.Unit), format(b.Median, b.Unit), ratio(b.Median/a.Median))
		}
		fmt.Fprintf(w, " %.0f B | %.0f B |\n", rxPacketSize(r.Samples, groupCross, s.Name), rxPacketSize(r.Samples, groupCrossNIC, s.Name))
	}
}
