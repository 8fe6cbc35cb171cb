// This file tests EP_HOST_PATH: a pod whose veth shapes its traffic (the
// bandwidth plugin's qdiscs) is never redirected to or from; its packets
// cross the host stack and the veth's own tc filters.
package datapath_test

import (
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// tcActUnspec lets the next tc layer (the veth's legacy filters) decide.
const tcActUnspec = 0xffffffff

func TestHostPathEndpoints(t *testing.T) {
	shaped := func(p pod) bpfmaps.EndpointInfo {
		ep := p.endpoint()
		ep.HostPath = true
		return ep
	}
	// A shaped sender's frames go on to its veth's own filters; frames
	// to a shaped pod go up the stack to reach its veth's egress qdisc.
	for _, tt := range []struct {
		name       string
		src, dst   bpfmaps.EndpointInfo
		wantAction uint32
	}{
		{"from a shaped pod", shaped(podA), podB.endpoint(), tcActUnspec},
		{"to a shaped pod", podA.endpoint(), shaped(podB), tcActOK},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t)
			n.put(tt.src)
			n.put(tt.dst)
			in := fromPod(udpPacket(podA.IP, podB.IP))
			ret, out := mustRun(t, n.prog(datapath.FromPod), in)
			wantVerdict(t, ret, tt.wantAction)
			wantFrame(t, out, in)
			n.wantCounters(map[string]bpfmaps.Counter{"to_host": counted(len(in))})
		})
	}
	t.Run("from another node to a shaped pod", func(t *testing.T) {
		n := newTestNode(t)
		n.configure(defaultConfig())
		n.addNode(peerNode())
		n.put(shaped(dstPod))
		inner := udpPacket(peerPodIP, dstPod.IP).withTTL(63).marshal()
		tun := fromPeer(inner)
		ret, out := mustRun(t, n.prog(datapath.FromUplink), tun.marshal())
		wantVerdict(t, ret, tcActOK)
		want := tun.eth.marshal(inner)
		wantFrame(t, out, want)
		n.wantCounters(map[string]bpfmaps.Counter{"decap": counted(len(want)), "to_host": counted(len(want))})
	})
}

func (n *testNode) put(ep bpfmaps.EndpointInfo) {
	n.tb.Helper()
	if err := bpfmaps.NewEndpoints(&n.d.Maps).Put(ep); err != nil {
		n.tb.Fatal(err)
	}
}
