// Tests of ADD's failures: each returns the CNI error code and a message that
// says what to fix, and leaves nothing behind (no veth, link pin, endpoint
// entry or lease).
package cni_test

import (
	"net/netip"
	"os"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// fakePrev is a previous plugin's result, for confs that must be refused
// before it is looked at.
const fakePrev = `{"cniVersion":"1.0.0","interfaces":[{"name":"veth0"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.1.9/24","interface":1}]}`

func TestAddErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		conf   func(t *testing.T, n *node) []byte
		netns  string
		code   uint
		phrase string
	}{
		{
			name:   "unparsable JSON",
			conf:   func(*testing.T, *node) []byte { return []byte(`{"cniVersion":"1.0.0","name":`) },
			code:   types.ErrDecodingFailure,
			phrase: "valid JSON",
		},
		{
			name: "unknown ipam plugin",
			conf: func(t *testing.T, n *node) []byte {
				ipam := n.ipam()
				ipam["type"] = "nonexistent"
				return n.conf(t, "1.0.0", with("ipam", ipam))
			},
			// 7: an IPAM plugin that cannot be run is a conf problem.
			code:   types.ErrInvalidNetworkConfig,
			phrase: "check the ipam section",
		},
		{
			name:   "netns does not exist",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0") },
			netns:  "/var/run/netns/does-not-exist",
			code:   types.ErrInvalidNetNS,
			phrase: "cannot open network namespace",
		},
		{
			name:   "ipam and prevResult",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", withPrev([]byte(fakePrev))) },
			code:   types.ErrInvalidNetworkConfig,
			phrase: "drop ipam",
		},
		{
			name:   "neither ipam nor prevResult",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", with("ipam", nil)) },
			code:   types.ErrInvalidNetworkConfig,
			phrase: "add an ipam section",
		},
		{
			name:   "bpffsRoot not on bpffs",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", with("bpffsRoot", t.TempDir())) },
			code:   types.ErrPluginNotAvailable,
			phrase: "mount -t bpf bpf",
		},
		{
			name:   "unknown attachMode",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", with("attachMode", "xdp")) },
			code:   types.ErrInvalidNetworkConfig,
			phrase: "not one of auto, tcx, tc",
		},
		{
			name:   "relative bpffsRoot",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", with("bpffsRoot", "bpf/patchcord")) },
			code:   types.ErrInvalidNetworkConfig,
			phrase: "must be an absolute path",
		},
		{
			name:   "mtu out of range",
			conf:   func(t *testing.T, n *node) []byte { return n.conf(t, "1.0.0", with("mtu", 100)) },
			code:   types.ErrInvalidNetworkConfig,
			phrase: "use 576..65535",
		},
		{
			name: "ipam gives IPv6 only",
			conf: func(t *testing.T, n *node) []byte {
				ipam := n.ipam()
				ipam["ranges"] = [][]map[string]string{{{"subnet": "fd00:244::/64"}}}
				return n.conf(t, "1.0.0", with("ipam", ipam))
			},
			code:   types.ErrInvalidNetworkConfig,
			phrase: "from range fd00:244::/64: patchcord does not carry IPv6 yet",
		},
		{
			name: "ipam gives dual stack",
			conf: func(t *testing.T, n *node) []byte {
				ipam := n.ipam()
				ipam["ranges"] = [][]map[string]string{{{"subnet": podSubnet}}, {{"subnet": "fd00:244::/64"}}}
				return n.conf(t, "1.0.0", with("ipam", ipam))
			},
			code:   types.ErrInvalidNetworkConfig,
			phrase: "from range fd00:244::/64: patchcord does not carry IPv6 yet",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			p := newPod(t)
			args := p.args(tc.conf(t, n))
			if tc.netns != "" {
				args.Netns = tc.netns
			}
			_, _, err := n.add(args)
			assertCNIError(t, err, tc.code, tc.phrase)
			n.assertClean(t)
		})
	}
}

func TestAddErrorNonBPFFSLeavesDirAlone(t *testing.T) {
	n := newNode(t)
	dir := t.TempDir()
	_, _, err := n.add(newPod(t).args(n.conf(t, "1.0.0", with("bpffsRoot", dir))))
	assertCNIError(t, err, types.ErrPluginNotAvailable, "mount -t bpf bpf")
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("ADD wrote into %s, which is not a bpffs: %v", dir, entries)
	}
}

func TestAddFullEndpointMap(t *testing.T) {
	n := newNode(t)
	a := newPod(t)
	resA, rawA := n.mustAdd(t, a.args(n.conf(t, "1.1.0")))
	stA := n.assertPodUp(t, a, resA, 1450)

	dp, err := datapath.Open(n.root, datapathtest.Logger(t))
	if err != nil {
		t.Fatalf("open datapath: %v", err)
	}
	defer dp.Close()
	// Fill the endpoints map with addresses host-local never hands out.
	free := int(dp.Maps.Endpoints.MaxEntries()) - countKeys(t, dp.Maps.Endpoints)
	keys := make([]uint32, 0, free)
	vals := make([]datapath.Endpoint, 0, free)
	for i := range free {
		ip := netip.AddrFrom4([4]byte{10, 100, byte(i >> 8), byte(i)})
		keys = append(keys, mapKey(ip))
		vals = append(vals, datapath.Endpoint{Ip: mapKey(ip), Ifindex: uint32(100000 + i)})
	}
	if _, err := dp.Maps.Endpoints.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill endpoints: %v", err)
	}

	b := newPod(t)
	_, _, err = n.add(b.args(n.conf(t, "1.1.0")))
	assertCNIError(t, err, types.ErrTryAgainLater, "endpoint map is full")

	if v := n.veths(t); len(v) != 1 || v[0] != stA.hostIfname {
		t.Errorf("veths after the failed ADD: %v, want only %s", v, stA.hostIfname)
	}
	if l := n.leases(t); len(l) != 1 || l[0] != stA.ip {
		t.Errorf("leases after the failed ADD: %v, want only %s", l, stA.ip)
	}
	if p := n.linkPins(t); len(p) != 1 || p[0] != stA.hostIfname {
		t.Errorf("link pins after the failed ADD: %v, want only %s", p, stA.hostIfname)
	}
	if c := countKeys(t, dp.Maps.EpByIfindex); c != 1 {
		t.Errorf("ep_by_ifindex holds %d entries, want 1 (pod A's)", c)
	}
	if c := countKeys(t, dp.Maps.EpMeta); c != 1 {
		t.Errorf("ep_meta holds %d entries, want 1 (pod A's)", c)
	}
	if _, err := bpfmaps.NewEndpoints(&dp.Maps).FindOwner(b.id, podIfname); err == nil {
		t.Errorf("the failed pod is registered")
	}

	// The pod added before keeps working.
	if err := n.check(a.args(n.conf(t, "1.1.0", withPrev(rawA)))); err != nil {
		t.Errorf("CHECK of the pod added before: %v", err)
	}
}
