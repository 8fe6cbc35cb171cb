// This file is the one table of kernel features the datapath uses, each
// probed on the running kernel, not read off its version: distribution
// kernels backport and leave out. A missing feature either stops the load
// with a message naming it and the kernel that has it, or switches the
// programs into a degraded mode through a load-time constant, which
// `patchcord status` names. The conntrack kfuncs are the precedent (see
// conntrack.go); their row comes from that probe.
package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// MinKernel is the oldest kernel the datapath runs on: bpf_redirect_peer
// and bpf_redirect_neigh appeared in 5.10, but VXLAN encap needs
// bpf_skb_adjust_room's BPF_F_ADJ_ROOM_ENCAP_L2_ETH, which 5.10 refuses.
const MinKernel = "5.13"

// The features' names, as status shows them.
const (
	FeatureRedirectPeer  = "bpf_redirect_peer"
	FeatureRedirectNeigh = "bpf_redirect_neigh"
	FeatureRingBuf       = "ring buffer"
	FeatureBTF           = "kernel BTF"
	FeatureDecapFlags    = "adjust_room DECAP flags"
	FeatureEncapL2Eth    = "adjust_room ENCAP_L2_ETH"
	FeatureCTKfuncs      = "conntrack kfuncs"
	FeatureTCX           = "tcx"
)

// Feature is one kernel feature and whether the running kernel has it.
type Feature struct {
	Name  string `json:"name"`
	Since string `json:"since"` // the first mainline kernel with it
	Have  bool   `json:"have"`
	Why   string `json:"why,omitempty"` // the probe's answer where !Have
	// Without says what the datapath does where the feature is missing;
	// empty for a feature it cannot run without.
	Without string `json:"without,omitempty"`
}

// Required says whether the datapath refuses to load without the feature.
func (f Feature) Required() bool { return f.Without == "" }

// Features is the probed table, in the order of featureTable.
type Features []Feature

// featureTable lists the features probed here; the conntrack kfuncs follow
// from their own probe (ProbeNATDetection).
var featureTable = []struct {
	name, since, without string
	probe                func() error
}{
	{FeatureRedirectPeer, "5.10", "", haveHelper(asm.FnRedirectPeer)},
	{FeatureRedirectNeigh, "5.10", "", haveHelper(asm.FnRedirectNeigh)},
	{FeatureRingBuf, "5.8", "", func() error { return features.HaveMapType(ebpf.RingBuf) }},
	{FeatureEncapL2Eth, "5.13", "", haveEncapL2Eth},
	{FeatureBTF, "5.4", "NAT check off: the conntrack kfuncs are found through it", haveKernelBTF},
	{FeatureDecapFlags, "6.3", "decap with FIXED_GSO alone, the same for IPv4 in IPv4", haveDecapFlags},
	{FeatureTCX, "6.6", "attach mode tc: clsact qdiscs and cls_bpf filters", haveTCX},
}

const ctWithout = "NAT check off: sound only while nothing on the node NATs"

// ProbeFeatures probes every feature, the conntrack kfuncs as they are now
// (it loads no module; the loader does, see prepareConntrack).
func ProbeFeatures() Features { return probeFeatures(ProbeNATDetection()) }

// removeMemlock lifts RLIMIT_MEMLOCK where the kernel charges BPF memory to
// it (before 5.11): a default limit of 64 KiB refuses the datapath's maps.
// Later kernels account BPF memory to the cgroup, and it does nothing.
var removeMemlock = sync.OnceValue(func() error {
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raise RLIMIT_MEMLOCK for BPF maps (kernel before 5.11): %w", err)
	}
	return nil
})

