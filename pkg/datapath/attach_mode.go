package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/patchcord/patchcord/internal/flock"
	"golang.org/x/sys/unix"
)

// AttachMode is how programs are attached to interfaces: a node-wide fact,
// recorded under the bpffs root by the first attach, so that the CNI plugin
// and the agent never disagree.
type AttachMode string

// The attach backends, and auto, which picks one per kernel. These strings
// are the flag values, the conflist values, the record's name and what the
// views show.
const (
	AttachAuto AttachMode = "auto"
	// AttachTCX: BPF links on the tcx hooks (kernel 6.6 and later).
	AttachTCX AttachMode = "tcx"
	// AttachTC: a cls_bpf filter in direct-action mode on the clsact (or
	// an existing ingress) qdisc, for kernels without tcx.
	AttachTC AttachMode = "tc"
)

// AttachModes are the values ParseAttachMode accepts.
var AttachModes = []AttachMode{AttachAuto, AttachTCX, AttachTC}

// ParseAttachMode reads a flag or conflist value; "" is auto.
func ParseAttachMode(s string) (AttachMode, error) {
	if s == "" {
		return AttachAuto, nil
	}
	for _, m := range AttachModes {
		if string(m) == strings.ToLower(s) {
			return m, nil
		}
	}
	return "", fmt.Errorf("attach mode %q is not one of %s", s, joinModes(AttachModes))
}

func joinModes(ms []AttachMode) string {
	s := make([]string, len(ms))
	for i, m := range ms {
		s[i] = string(m)
	}
	return strings.Join(s, ", ")
}

// ErrAttachModeConflict means a caller asked for another backend than the
// one this node's attachments use.
var ErrAttachModeConflict = errors.New("attach mode conflict")

// modeDir holds one empty directory named after the node's mode: bpffs has
// no regular files, and a directory can be locked.
func (d *Datapath) modeDir() string { return filepath.Join(d.Root, "attach-mode") }

// AttachMode returns the backend recorded for this node; "" before the
// first attach or SetAttachMode.
func (d *Datapath) AttachMode() (AttachMode, error) {
	entries, err := os.ReadDir(d.modeDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("read attach mode: %w", err)
	}
	for _, e := range entries {
		if m := AttachMode(e.Name()); m == AttachTCX || m == AttachTC {
			return m, nil
		}
	}
	// Releases before the record attached with tcx only.
	if pins, _ := filepath.Glob(filepath.Join(d.Root, "links", "*", "*")); len(pins) > 0 {
		return AttachTCX, nil
	}
	return "", nil
}

// SetAttachMode makes want this node's backend, or checks that it is: auto
// keeps what is recorded, or records what the kernel supports; an explicit
// mode that differs from the recorded one is an ErrAttachModeConflict
// saying how to switch.
func (d *Datapath) SetAttachMode(want AttachMode, log *slog.Logger) (AttachMode, error) {
	unlock, err := d.lockMode()
	if err != nil {
		return "", err
	}
	defer unlock()
	have, err := d.AttachMode()
	if err != nil {
		return "", err
	}
	switch {
	case have != "" && (want == AttachAuto || want == have):
		return have, d.recordMode(have)
	case have != "":
		return "", fmt.Errorf("%w: %s requested, but this node's programs are attached with %s (recorded in %s): ask for %s or auto, or switch the node with `patchcord agent --attach-mode %s --migrate-attach-mode`",
			ErrAttachModeConflict, want, have, d.modeDir(), have, want)
	}
	m, err := d.chooseMode(want)
	if err != nil {
		return "", err
	}
	log.Info("attach mode chosen", "mode", m, "requested", want)
	return m, d.recordMode(m)
}

// lockMode serialises the writers of the record: parallel ADDs of a fresh
// node must record one mode, not two.
func (d *Datapath) lockMode() (unlock func(), err error) {
	if err := os.MkdirAll(d.modeDir(), 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", d.modeDir(), err)
	}
	return flock.Hold(d.modeDir(), unix.LOCK_EX)
}

// chooseMode resolves want on this kernel for a node with nothing attached.
func (d *Datapath) chooseMode(want AttachMode) (AttachMode, error) {
	if want == AttachTC {
		return AttachTC, nil
	}
	p, err := d.Program(FromPod)
	if err != nil {
		return "", err
	}
	err = probeTCX(p)
	switch {
	case err == nil:
		return AttachTCX, nil
	case !errors.Is(err, ebpf.ErrNotSupported):
		return "", fmt.Errorf("probe tcx: %w", err)
	case want == AttachTCX:
		return "", fmt.Errorf("attach mode tcx: %w: this kernel has no tcx (it needs 6.6); use tc or auto", err)
	}
	return AttachTC, nil
}

// probeTCX attaches p to an ifindex no interface has: a kernel with tcx
// answers ENODEV, one without refuses the attach type, which cilium/ebpf
// reports as ErrNotSupported. Nothing is attached either way.
func probeTCX(p *ebpf.Program) error {
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxUint32, Program: p, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// recordMode leaves m as the only mode recorded.
func (d *Datapath) recordMode(m AttachMode) error {
	if err := os.MkdirAll(filepath.Join(d.modeDir(), string(m)), 0o700); err != nil {
		return fmt.Errorf("record attach mode: %w", err)
	}
	for _, other := range []AttachMode{AttachTCX, AttachTC} {
		if other != m {
			if err := os.Remove(filepath.Join(d.modeDir(), string(other))); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("record attach mode: %w", err)
			}
		}
	}
	return nil
}

// mode is the backend Attach uses: the recorded one, or auto's choice.
func (d *Datapath) mode(log *slog.Logger) (AttachMode, error) {
	if m, err := d.AttachMode(); err != nil || m != "" {
		return m, err
	}
	return d.SetAttachMode(AttachAuto, log)
}
