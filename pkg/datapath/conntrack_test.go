// This file tests the NAT-aware fast path: a packet of a connection the
// kernel's conntrack has translated is left to the host stack, which reverses
// the translation; any other packet keeps the fast path. Each case runs in a
// namespace of its own whose conntrack table holds one entry made with the
// conntrack tool, so the root namespace's table is never touched.
package datapath_test

import (
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/maps"
)

// clusterIP stands for a service address kube-proxy DNATs.
const clusterIP = "10.96.0.10"

// mustConntrackNS returns a fresh namespace whose conntrack table holds the
// entry made by `conntrack -I args...`.
func mustConntrackNS(t *testing.T, args ...string) ns.NetNS {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	if len(args) == 0 {
		return netns
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + netns.Path(), "conntrack", "-I", "-t", "60"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("conntrack -I %v: %v\n%s", args, err, out)
	}
	return netns
}

// runIn runs prog on in from inside netns, so that the conntrack lookup
// sees that namespace's table.
func runIn(t *testing.T, netns ns.NetNS, n *testNode, prog string, in []byte) (ret uint32, out []byte) {
	t.Helper()
	err := netns.Do(func(ns.NetNS) error {
		ret, out = mustRun(t, n.prog(prog), in)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ret, out
}

func TestFromPodNATedReplyGoesToHost(t *testing.T) {
	// podB asked the service on udp/40000 from port 53 and was DNATed
	// to podA; podA's answer, podA:40000 -> podB:53, is the reply.
	service := []string{"-p", "udp", "-s", podB.IP.String(), "-d", clusterIP,
		"--sport", "53", "--dport", "40000", "--dst-nat", podA.IP.String()}
	plain := []string{"-p", "udp", "-s", podB.IP.String(), "-d", podA.IP.String(),
		"--sport", "53", "--dport", "40000"}
	tests := []struct {
		name      string
		conntrack []string
		nat       bool
	}{
		{name: "reply of a DNATed connection", conntrack: service, nat: true},
		{name: "connection without NAT", conntrack: plain},
		{name: "no connection", conntrack: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			netns := mustConntrackNS(t, tt.conntrack...)
			n := newPodNode(t)
			in := fromPod(udpPacket(podA.IP, podB.IP))

			ret, out := runIn(t, netns, n, datapath.FromPod, in)

			if tt.nat {
				wantVerdict(t, ret, tcActOK)
				wantFrame(t, out, in)
				n.wantCounters(map[string]maps.Counter{"to_host_nat": counted(len(in))})
				return
			}
			wantVerdict(t, ret, tcActRedirect)
			n.wantCounters(map[string]maps.Counter{"local_redirect": counted(len(in))})
		})
	}
}

func TestFromUplinkNATedReplyGoesToHost(t *testing.T) {
	// dstPod asked a service from udp/53 and was DNATed to a pod on the
	// peer node; the peer pod's answer arrives in VXLAN.
	netns := mustConntrackNS(t, "-p", "udp", "-s", dstPod.IP.String(), "-d", clusterIP,
		"--sport", "53", "--dport", "40000", "--dst-nat", peerPodIP.String())
	n := newUplinkNode(t, defaultConfig())
	inner := udpPacket(peerPodIP, dstPod.IP).withTTL(63).marshal()
	tun := fromPeer(inner)
	in := tun.marshal()

	ret, out := runIn(t, netns, n, datapath.FromUplink, in)

	// Decapsulated, still addressed to the uplink, TTL left for the stack.
	wantVerdict(t, ret, tcActOK)
	want := tun.eth.marshal(inner)
	wantFrame(t, out, want)
	n.wantCounters(map[string]maps.Counter{
		"decap":       counted(len(want)),
		"to_host_nat": counted(len(want)),
	})
}
