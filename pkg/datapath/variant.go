//go:build patchcord_variant

// This file makes a test-only build (go build -tags patchcord_variant) whose
// programs differ from the plain build's by one instruction that does
// nothing. Loaded over a plain build's datapath, every program has another
// tag, so test/upgrade sees an upgrade of program code with the same maps:
// every link must move to the new programs without a packet lost.
package datapath

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
)

func init() {
	variant = "nop"
	editSpec = prependNop
}

// prependNop puts r1 = r1 before each program's first instruction, moving
// its symbol, BTF function and source line there.
func prependNop(spec *ebpf.CollectionSpec) error {
	for _, p := range spec.Programs {
		first := p.Instructions[0]
		nop := asm.Mov.Reg(asm.R1, asm.R1).WithSymbol(first.Symbol()).WithSource(first.Source())
		nop = btf.WithFuncMetadata(nop, btf.FuncMetadata(&first))
		first = btf.WithFuncMetadata(first.WithSymbol("").WithSource(nil), nil)
		p.Instructions = append(asm.Instructions{nop, first}, p.Instructions[1:]...)
	}
	return nil
}
