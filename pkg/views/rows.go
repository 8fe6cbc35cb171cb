// Endpoint and node rows of `bpf endpoint list` and `bpf node list`.
package views

import (
	"slices"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
)

// Endpoint is the JSON shape of an endpoint; field names are stable.
type Endpoint struct {
	IP          string `json:"ip"`
	Ifindex     int    `json:"ifindex"`
	Ifname      string `json:"ifname"`
	MAC         string `json:"mac"`
	HostMAC     string `json:"hostMac"`
	ContainerID string `json:"containerID,omitempty"`
	PodIfname   string `json:"podIfname,omitempty"`
	Netns       string `json:"netns,omitempty"`
	Network     string `json:"network,omitempty"`
	// HostPath: the pod's traffic crosses its veth's qdiscs (bandwidth).
	HostPath bool `json:"hostPath,omitempty"`
}

// EndpointRows turns endpoints into rows sorted by IP.
func EndpointRows(list []bpfmaps.EndpointInfo) []Endpoint {
	list = slices.Clone(list)
	slices.SortFunc(list, func(a, b bpfmaps.EndpointInfo) int { return a.IP.Compare(b.IP) })
	rows := make([]Endpoint, 0, len(list))
	for _, ep := range list {
		rows = append(rows, Endpoint{
			IP: ep.IP.String(), Ifindex: ep.Ifindex, Ifname: ep.Ifname,
			MAC: ep.MAC.String(), HostMAC: ep.HostMAC.String(),
			ContainerID: ep.Container, PodIfname: ep.PodIfname, Netns: ep.Netns,
			Network: ep.Network, HostPath: ep.HostPath,
		})
	}
	return rows
}

// Node is the JSON shape of a remote node; field names are stable.
type Node struct {
	PodCIDR string `json:"podCIDR"`
	NodeIP  string `json:"nodeIP"`
	VtepMAC string `json:"vtepMAC,omitempty"`
	// Routing is "tunnel" (VXLAN) or "native" (routed unencapsulated).
	Routing string `json:"routing"`
}

// NodeRows turns remote nodes into rows sorted by pod CIDR.
func NodeRows(list []bpfmaps.Node) []Node {
	list = slices.Clone(list)
	slices.SortFunc(list, func(a, b bpfmaps.Node) int { return a.PodCIDR.Addr().Compare(b.PodCIDR.Addr()) })
	rows := make([]Node, 0, len(list))
	for _, n := range list {
		v := Node{PodCIDR: n.PodCIDR.String(), NodeIP: n.NodeIP.String(), Routing: "tunnel"}
		if n.Native {
			v.Routing = "native"
		}
		if n.VtepMAC != nil {
			v.VtepMAC = n.VtepMAC.String()
		}
		rows = append(rows, v)
	}
	return rows
}
