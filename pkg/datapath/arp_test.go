// This file tests from_pod's answers to ARP: the gateway's neighbour
// resolution happens in eBPF, and every ARP frame may be forged.
package datapath_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
)

type arpCase struct {
	name    string
	eth     ethernet
	arp     arp
	verdict uint32
	want    []byte // nil: the frame passes unchanged
	counter string
}

// arpCases are the cases of TestFromPodARP.
func arpCases() []arpCase {
	// What the gateway's reply to podA must be: from the host veth to the
	// pod, the gateway's address with the veth's MAC, back to the asker.
	reply := func(tpa netip.Addr) []byte {
		return ethernet{Dst: podA.MAC, Src: podA.HostMAC, Type: ethTypeARP}.marshal(arp{
			HType: 1, PType: ethTypeIPv4, HLen: 6, PLen: 4, Op: arpOpReply,
			SHA: podA.HostMAC, SPA: gatewayIP,
			THA: podA.MAC, TPA: tpa,
		}.marshal())
	}
	unspecified := netip.IPv4Unspecified()

	return []arpCase{{
		name:    "request for gateway",
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP),
		verdict: tcActRedirect,
		want:    reply(podA.IP),
		counter: "arp_reply",
	}, {
		// A duplicate-address probe (RFC 5227) is answered like
		// Linux answers it: to the unspecified address.
		name:    "probe for gateway",
		arp:     arpRequest(podA.MAC, unspecified, gatewayIP),
		verdict: tcActRedirect,
		want:    reply(unspecified),
		counter: "arp_reply",
	}, {
		name:    "request unicast to gateway MAC",
		eth:     ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: ethTypeARP},
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP),
		verdict: tcActRedirect,
		want:    reply(podA.IP),
		counter: "arp_reply",
	}, {
		name:    "request for another IP",
		arp:     arpRequest(podA.MAC, podA.IP, podB.IP),
		verdict: tcActOK,
		counter: "to_host",
	}, {
		name:    "probe for another IP",
		arp:     arpRequest(podA.MAC, unspecified, podB.IP),
		verdict: tcActOK,
		counter: "to_host",
	}, {
		name:    "gratuitous request",
		arp:     arpRequest(podA.MAC, podA.IP, podA.IP),
		verdict: tcActOK,
		counter: "to_host",
	}, {
		// The pod answering the host's ARP for the pod.
		name: "reply from pod",
		eth:  ethernet{Dst: podA.HostMAC, Src: podA.MAC, Type: ethTypeARP},
		arp: arp{HType: 1, PType: ethTypeIPv4, HLen: 6, PLen: 4, Op: arpOpReply,
			SHA: podA.MAC, SPA: podA.IP, THA: podA.HostMAC, TPA: gatewayIP},
		verdict: tcActOK,
		counter: "to_host",
	}, {
		name:    "spoofed sender IP",
		arp:     arpRequest(podA.MAC, podB.IP, gatewayIP),
		verdict: tcActShot,
		counter: "drop_spoofed",
	}, {
		name:    "spoofed sender MAC",
		arp:     arpRequest(podB.MAC, podA.IP, gatewayIP),
		verdict: tcActShot,
		counter: "drop_spoofed",
	}, {
		name:    "spoofed Ethernet source",
		eth:     ethernet{Dst: broadcastMAC, Src: podB.MAC, Type: ethTypeARP},
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP),
		verdict: tcActShot,
		counter: "drop_spoofed",
	}, {
		name:    "spoofed gratuitous",
		arp:     arpRequest(podA.MAC, podB.IP, podB.IP),
		verdict: tcActShot,
		counter: "drop_spoofed",
	}, {
		// Not ARP for IPv4 over Ethernet: not something from_pod
		// answers, so the host stack decides.
		name:    "non-Ethernet hardware type",
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP).with(func(a *arp) { a.HType = 6 }), // IEEE 802,
		verdict: tcActOK,
		counter: "to_host",
	}, {
		// Linux's arp_process accepts hardware type 6 on Ethernet
		// devices like type 1, so the host would learn a neighbour
		// from this: it is spoofing all the same.
		name:    "IEEE 802 hardware type, spoofed sender IP",
		arp:     arpRequest(podA.MAC, podB.IP, gatewayIP).with(func(a *arp) { a.HType = 6 }),
		verdict: tcActShot,
		counter: "drop_spoofed",
	}, {
		name:    "non-IPv4 protocol type",
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP).with(func(a *arp) { a.PType = ethTypeIPv6 }),
		verdict: tcActOK,
		counter: "to_host",
	}, {
		name:    "hardware address length 8",
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP).with(func(a *arp) { a.HLen = 8 }),
		verdict: tcActOK,
		counter: "to_host",
	}, {
		name:    "protocol address length 16",
		arp:     arpRequest(podA.MAC, podA.IP, gatewayIP).with(func(a *arp) { a.PLen = 16 }),
		verdict: tcActOK,
		counter: "to_host",
	}}
}

func TestFromPodARP(t *testing.T) {
	tests := arpCases()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newPodNode(t)
			eth := tt.eth
			if eth.Type == 0 {
				eth = ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}
			}
			in := eth.marshal(tt.arp.marshal())

			ret, out := mustRun(t, n.prog(datapath.FromPod), in)

			wantVerdict(t, ret, tt.verdict)
			want := tt.want
			if want == nil {
				want = in
			}
			wantFrame(t, out, want)
			n.wantCounters(map[string]bpfmaps.Counter{tt.counter: counted(len(in))})
			if tt.verdict == tcActShot {
				n.wantDropEvent(datapath.FromPod, tt.counter, len(in))
			} else {
				n.wantNoEvents()
			}
		})
	}
}

// An ARP header cut short is dropped, not passed to the host stack.
func TestFromPodARPTruncated(t *testing.T) {
	for _, size := range []int{0, 8, arpLen - 1} {
		t.Run(fmt.Sprintf("%d bytes", size), func(t *testing.T) {
			n := newPodNode(t)
			arp := arpRequest(podA.MAC, podA.IP, gatewayIP).marshal()
			in := ethernet{Dst: broadcastMAC, Src: podA.MAC, Type: ethTypeARP}.marshal(arp[:size])

			ret, out := mustRun(t, n.prog(datapath.FromPod), in)

			wantVerdict(t, ret, tcActShot)
			wantFrame(t, out, in)
			n.wantCounters(map[string]bpfmaps.Counter{"drop_malformed": counted(len(in))})
			n.wantDropEvent(datapath.FromPod, "drop_malformed", len(in))
		})
	}
}
