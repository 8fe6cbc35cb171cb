// This file checks that the programs load where the conntrack kfuncs are
// missing: every object declares them weak (a strong one makes the program
// unloadable where nf_conntrack is a module not loaded, and then every CNI
// ADD fails), and the verifier drops their calls once ct_available is
// cleared.
package datapath

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

func TestConntrackKfuncsWeak(t *testing.T) {
	objects := map[string][]byte{"from_pod": _FromPodBytes, "from_uplink": _FromUplinkBytes}
	for name, obj := range objects {
		t.Run(name, func(t *testing.T) {
			f, err := elf.NewFile(bytes.NewReader(obj))
			if err != nil {
				t.Fatal(err)
			}
			syms, err := f.Symbols()
			if err != nil {
				t.Fatal(err)
			}
			binding := make(map[string]elf.SymBind)
			for _, s := range syms {
				binding[s.Name] = elf.ST_BIND(s.Info)
			}
			for _, kfunc := range ctKfuncs {
				if b, ok := binding[kfunc]; !ok || b != elf.STB_WEAK {
					t.Errorf("%s: binding %v (declared: %t), want STB_WEAK", kfunc, b, ok)
				}
			}
		})
	}
}

// poisonKfuncs does to spec what cilium/ebpf does to the calls of weak
// kfuncs the kernel lacks (linker.go): each becomes a call of a helper that
// does not exist, which the verifier accepts only as dead code.
func poisonKfuncs(tb testing.TB, spec *ebpf.CollectionSpec) {
	tb.Helper()
	n := 0
	for _, p := range spec.Programs {
		for i, ins := range p.Instructions {
			if ins.IsKfuncCall() {
				p.Instructions[i] = asm.BuiltinFunc(0xdedc0de).Call()
				n++
			}
		}
	}
	if n == 0 {
		tb.Fatal("no kfunc calls to poison: the NAT check no longer calls conntrack?")
	}
}

// Where nf_conntrack is missing, the programs load with ct_available
// cleared; left set, the verifier refuses them, so a loader that forgets it
// fails loudly instead of leaving a NAT hole.
func TestNATCheckLoadsWithoutKfuncs(t *testing.T) {
	for name, load := range map[string]func() (*ebpf.CollectionSpec, error){"from_pod": loadFromPod, "from_uplink": loadFromUplink} {
		for _, nat := range []NATDetection{{Why: "test: kfuncs missing"}, {On: true}} {
			t.Run(fmt.Sprintf("%s/on=%t", name, nat.On), func(t *testing.T) {
				spec, err := load()
				if err != nil {
					t.Fatal(err)
				}
				poisonKfuncs(t, spec)
				if err := removeMemlock(); err != nil {
					t.Fatal(err)
				}
				for _, m := range spec.Maps {
					m.Pinning = ebpf.PinNone // a private copy
				}
				if err := setConntrack(spec, nat); err != nil {
					t.Fatal(err)
				}
				coll, err := ebpf.NewCollection(spec)
				if err == nil {
					coll.Close()
				}
				switch {
				case !nat.On && err != nil:
					t.Fatalf("load with ct_available cleared: %v", err)
				case nat.On && !errors.As(err, new(*ebpf.VerifierError)):
					t.Fatalf("load with poisoned kfunc calls reachable: got %v, want a verifier error", err)
				}
			})
		}
	}
}
