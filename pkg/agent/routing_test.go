package agent

import (
	"net"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/nodes"
)

// A node's own routing wins over the agent's; auto is native only on the
// uplink's subnet, where the next hop is the node itself; a Flannel node
// takes VXLAN whatever it says.
func TestResolveRouting(t *testing.T) {
	onLink := netip.MustParseAddr("198.18.0.2")
	beyond := netip.MustParseAddr("198.19.0.2")
	flannelMAC := net.HardwareAddr{0x0e, 0, 0, 0, 0, 2}
	tests := []struct {
		agent nodes.Routing
		node  nodes.Node
		want  nodes.Routing
	}{
		{agent: nodes.RoutingDefault, node: nodes.Node{NodeIP: onLink}, want: nodes.Tunnel},
		{agent: nodes.Native, node: nodes.Node{NodeIP: onLink}, want: nodes.Native},
		{agent: nodes.Native, node: nodes.Node{NodeIP: onLink, Routing: nodes.Tunnel}, want: nodes.Tunnel},
		{agent: nodes.Tunnel, node: nodes.Node{NodeIP: beyond, Routing: nodes.Native}, want: nodes.Native},
		{agent: nodes.Auto, node: nodes.Node{NodeIP: onLink}, want: nodes.Native},
		{agent: nodes.Auto, node: nodes.Node{NodeIP: beyond}, want: nodes.Tunnel},
		{agent: nodes.Tunnel, node: nodes.Node{NodeIP: beyond, Routing: nodes.Auto}, want: nodes.Tunnel},
		{agent: nodes.Native, node: nodes.Node{NodeIP: onLink, VtepMAC: flannelMAC}, want: nodes.Tunnel},
	}
	for _, tt := range tests {
		a := &Agent{cfg: Config{Routing: tt.agent}, subnet: netip.MustParsePrefix("198.18.0.0/24")}
		if got := a.resolve(tt.node); got != tt.want {
			t.Errorf("--routing %q, node %v routing %q vtep %v: got %q, want %q",
				tt.agent, tt.node.NodeIP, tt.node.Routing, tt.node.VtepMAC, got, tt.want)
		}
	}
}
