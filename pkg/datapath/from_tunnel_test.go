// This file tests what of from_tunnel BPF_PROG_RUN can reach: a frame
// without the tunnel metadata the vxlan socket records. Everything past that
// check needs a real socket and is tested in the lab (test/crossnode
// TestGRODeviceForwardsNothing and TestFlannelInterop/outer_fragments).
package datapath_test

import (
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// TestFromTunnelWithoutMetadata: what the device receives without tunnel
// metadata did not come from its socket (or came before the agent
// configured the node), and it is dropped, never handed to the stack.
func TestFromTunnelWithoutMetadata(t *testing.T) {
	frame := fromPeer(udpPacket(peerPodIP, dstPod.IP).marshal()).marshal()
	tests := []struct {
		name   string
		config bool
		reason string
	}{
		{"unconfigured node", false, "drop_unknown_tunnel"},
		{"configured node", true, "drop_malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t)
			if tt.config {
				n.configure(defaultConfig())
			}
			ret, _ := mustRun(t, n.prog(datapath.FromTunnel), frame)
			wantVerdict(t, ret, tcActShot)
			n.wantCounters(map[string]bpfmaps.Counter{tt.reason: counted(len(frame))})
		})
	}
}
