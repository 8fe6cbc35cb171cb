// Tests of chained mode: the real ptp plugin makes the veth and addresses,
// patchcord-cni registers the endpoint and passes ptp's result on.
package cni_test

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
)

func TestChainedAfterPtp(t *testing.T) {
	for _, ver := range versions {
		t.Run(ver, func(t *testing.T) {
			n := newNode(t)
			p := newPod(t)
			ptpConf := n.conf(t, ver, with("type", "ptp"), with("bpffsRoot", nil))
			r, err := n.execPlugin("ptp", "ADD", p.args(ptpConf))
			if err != nil {
				t.Fatalf("ptp ADD: %v", err)
			}
			ptpRaw, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			prev, err := current.NewResultFromResult(r)
			if err != nil {
				t.Fatal(err)
			}
			var hostIf *current.Interface
			for _, i := range prev.Interfaces {
				if i.Sandbox == "" {
					hostIf = i
				}
			}
			if hostIf == nil || len(prev.IPs) != 1 {
				t.Fatalf("ptp result without a host veth or with %d IPs: %s", len(prev.IPs), ptpRaw)
			}
			ip, _ := netip.AddrFromSlice(prev.IPs[0].Address.IP.To4())

			// libcni hands patchcord-cni ptp's result, without ipam.
			conf := n.conf(t, ver, with("ipam", nil), withPrev(ptpRaw))
			res, raw, err := n.add(p.args(conf))
			if err != nil {
				t.Fatalf("chained ADD: %v", err)
			}
			if !sameResult(t, ver, raw, ptpRaw) {
				t.Errorf("chained result\n%s\nwant prevResult\n%s", raw, ptpRaw)
			}
			if len(res.IPs) != 1 {
				t.Fatalf("chained result has %d IPs", len(res.IPs))
			}

			var hostIfindex int
			err = n.hostNS.Do(func(ns.NetNS) error {
				l, err := netlink.LinkByName(hostIf.Name)
				if err != nil {
					return err
				}
				hostIfindex = l.Attrs().Index
				dp := n.openPinned(t)
				ep, err := bpfmaps.NewEndpoints(&dp.Maps).Get(ip)
				if err != nil {
					return err
				}
				if ep.Ifname != hostIf.Name || ep.Ifindex != hostIfindex || ep.HostMAC.String() != l.Attrs().HardwareAddr.String() ||
					ep.Container != p.id || ep.PodIfname != podIfname || ep.Netns != p.ns.Path() {
					t.Errorf("endpoint %+v: want it on ptp's veth %s (ifindex %d) for %s/%s", ep, hostIf.Name, hostIfindex, p.id, podIfname)
				}
				if err := dp.Attached(datapath.FromPod, hostIf.Name); err != nil {
					t.Errorf("from_pod on ptp's veth: %v", err)
				}
				assertNoIPv6(t, hostIf.Name)
				return nil
			})
			if err == nil {
				err = p.ns.Do(func(ns.NetNS) error { assertNoIPv6(t, podIfname); return nil })
			}
			if err != nil {
				t.Fatalf("inspect node: %v", err)
			}

			// CHECK and DEL get the chain's result, which is ptp's.
			delConf := n.conf(t, ver, with("ipam", nil), withPrev(raw))
			if err := n.check(p.args(delConf)); err != nil {
				t.Errorf("chained CHECK: %v", err)
			}
			n.mustDel(t, p.args(delConf))
			st := podState{ip: ip, hostIfname: hostIf.Name, hostIfindex: hostIfindex}
			dp := n.openPinned(t)
			if _, err := bpfmaps.NewEndpoints(&dp.Maps).Get(ip); err == nil {
				t.Errorf("endpoint %s still registered after DEL", ip)
			}
			if pins := n.linkPins(t); len(pins) != 0 {
				t.Errorf("link pins after chained DEL: %v", pins)
			}
			if v := n.veths(t); len(v) != 1 || v[0] != hostIf.Name {
				t.Errorf("veths after chained DEL: %v; ptp's %s is ptp's to delete", v, hostIf.Name)
			}
			if l := n.leases(t); len(l) != 1 || l[0] != ip {
				t.Errorf("leases after chained DEL: %v; ptp's %s is ptp's to release", l, ip)
			}

			if _, err := n.execPlugin("ptp", "DEL", p.args(n.conf(t, ver, with("type", "ptp"), with("bpffsRoot", nil), withPrev(ptpRaw)))); err != nil {
				t.Fatalf("ptp DEL: %v", err)
			}
			n.assertPodGone(t, p, st)
			n.assertClean(t)
		})
	}
}

func TestChainedErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		prev   string
		code   uint
		phrase string
	}{
		{
			name:   "no pod interface",
			prev:   `{"cniVersion":"1.0.0","interfaces":[{"name":"veth0"}],"ips":[{"address":"10.244.1.9/24"}]}`,
			code:   types.ErrInvalidNetworkConfig,
			phrase: "chain patchcord-cni after a plugin that creates a veth",
		},
		{
			name:   "host interface missing",
			prev:   `{"cniVersion":"1.0.0","interfaces":[{"name":"veth0"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/x"}],"ips":[{"address":"10.244.1.9/24","interface":1}]}`,
			code:   types.ErrInvalidNetworkConfig,
			phrase: "not found",
		},
		{
			name:   "host interface not a veth",
			prev:   `{"cniVersion":"1.0.0","interfaces":[{"name":"lo"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/x"}],"ips":[{"address":"10.244.1.9/24","interface":1}]}`,
			code:   types.ErrInvalidNetworkConfig,
			phrase: "not a veth",
		},
		{
			name:   "no IPv4",
			prev:   `{"cniVersion":"1.0.0","interfaces":[{"name":"veth0"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/x"}],"ips":[]}`,
			code:   types.ErrInvalidNetworkConfig,
			phrase: "exactly one IPv4 address",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			p := newPod(t)
			_, _, err := n.add(p.args(n.conf(t, "1.0.0", with("ipam", nil), withPrev([]byte(tc.prev)))))
			assertCNIError(t, err, tc.code, tc.phrase)
			n.assertClean(t)
		})
	}
}

// sameResult compares two results as the given CNI version reads them.
func sameResult(t *testing.T, ver string, a, b []byte) bool {
	t.Helper()
	norm := func(raw []byte) string {
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("result %s: %v", raw, err)
		}
		m["cniVersion"] = ver
		out, _ := json.Marshal(m)
		return string(out)
	}
	return norm(a) == norm(b)
}