func probeFeatures(nat NATDetection) Features {
	if err := removeMemlock(); err != nil {
		return Features{{Name: "RLIMIT_MEMLOCK", Since: "5.11", Why: err.Error()}}
	}
	fs := make(Features, 0, len(featureTable)+1)
	for _, row := range featureTable {
		f := Feature{Name: row.name, Since: row.since, Without: row.without, Have: true}
		if err := row.probe(); err != nil {
			f.Have, f.Why = false, err.Error()
		}
		fs = append(fs, f)
	}
	return append(fs, Feature{Name: FeatureCTKfuncs, Since: "6.0", Have: nat.On, Why: nat.Why, Without: ctWithout})
}

// Get returns the feature name.
func (fs Features) Get(name string) (Feature, bool) {
	for _, f := range fs {
		if f.Name == name {
			return f, true
		}
	}
	return Feature{}, false
}

// Have says whether the kernel has the feature name.
func (fs Features) Have(name string) bool {
	f, _ := fs.Get(name)
	return f.Have
}

// Missing returns the features the kernel lacks.
func (fs Features) Missing() Features {
	var out Features
	for _, f := range fs {
		if !f.Have {
			out = append(out, f)
		}
	}
	return out
}

// Check returns an error naming every required feature the kernel lacks.
func (fs Features) Check() error {
	var lacks []string
	for _, f := range fs.Missing() {
		if f.Required() {
			lacks = append(lacks, fmt.Sprintf("%s (since %s: %s)", f.Name, f.Since, f.Why))
		}
	}
	if len(lacks) == 0 {
		return nil
	}
	return fmt.Errorf("kernel %s lacks %s: patchcord needs Linux %s or newer", KernelRelease(), strings.Join(lacks, ", "), MinKernel)
}

// KernelRelease is the running kernel's release (uname -r).
func KernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// setFeatures sets the load-time constants of a degraded mode where the
// kernel lacks its feature; an object without the constant does not care.
func setFeatures(spec *ebpf.CollectionSpec, fs Features) error {
	if err := setConntrack(spec, NATDetection{On: fs.Have(FeatureCTKfuncs)}); err != nil {
		return err
	}
	v, ok := spec.Variables["decap_l3_flag"]
	if !ok || fs.Have(FeatureDecapFlags) {
		return nil
	}
	if err := v.Set(uint8(0)); err != nil {
		return fmt.Errorf("clear decap_l3_flag: %w", err)
	}
	return nil
}

func haveHelper(fn asm.BuiltinFunc) func() error {
	return func() error {
		err := features.HaveProgramHelper(ebpf.SchedCLS, fn)
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("tc programs cannot call %s", fn)
		}
		return err
	}
}

func haveKernelBTF() error {
	if _, err := btf.LoadKernelSpec(); err != nil {
		return fmt.Errorf("read kernel BTF: %w (CONFIG_DEBUG_INFO_BTF?)", err)
	}
	return nil
}

// haveTCX runs the attach backend's probe (attach_mode.go) with a program
// of its own, so that it needs no loaded datapath.
func haveTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "probe_tcx",
		Type:         ebpf.SchedCLS,
		AttachType:   ebpf.AttachTCXIngress,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		return fmt.Errorf("probe: load tc program: %w", err)
	}
	defer prog.Close()
	return probeTCX(prog)
}

// Kernel 6.3 values; Debian's UAPI header (6.1) lacks them.
const (
	adjRoomMAC        = 1      // BPF_ADJ_ROOM_MAC
	adjRoomFixedGSO   = 1 << 0 // BPF_F_ADJ_ROOM_FIXED_GSO
	adjRoomDecapL3IP4 = 1 << 7 // BPF_F_ADJ_ROOM_DECAP_L3_IPV4
	// bpf/lib/vxlan.h's VXLAN_ENCAP_FLAGS: FIXED_GSO, ENCAP_L3_IPV4,
	// ENCAP_L4_UDP, ENCAP_L2_ETH and ENCAP_L2(14).
	adjRoomVXLANEncap = 1<<0 | 1<<1 | 1<<4 | 1<<6 | 14<<56
)

