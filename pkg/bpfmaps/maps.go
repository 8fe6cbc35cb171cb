// Package bpfmaps gives typed access to the datapath's maps: netip and net
// types in, netip and net types out, and errors that say what to do.
package bpfmaps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

var (
	// ErrNotFound is returned when a key is not in a map.
	ErrNotFound = errors.New("not found")
	// ErrFull is returned when a map has no room for another entry.
	ErrFull = errors.New("map full")
)

// u32 turns an IPv4 address into the map's representation: the packet's
// byte order, read natively, which is what the C side compares against.
func u32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func addr(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func mac6(hw net.HardwareAddr) ([6]uint8, error) {
	var m [6]uint8
	if len(hw) != 6 {
		return m, fmt.Errorf("MAC %q is not 6 bytes", hw)
	}
	copy(m[:], hw)
	return m, nil
}

func hw(m [6]uint8) net.HardwareAddr { return append(net.HardwareAddr(nil), m[:]...) }

// mapErr turns the kernel's errors into ours.
func mapErr(m *ebpf.Map, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ebpf.ErrKeyNotExist):
		return ErrNotFound
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOMEM) && m.Type() == ebpf.LPMTrie:
		info, _ := m.Info()
		name := "map"
		if info != nil {
			name = info.Name
		}
		return fmt.Errorf("%w: %s holds its maximum of %d entries", ErrFull, name, m.MaxEntries())
	}
	return err
}

func cString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

// putCString stores s NUL-terminated, refusing what does not fit: a
// truncated container ID would never match again.
func putCString(dst []int8, s, what string) error {
	if len(s) >= len(dst) {
		return fmt.Errorf("%s %q is longer than %d bytes", what, s, len(dst)-1)
	}
	clear(dst)
	for i := 0; i < len(s); i++ {
		dst[i] = int8(s[i])
	}
	return nil
}
