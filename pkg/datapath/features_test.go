// This file tests the kernel feature table: the probes on the running
// kernel, the refusal of a kernel without a required feature, and both
// decap modes of from_uplink through BPF_PROG_RUN on this kernel.
package datapath_test

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf/features"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// requireFeature skips a test of something only the kernel feature name
// makes, naming it, where the running kernel lacks it.
func requireFeature(tb testing.TB, name string) {
	tb.Helper()
	datapathtest.RequireRoot(tb)
	if f, _ := datapath.ProbeFeatures().Get(name); !f.Have {
		tb.Skipf("kernel %s lacks %s (since %s): %s", datapath.KernelRelease(), name, f.Since, f.Why)
	}
}

// kernelAtLeast says whether the running kernel is major.minor or newer.
func kernelAtLeast(tb testing.TB, major, minor uint32) bool {
	tb.Helper()
	code, err := features.LinuxVersionCode()
	if err != nil {
		tb.Fatal(err)
	}
	return code >= major<<16|minor<<8
}

// The probes agree with the kernel's version on Debian's kernels, which
// backport none of these: ENCAP_L2_ETH appeared in 5.13 (so Debian 11's 5.10
// is refused, naming it), the DECAP flags in 6.3, tcx in 6.6.
func TestProbeFeatures(t *testing.T) {
	datapathtest.RequireRoot(t)
	fs := datapath.ProbeFeatures()
	err := fs.Check()
	switch floor := kernelAtLeast(t, 5, 13); {
	case floor && err != nil:
		t.Fatalf("kernel %s lacks a required feature: %v", datapath.KernelRelease(), err)
	case !floor && (err == nil || !strings.Contains(err.Error(), datapath.FeatureEncapL2Eth)):
		t.Fatalf("kernel %s, before 5.13: Check says %v, want it to name %s", datapath.KernelRelease(), err, datapath.FeatureEncapL2Eth)
	}
	names := map[string]bool{}
	for _, f := range fs {
		names[f.Name] = true
		if f.Have != (f.Why == "") {
			t.Errorf("%s: have %t but why %q", f.Name, f.Have, f.Why)
		}
		t.Logf("%-24s since %-5s have %-5t %s", f.Name, f.Since, f.Have, f.Why)
	}
	for _, name := range []string{datapath.FeatureRedirectPeer, datapath.FeatureRedirectNeigh, datapath.FeatureRingBuf, datapath.FeatureEncapL2Eth,
		datapath.FeatureBTF, datapath.FeatureDecapFlags, datapath.FeatureCTKfuncs, datapath.FeatureTCX} {
		if !names[name] {
			t.Errorf("feature %q not probed", name)
		}
	}
	for name, since := range map[string][2]uint32{datapath.FeatureEncapL2Eth: {5, 13}, datapath.FeatureDecapFlags: {6, 3}, datapath.FeatureTCX: {6, 6}} {
		if want := kernelAtLeast(t, since[0], since[1]); fs.Have(name) != want {
			t.Errorf("kernel %s: %s probed %t, want %t", datapath.KernelRelease(), name, !want, want)
		}
	}
}

func TestFeaturesCheck(t *testing.T) {
	all := datapath.Features{
		{Name: datapath.FeatureRedirectPeer, Since: "5.10", Have: true},
		{Name: datapath.FeatureDecapFlags, Since: "6.3", Have: true, Without: "decap with FIXED_GSO alone"},
	}
	tests := []struct {
		name string
		fs   datapath.Features
		want string // a part of the error; empty: none
	}{
		{name: "all there", fs: all},
		{name: "degraded only", fs: all.With(datapath.FeatureDecapFlags, false)},
		{name: "below the floor", fs: all.With(datapath.FeatureRedirectPeer, false), want: "lacks bpf_redirect_peer (since 5.10"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.fs.Check()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Check: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Check: got %v, want an error containing %q", err, tt.want)
			case tt.want != "" && !strings.Contains(err.Error(), "needs Linux "+datapath.MinKernel):
				t.Fatalf("Check: %v does not name the minimum kernel", err)
			}
		})
	}
}

// from_uplink decapsulates with and without BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
// byte for byte the same, where the kernel knows the flag; where it does not,
// the flag makes the kernel refuse the decap, which is why the loader
// clears it there.
func TestFromUplinkDecapFlagModes(t *testing.T) {
	datapathtest.RequireKernel(t)
	kernelHas := datapath.ProbeFeatures().Have(datapath.FeatureDecapFlags)
	for _, flag := range []bool{true, false} {
		t.Run(map[bool]string{true: "with flag", false: "without flag"}[flag], func(t *testing.T) {
			d, err := datapath.OpenWithFeatures(datapathtest.MustBPFFS(t), datapathtest.Logger(t),
				func(fs datapath.Features) datapath.Features { return fs.With(datapath.FeatureDecapFlags, flag) })
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { d.Close() })
			if loaded, err := d.DecapFlagLoaded(); err != nil || loaded != flag {
				t.Fatalf("decap_l3_flag loaded: %t (%v), want %t", loaded, err, flag)
			}
			n := &testNode{tb: t, d: d}
			n.configure(defaultConfig())
			n.addNode(peerNode())
			n.addPod(dstPod)
			inner := toDstPod(tcpPacket(peerPodIP, dstPod.IP))
			in := fromPeer(inner.marshal()).marshal()

			ret, out := mustRun(t, n.prog(datapath.FromUplink), in)

			if flag && !kernelHas {
				wantVerdict(t, ret, tcActShot)
				n.wantCounters(map[string]bpfmaps.Counter{"drop_malformed": counted(len(in))})
				return
			}
			wantVerdict(t, ret, tcActRedirect)
			want := ethernet{Dst: dstPod.MAC, Src: dstPod.HostMAC, Type: ethTypeIPv4}.
				marshal(inner.withTTL(inner.ip.TTL - 1).marshal())
			wantFrame(t, out, want)
			n.wantCounters(map[string]bpfmaps.Counter{"decap": counted(len(in) - vxlanOverhead)})
		})
	}
}
