// This file tests the probe that tells whether the NAT check works: it is
// handed kernel BTF with and without the conntrack kfuncs, so no test has
// to unload nf_conntrack.
package datapath_test

import (
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// mustBTF is kernel BTF that declares the functions named.
func mustBTF(tb testing.TB, funcs ...string) *btf.Spec {
	tb.Helper()
	proto := &btf.FuncProto{Return: (*btf.Void)(nil)}
	var types []btf.Type
	for _, name := range funcs {
		types = append(types, &btf.Func{Name: name, Type: proto, Linkage: btf.GlobalFunc})
	}
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		tb.Fatal(err)
	}
	spec, err := b.Spec()
	if err != nil {
		tb.Fatal(err)
	}
	return spec
}

func TestDetectNAT(t *testing.T) {
	const missing = "its kfuncs bpf_skb_ct_lookup/bpf_ct_release are missing from kernel BTF"
	tests := []struct {
		name     string
		specs    func(testing.TB) []*btf.Spec
		ctLoaded bool
		want     datapath.NATDetection
	}{
		{name: "nf_conntrack built in", ctLoaded: true, want: datapath.NATDetection{On: true},
			specs: func(tb testing.TB) []*btf.Spec {
				return []*btf.Spec{mustBTF(tb, "bpf_skb_ct_lookup", "bpf_ct_release", "ip_rcv")}
			}},
		{name: "nf_conntrack a loaded module", ctLoaded: true, want: datapath.NATDetection{On: true},
			specs: func(tb testing.TB) []*btf.Spec {
				return []*btf.Spec{mustBTF(tb, "ip_rcv"), mustBTF(tb, "bpf_skb_ct_lookup", "bpf_ct_release")}
			}},
		{name: "nf_conntrack a module not loaded",
			want:  datapath.NATDetection{Why: "nf_conntrack not loaded: " + missing},
			specs: func(tb testing.TB) []*btf.Spec { return []*btf.Spec{mustBTF(tb, "ip_rcv")} }},
		{name: "nf_conntrack loaded, kfuncs not exported", ctLoaded: true,
			want: datapath.NATDetection{Why: "nf_conntrack is loaded but " + missing +
				" (kernel before 6.0, or without module BTF)"},
			specs: func(tb testing.TB) []*btf.Spec { return []*btf.Spec{mustBTF(tb, "ip_rcv")} }},
		{name: "release missing", ctLoaded: true,
			want: datapath.NATDetection{Why: "nf_conntrack is loaded but its kfuncs bpf_ct_release are missing from kernel BTF" +
				" (kernel before 6.0, or without module BTF)"},
			specs: func(tb testing.TB) []*btf.Spec { return []*btf.Spec{mustBTF(tb, "bpf_skb_ct_lookup")} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := datapath.DetectNAT(tt.specs(t), tt.ctLoaded); got != tt.want {
				t.Errorf("DetectNAT: got %+v, want %+v", got, tt.want)
			}
		})
	}
}

// The loader turns the NAT check on exactly when the kernel has the kfuncs.
func TestNATCheckLoadedAsProbed(t *testing.T) {
	d := datapathtest.MustOpen(t)
	got, err := d.NATCheckLoaded()
	if err != nil {
		t.Fatal(err)
	}
	if want := datapath.ProbeNATDetection(); got != want.On {
		t.Errorf("NAT check loaded: got %t, want %t (probe: %+v)", got, want.On, want)
	}
}
