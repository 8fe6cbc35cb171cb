// Tests of the plugin's verbs in primary mode, run in-process inside a fresh
// node namespace as containernetworking/plugins tests its own plugins: ADD,
// CHECK and DEL once per CNI version, MTU choice, CHECK finding damage, and
// DEL succeeding however much is already gone.
package cni_test

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
	"github.com/vishvananda/netlink"
)

func TestAddCheckDel(t *testing.T) {
	for _, ver := range versions {
		t.Run(ver, func(t *testing.T) {
			n := newNode(t)
			p := newPod(t)
			res, raw := n.mustAdd(t, p.args(n.conf(t, ver, with("mtu", 1400))))
			st := n.assertPodUp(t, p, res, 1400)

			// libcni passes the ADD result to CHECK and DEL as prevResult.
			conf := n.conf(t, ver, with("mtu", 1400), withPrev(raw))
			if err := n.check(p.args(conf)); err != nil {
				t.Fatalf("CHECK after ADD: %v", err)
			}
			n.mustDel(t, p.args(conf))
			n.assertPodGone(t, p, st)
			n.assertClean(t)
			if err := n.del(p.args(conf)); err != nil {
				t.Errorf("second DEL: %v", err)
			}
		})
	}
}

func TestAddMTU(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  []confOpt
		setup func(t *testing.T, n *node)
		want  int
	}{
		{name: "from conf", opts: []confOpt{with("mtu", 1400)}, want: 1400},
		{name: "no default route", want: 1500 - 50},
		{name: "default route device", setup: defaultRouteVia(9000), want: 9000 - 50},
		{name: "conf over default route device", opts: []confOpt{with("mtu", 1400)}, setup: defaultRouteVia(9000), want: 1400},
		{name: "agent config", setup: agentMTU(bpfmaps.Config{TunnelMTU: 1300}), want: 1300},
		{name: "agent config, every node native", setup: agentMTU(bpfmaps.Config{TunnelMTU: 1300, PodUplinkMTU: true}), want: 1350},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			if tc.setup != nil {
				tc.setup(t, n)
			}
			p := newPod(t)
			res, _ := n.mustAdd(t, p.args(n.conf(t, "1.1.0", tc.opts...)))
			n.assertPodUp(t, p, res, tc.want)
		})
	}
}

// defaultRouteVia gives the node a default route through an uplink.
func defaultRouteVia(mtu int) func(*testing.T, *node) {
	return func(t *testing.T, n *node) {
		err := n.hostNS.Do(func(ns.NetNS) error {
			// A veth stands in for the uplink: this kernel may lack dummy.
			l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink0", MTU: mtu}, PeerName: "uplink1"}
			if err := netlink.LinkAdd(l); err != nil {
				return err
			}
			for _, name := range []string{"uplink0", "uplink1"} {
				if err := netlink.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
					return err
				}
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: prefixNet(netip.MustParsePrefix("192.0.2.10/24"))}); err != nil {
				return err
			}
			return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(netip.MustParsePrefix("0.0.0.0/0")), Gw: net.ParseIP("192.0.2.1")})
		})
		if err != nil {
			t.Fatalf("add default route: %v", err)
		}
	}
}