// haveEncapL2Eth grows a frame by a VXLAN header with the flags from_pod
// and to_uplink encapsulate with: kernels before 5.13 refuse ENCAP_L2_ETH,
// without which GSO packets would be segmented as IP, not as the Ethernet
// frames VXLAN carries.
func haveEncapL2Eth() error {
	ret, err := runAdjustRoom(50, adjRoomVXLANEncap)
	if err != nil {
		return err
	}
	if ret != 0 {
		return fmt.Errorf("bpf_skb_adjust_room refuses the VXLAN encap flags (BPF_F_ADJ_ROOM_ENCAP_L2_ETH): %w", unix.Errno(-ret))
	}
	return nil
}

// haveDecapFlags runs bpf_skb_adjust_room on an IPIP packet, removing its
// outer IPv4 header, with FIXED_GSO alone and with DECAP_L3_IPV4 added:
// kernels before 6.3 refuse unknown flags with -EINVAL. The first run tells
// a refused flag from a probe that cannot work at all.
func haveDecapFlags() error {
	plain, err := runAdjustRoom(-20, adjRoomFixedGSO)
	if err != nil {
		return err
	}
	if plain != 0 {
		return fmt.Errorf("probe: bpf_skb_adjust_room with FIXED_GSO alone returned %d", plain)
	}
	ret, err := runAdjustRoom(-20, adjRoomFixedGSO|adjRoomDecapL3IP4)
	if err != nil {
		return err
	}
	if ret != 0 {
		return fmt.Errorf("bpf_skb_adjust_room refuses BPF_F_ADJ_ROOM_DECAP_L3_IPV4: %w", unix.Errno(-ret))
	}
	return nil
}

// runAdjustRoom returns what bpf_skb_adjust_room(skb, diff, MAC, flags)
// returns for an Ethernet/IPv4/IPv4/UDP frame.
func runAdjustRoom(diff int32, flags int64) (int32, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "probe_decap",
		Type: ebpf.SchedCLS,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R2, diff),
			asm.Mov.Imm(asm.R3, adjRoomMAC),
			asm.LoadImm(asm.R4, flags, asm.DWord),
			asm.FnSkbAdjustRoom.Call(),
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return 0, fmt.Errorf("probe: load bpf_skb_adjust_room program: %w", err)
	}
	defer prog.Close()
	frame := ipipFrame()
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+64)})
	if err != nil {
		return 0, fmt.Errorf("probe: run bpf_skb_adjust_room program: %w", err)
	}
	return int32(ret), nil
}

// ipipFrame is the smallest frame the probe shrinks: Ethernet, an outer and
// an inner IPv4 header, and a UDP header.
func ipipFrame() []byte {
	frame := make([]byte, 14+20+20+8)
	frame[12], frame[13] = 0x08, 0x00 // ETH_P_IP
	for i, proto := range []byte{4 /* IPIP */, 17 /* UDP */} {
		ip := frame[14+20*i:]
		ip[0] = 0x45
		total := len(frame) - 14 - 20*i
		ip[2], ip[3] = byte(total>>8), byte(total)
		ip[8], ip[9] = 64, proto
	}
	return frame
}

// kernelFeatures probes the kernel for a load, after loading nf_conntrack
// where it is a module, and logs each degraded mode; a missing required
// feature is an error.
func kernelFeatures(log *slog.Logger) (Features, error) {
	fs := probeFeatures(prepareConntrack(log))
	for _, f := range fs.Missing() {
		if !f.Required() {
			log.Warn("kernel lacks a feature; programs load without it",
				"feature", f.Name, "since", f.Since, "why", f.Why, "without", f.Without)
		}
	}
	return fs, fs.Check()
}

// DecapFlagLoaded says whether the pinned from_uplink passes
// BPF_F_ADJ_ROOM_DECAP_L3_IPV4 to bpf_skb_adjust_room.
func (d *Datapath) DecapFlagLoaded() (bool, error) {
	return d.constLoaded(FromUplink, loadFromUplink, "decap_l3_flag")
}
