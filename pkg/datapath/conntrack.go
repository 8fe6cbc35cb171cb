// This file tells whether the datapath's NAT check works on this kernel. The
// check asks conntrack through the bpf_skb_ct_lookup and bpf_ct_release
// kfuncs, which the kernel has only where nf_conntrack is built in or loaded
// (a module on Debian). The programs declare them weak and the loader turns
// the check off where they are missing, so the programs still load; their
// NAT check then says "not NATed" for every packet, which is right only
// while nothing NATs, since NAT needs nf_conntrack.
package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// ctModule is the module that exports the conntrack kfuncs when it is not
// built into the kernel.
const ctModule = "nf_conntrack"

// ctKfuncs are the kfuncs bpf/lib/conntrack.h calls.
var ctKfuncs = []string{"bpf_skb_ct_lookup", "bpf_ct_release"}

// NATDetection says whether the datapath can tell NATed connections from
// others, and if not, why.
type NATDetection struct {
	On  bool
	Why string // empty when On
}

// ProbeNATDetection looks the conntrack kfuncs up in the running kernel's
// BTF: vmlinux's, and nf_conntrack's when it is a loaded module.
func ProbeNATDetection() NATDetection {
	vmlinux, err := btf.LoadKernelSpec()
	if err != nil {
		return NATDetection{Why: fmt.Sprintf("read kernel BTF: %v", err)}
	}
	specs := []*btf.Spec{vmlinux}
	mod, err := btf.LoadKernelModuleSpec(ctModule)
	switch {
	case err == nil:
		specs = append(specs, mod)
	case !errors.Is(err, fs.ErrNotExist):
		return NATDetection{Why: fmt.Sprintf("read %s BTF: %v", ctModule, err)}
	}
	_, err = os.Stat("/sys/module/" + ctModule)
	return DetectNAT(specs, err == nil)
}

// DetectNAT says whether the kernel whose BTF is specs (vmlinux's first,
// then modules') has the conntrack kfuncs; ctLoaded is whether nf_conntrack
// is part of the running kernel, which names the likely cause.
func DetectNAT(specs []*btf.Spec, ctLoaded bool) NATDetection {
	var missing []string
	for _, name := range ctKfuncs {
		if !hasFunc(specs, name) {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return NATDetection{On: true}
	}
	why := fmt.Sprintf("its kfuncs %s are missing from kernel BTF", strings.Join(missing, "/"))
	if !ctLoaded {
		return NATDetection{Why: ctModule + " not loaded: " + why}
	}
	return NATDetection{Why: ctModule + " is loaded but " + why + " (kernel before 6.0, or without module BTF)"}
}

func hasFunc(specs []*btf.Spec, name string) bool {
	for _, spec := range specs {
		var fn *btf.Func
		if spec.TypeByName(name, &fn) == nil {
			return true
		}
	}
	return false
}

// prepareConntrack loads nf_conntrack where it is a module not loaded yet,
// so that the programs about to load get its kfuncs: loaded without them,
// they would miss NAT that kube-proxy sets up later, until reloaded. Failing
// that (no modprobe, no module), the programs load without NAT detection.
func prepareConntrack(log *slog.Logger) NATDetection {
	nat := ProbeNATDetection()
	if nat.On {
		return nat
	}
	if out, err := exec.Command("modprobe", ctModule).CombinedOutput(); err != nil {
		log.Warn("load nf_conntrack for NAT detection failed; programs load without it",
			"why", nat.Why, "err", err, "output", strings.TrimSpace(string(out)))
		return nat
	}
	return ProbeNATDetection()
}

// setConntrack tells an object whose NAT check calls the conntrack kfuncs
// (those with ct_available) whether it may.
func setConntrack(spec *ebpf.CollectionSpec, nat NATDetection) error {
	v, ok := spec.Variables["ct_available"]
	if !ok || nat.On {
		return nil
	}
	if err := v.Set(uint8(0)); err != nil {
		return fmt.Errorf("clear ct_available: %w", err)
	}
	return nil
}

// ctMarker is part of the build marker: it changes when nf_conntrack's BTF
// appears, so that the next Open reloads programs that were loaded without
// its kfuncs. Cheap enough for every CNI ADD, unlike parsing kernel BTF.
func ctMarker() string {
	if _, err := os.Stat("/sys/kernel/btf/" + ctModule); err == nil {
		return "+" + ctModule
	}
	return ""
}

// NATCheckLoaded says whether the pinned from_pod runs its NAT check:
// programs loaded while the kfuncs were missing keep it off until the next
// load, even once nf_conntrack is there.
func (d *Datapath) NATCheckLoaded() (bool, error) {
	return d.constLoaded(FromPod, loadFromPod, "ct_available")
}

// constLoaded reads the one-byte load-time constant name of the pinned
// program prog, whose embedded object load parses.
func (d *Datapath) constLoaded(prog string, load func() (*ebpf.CollectionSpec, error), name string) (bool, error) {
	spec, err := load()
	if err != nil {
		return false, fmt.Errorf("parse embedded object: %w", err)
	}
	v, ok := spec.Variables[name]
	if !ok {
		return false, fmt.Errorf("%s has no %s: embedded object out of date", prog, name)
	}
	p, err := d.Program(prog)
	if err != nil {
		return false, err
	}
	info, err := p.Info()
	if err != nil {
		return false, fmt.Errorf("read %s info: %w", prog, err)
	}
	ids, _ := info.MapIDs()
	for _, id := range ids {
		value, err := rodata(id, v.SectionName)
		if err != nil {
			return false, err
		}
		if int(v.Offset) < len(value) {
			return value[v.Offset] != 0, nil
		}
	}
	return false, fmt.Errorf("%s's %s map not found", prog, v.SectionName)
}

// rodata returns the value of the map with id if it is the program's
// section named section, nil otherwise.
func rodata(id ebpf.MapID, section string) ([]byte, error) {
	m, err := ebpf.NewMapFromID(id)
	if err != nil {
		return nil, fmt.Errorf("open map %d: %w", id, err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		return nil, fmt.Errorf("read map %d info: %w", id, err)
	}
	if info.Name != section || info.KeySize != 4 || info.MaxEntries != 1 {
		return nil, nil
	}
	value := make([]byte, info.ValueSize)
	if err := m.Lookup(uint32(0), &value); err != nil {
		return nil, fmt.Errorf("read %s: %w", section, err)
	}
	return value, nil
}