// agentMTU writes the MTU settings as the agent does.
func agentMTU(cfg bpfmaps.Config) func(*testing.T, *node) {
	return func(t *testing.T, n *node) {
		dp, err := datapath.Open(n.root, datapathtest.Logger(t))
		if err != nil {
			t.Fatalf("open datapath: %v", err)
		}
		defer dp.Close()
		if err := bpfmaps.NewConfig(&dp.Maps).Put(cfg); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCheckFindsDamage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, n *node, p *pod, st podState)
		code   uint
		phrase string
	}{
		{
			name: "from_pod detached",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				if err := n.openPinned(t).Detach(datapath.FromPod, st.hostIfname); err != nil {
					t.Fatal(err)
				}
			},
			code: types.ErrInternal, phrase: "from_pod is not attached",
		},
		{
			name: "endpoint deleted",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				if err := bpfmaps.NewEndpoints(&n.openPinned(t).Maps).Delete(st.ip); err != nil {
					t.Fatal(err)
				}
			},
			code: types.ErrUnknownContainer, phrase: "not registered in the datapath",
		},
		{
			// What an ADD killed between its map writes leaves: the
			// anti-spoofing and owner entries without the forwarding one.
			name: "forwarding entry lost",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				if err := n.openPinned(t).Maps.Endpoints.Delete(mapKey(st.ip)); err != nil {
					t.Fatal(err)
				}
			},
			code: types.ErrUnknownContainer, phrase: "not registered in the datapath",
		},
		{
			name: "pod address removed",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				inPod(t, p, func(l netlink.Link) error {
					return netlink.AddrDel(l, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(st.ip, 32))})
				})
			},
			code: types.ErrInternal, phrase: "lacks its address",
		},
		{
			name: "pod default route removed",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				inPod(t, p, func(l netlink.Link) error {
					return netlink.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.IP{169, 254, 1, 1}})
				})
			},
			code: types.ErrInternal, phrase: "not found in routing table",
		},
		{
			name: "host veth deleted",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				err := n.hostNS.Do(func(ns.NetNS) error {
					l, err := netlink.LinkByName(st.hostIfname)
					if err != nil {
						return err
					}
					return netlink.LinkDel(l)
				})
				if err != nil {
					t.Fatal(err)
				}
			},
			code: types.ErrInternal, phrase: "is gone",
		},
		{
			name: "IPv6 turned back on at the host veth",
			damage: func(t *testing.T, n *node, p *pod, st podState) {
				err := n.hostNS.Do(func(ns.NetNS) error {
					return os.WriteFile("/proc/sys/net/ipv6/conf/"+st.hostIfname+"/disable_ipv6", []byte("0"), 0o644)
				})
				if err != nil {
					t.Fatal(err)
				}
			},
			code: types.ErrInternal, phrase: "host veth speaks IPv6",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			p := newPod(t)
			res, raw := n.mustAdd(t, p.args(n.conf(t, "1.1.0")))
			st := n.assertPodUp(t, p, res, 1450)
			conf := n.conf(t, "1.1.0", withPrev(raw))
			if err := n.check(p.args(conf)); err != nil {
				t.Fatalf("CHECK before damage: %v", err)
			}
			tc.damage(t, n, p, st)
			assertCNIError(t, n.check(p.args(conf)), tc.code, tc.phrase)

			// DEL still cleans up all that is left.
			n.mustDel(t, p.args(conf))
			n.assertPodGone(t, p, st)
			n.assertClean(t)
		})
	}
}

// inPod runs f on the pod's eth0 inside its namespace.
func inPod(t *testing.T, p *pod, f func(netlink.Link) error) {
	t.Helper()
	err := p.ns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(podIfname)
		if err != nil {
			return err
		}
		return f(l)
	})
	if err != nil {
		t.Fatalf("in pod: %v", err)
	}
}

func TestDelSucceeds(t *testing.T) {
	t.Run("never added", func(t *testing.T) {
		n := newNode(t)
		other := newPod(t)
		_, raw := n.mustAdd(t, other.args(n.conf(t, "1.1.0")))
		n.mustDel(t, newPod(t).args(n.conf(t, "1.1.0")))
		// The pod that was added is untouched.
		if err := n.check(other.args(n.conf(t, "1.1.0", withPrev(raw)))); err != nil {
			t.Errorf("CHECK of the other pod after DEL of a stranger: %v", err)
		}
	})

	t.Run("pod netns deleted", func(t *testing.T) {
		n := newNode(t)
		p := newPod(t)
		res, raw := n.mustAdd(t, p.args(n.conf(t, "1.1.0")))
		st := n.assertPodUp(t, p, res, 1450)
		args := p.args(n.conf(t, "1.1.0", withPrev(raw)))
		p.ns.Delete(t)
		if _, err := os.Stat(args.Netns); err == nil {
			t.Fatalf("%s still exists", args.Netns)
		}
		n.waitLinkGone(t, st.hostIfname)
		n.mustDel(t, args)
		n.assertPodGone(t, p, st)
		n.assertClean(t)
		if err := n.del(args); err != nil {
			t.Errorf("second DEL: %v", err)
		}
	})

	t.Run("datapath never loaded", func(t *testing.T) {
		n := newNode(t)
		n.mustDel(t, newPod(t).args(n.conf(t, "1.1.0")))
		if _, err := datapath.OpenPinned(n.root); err == nil {
			t.Errorf("DEL loaded the datapath under %s", n.root)
		}
		n.assertClean(t)
	})

	t.Run("bpffs root never mounted", func(t *testing.T) {
		n := newNode(t)
		root := filepath.Join(t.TempDir(), "patchcord")
		n.mustDel(t, newPod(t).args(n.conf(t, "1.1.0", with("bpffsRoot", root))))
		if _, err := os.Stat(root); err == nil {
			t.Errorf("DEL created %s", root)
		}
	})
}
