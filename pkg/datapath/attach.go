package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// Attachment is one program on an interface: a pinned tcx link, or in tc
// mode a cls_bpf filter with its program pinned as the record.
type Attachment struct {
	Program   string
	Ifname    string
	Ifindex   int // where it is attached; 0 once its interface is gone
	Direction string
	Mode      AttachMode
	LinkID    link.ID // tcx only
	// Yielded: tc mode left the ingress qdisc slot to a later plugin
	// (AttachYielding); the host stack polices the pod.
	Yielded bool
	ProgID  ebpf.ProgramID
	Pin     string
	// Stale is set when the attachment no longer runs the current program
	// on the interface of that name (interface gone or recreated, or old
	// code).
	Stale bool
}

func (d *Datapath) linkPin(prog, ifname string) string {
	return filepath.Join(d.Root, "links", prog, ifname)
}

// Attach attaches prog to the interface ifname (in the caller's network
// namespace) with the node's attach mode, and pins the link (tcx) or the
// program (tc), so it stays when this process exits. It is idempotent: a
// current attachment is kept, one running older code is updated in place,
// and one left on a deleted interface of the same name is replaced; never
// with a moment without a program on the interface.
func (d *Datapath) Attach(prog, ifname string, log *slog.Logger) error {
	s, err := d.Stage(prog, ifname, log)
	if err != nil {
		return err
	}
	return s.Commit()
}

// Staged is an attachment whose program already runs on the interface but
// is not recorded yet: Commit pins it, so that it outlives the process and
// the agent's reconcile and DEL see it; Abort takes it off again. Until
// Commit nothing on bpffs names it, so it is nobody's orphan to remove, and
// a tcx link dies with the process that staged it. Attaching is the slow
// part (a tcx attach waits for an RCU grace period, ≈11 ms measured on
// a 2-CPU VM): staging it lets CNI ADD do it beside IPAM and outside the
// endpoint lock, and commit under the lock.
type Staged struct {
	what   string // "attach <prog> to <ifname>", for Commit's error
	commit func() error
	abort  func()
	done   bool
}

// Commit records the attachment; if that fails, it is aborted.
func (s *Staged) Commit() error {
	if s.done {
		return nil
	}
	s.done = true
	if err := s.commit(); err != nil {
		s.abort()
		return fmt.Errorf("%s: %w", s.what, err)
	}
	return nil
}

// Abort undoes the attachment unless it was committed. It may be called
// after Commit, as a deferred cleanup.
func (s *Staged) Abort() {
	if !s.done {
		s.done = true
		s.abort()
	}
}

// Stage is Attach up to the record: prog runs on ifname once it returns.
func (d *Datapath) Stage(prog, ifname string, log *slog.Logger) (*Staged, error) {
	p, err := d.Program(prog)
	if err != nil {
		return nil, err
	}
	mode, err := d.mode(log)
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	pin := d.linkPin(prog, ifname)
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	info, _ := programInfo(prog)
	var s *Staged
	if mode == AttachTC {
		s, err = stageTC(info, ifname, p, pin)
	} else {
		s, err = stageTCX(info, ifname, p, pin, log)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	s.what = fmt.Sprintf("attach %s to %s", prog, ifname)
	return s, nil
}

// kept is a Staged for an attachment that was already in place and
// recorded: there is nothing to commit, and nothing of ours to abort.
func kept() *Staged { return &Staged{commit: func() error { return nil }, abort: func() {}} }

func stageTCX(info ProgramInfo, ifname string, p *ebpf.Program, pin string, log *slog.Logger) (*Staged, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		defer old.Close()
		if done, err := refreshLink(old, iface.Index, p); done || err != nil {
			if err != nil {
				return nil, fmt.Errorf("update link: %w", err)
			}
			return kept(), nil
		}
		log.Info("replacing attachment of a deleted interface", "prog", info.Name, "ifname", ifname)
	case !errors.Is(err, fs.ErrNotExist):
		log.Warn("replacing unreadable link pin", "pin", pin, "err", err)
	}

	// The new link goes in before the old pin goes: tcx holds several
	// links per hook, and the rename swaps the pin atomically.
	l, err := link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: p, Attach: info.Attach})
	if err != nil {
		return nil, err
	}
	return &Staged{
		commit: func() error {
			defer l.Close()
			if err := replacePin(l, pin); err != nil {
				return fmt.Errorf("pin link: %w", err)
			}
			return nil
		},
		// The last reference to an unpinned link detaches it.
		abort: func() { l.Close() },
	}, nil
}

// stageTC puts the filter in and commits the record: a process killed in
// between leaves a working filter that the next Attach records.
func stageTC(info ProgramInfo, ifname string, p *ebpf.Program, pin string) (*Staged, error) {
	if yielded(pin) {
		// The slot's owner runs first whatever is added behind it.
		return kept(), nil
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return nil, err
	}
	f, err := tcFind(l, info)
	if err != nil {
		return nil, err
	}
	if err := tcAttach(l, info, p); err != nil {
		return nil, err
	}
	abort := func() {}
	if f == nil {
		// Only a filter this call added is ours to take off.
		abort = func() { tcDetach(l, info) }
	}
	return &Staged{
		commit: func() error {
			if err := pinRecord(p, pin); err != nil {
				return fmt.Errorf("pin attachment record: %w", err)
			}
			return nil
		},
		abort: abort,
	}, nil
}

// pinRecord pins p at pin as the record of a tc attachment. It pins a
// clone: cilium/ebpf moves an already pinned object's pin instead of adding
// one, and p stays pinned under progs.
func pinRecord(p *ebpf.Program, pin string) error {
	c, err := p.Clone()
	if err != nil {
		return err
	}
	defer c.Close()
	return replacePin(c, pin)
}

// refreshLink makes l, if it is attached to ifindex, run p: a link on the
// right interface needs at most an atomic program swap. It reports false
// when l belongs to another (deleted) interface and must be replaced.
func refreshLink(l link.Link, ifindex int, p *ebpf.Program) (bool, error) {
	onIface, current, err := linkState(l, ifindex, p)
	if err != nil || !onIface || current {
		return onIface, err
	}
	return true, l.Update(p)
}

// linkState reports whether l is attached to ifindex and whether it runs p.
func linkState(l link.Link, ifindex int, p *ebpf.Program) (onIface, current bool, err error) {
	info, err := l.Info()
	if err != nil {
		return false, false, fmt.Errorf("inspect link: %w", err)
	}
	tcx := info.TCX()
	if tcx == nil || int(tcx.Ifindex) != ifindex {
		return false, false, nil
	}
	id, err := programID(p)
	return true, err == nil && id == info.Program, err
}

func programID(p *ebpf.Program) (ebpf.ProgramID, error) {
	pinfo, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect program: %w", err)
	}
	id, ok := pinfo.ID()
	if !ok {
		return 0, errors.New("inspect program: the kernel reports no program ID")
	}
	return id, nil
}

// Detach removes prog from ifname: the pinned link, or in tc mode our
// filter (in the caller's network namespace) and its record. A missing
// attachment is not an error: DEL must succeed however far ADD got.
func (d *Datapath) Detach(prog, ifname string) error {
	mode, err := d.AttachMode()
	if err != nil {
		return fmt.Errorf("detach %s from %s: %w", prog, ifname, err)
	}
	pin := d.linkPin(prog, ifname)
	if mode == AttachTC {
		info, _ := programInfo(prog)
		if err := detachTC(info, ifname); err != nil {
			return fmt.Errorf("detach %s from %s: %w", prog, ifname, err)
		}
		if err := os.Remove(pin); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("detach %s from %s: %w", prog, ifname, err)
		}
		return nil
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link we can read: the pin is all there is to remove.
		if rmErr := os.Remove(pin); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
			return fmt.Errorf("detach %s from %s: %w", prog, ifname, err)
		}
		return nil
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("detach %s from %s: %w", prog, ifname, err)
	}
	// Closing the last reference detaches the program.
	return nil
}

// detachTC removes our filter; with the interface gone it went along.
func detachTC(info ProgramInfo, ifname string) error {
	l, err := netlink.LinkByName(ifname)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return tcDetach(l, info)
}

// Attached checks that prog is attached to ifname with current code.
func (d *Datapath) Attached(prog, ifname string) error {
	p, err := d.Program(prog)
	if err != nil {
		return err
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("interface %s: %w", ifname, err)
	}
	mode, err := d.AttachMode()
	if err != nil {
		return err
	}
	st, err := d.attachState(mode, prog, ifname)
	if err != nil {
		return fmt.Errorf("%s is not attached to %s: %w", prog, ifname, err)
	}
	want, err := programID(p)
	if err != nil {
		return err
	}
	if st.ifindex != iface.Index || st.progID != want && !st.yielded {
		return fmt.Errorf("%s %s attachment on %s is stale: the interface was recreated or the program replaced", prog, mode, ifname)
	}
	return nil
}

// attachState is what the kernel says of one attachment.
type attachState struct {
	yielded bool
	ifindex int // 0: not on any interface of that name now
	linkID  link.ID
	progID  ebpf.ProgramID
}

// attachState reads the attachment of prog to ifname; an error means there
// is no record of one.
func (d *Datapath) attachState(mode AttachMode, prog, ifname string) (attachState, error) {
	pin := d.linkPin(prog, ifname)
	if mode == AttachTC {
		return tcState(prog, ifname, pin)
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return attachState{}, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return attachState{}, fmt.Errorf("inspect link: %w", err)
	}
	st := attachState{linkID: info.ID, progID: info.Program}
	if tcx := info.TCX(); tcx != nil {
		st.ifindex = int(tcx.Ifindex)
	}
	return st, nil
}

// tcState is the filter's program when ifname (in the caller's namespace)
// has our filter, the recorded program otherwise.
func tcState(prog, ifname, pin string) (attachState, error) {
	if yielded(pin) {
		st := attachState{yielded: true}
		if l, err := netlink.LinkByName(ifname); err == nil {
			st.ifindex = l.Attrs().Index
		}
		return st, nil
	}
	rec, err := ebpf.LoadPinnedProgram(pin, nil)
	if err != nil {
		return attachState{}, err
	}
	id, err := programID(rec)
	rec.Close()
	if err != nil {
		return attachState{}, err
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return attachState{progID: id}, nil
	}
	info, _ := programInfo(prog)
	f, err := tcFind(l, info)
	if err != nil || f == nil {
		return attachState{progID: id}, err
	}
	return attachState{ifindex: l.Attrs().Index, progID: ebpf.ProgramID(f.Id)}, nil
}

// Attachments lists every recorded attachment under the root.
func (d *Datapath) Attachments() ([]Attachment, error) {
	mode, err := d.AttachMode()
	if err != nil {
		return nil, err
	}
	var out []Attachment
	for _, prog := range programNames() {
		entries, err := os.ReadDir(filepath.Join(d.Root, "links", prog))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list %s links: %w", prog, err)
		}
		for _, e := range entries {
			out = append(out, d.inspect(mode, prog, e.Name()))
		}
	}
	return out, nil
}

func (d *Datapath) inspect(mode AttachMode, prog, ifname string) Attachment {
	pi, _ := programInfo(prog)
	a := Attachment{Program: prog, Ifname: ifname, Pin: d.linkPin(prog, ifname), Stale: true, Direction: pi.Direction(), Mode: mode}
	st, err := d.attachState(mode, prog, ifname)
	if err != nil {
		return a
	}
	a.Ifindex, a.LinkID, a.ProgID, a.Yielded = st.ifindex, st.linkID, st.progID, st.yielded
	iface, err := net.InterfaceByName(ifname)
	p, ok := d.progs[prog]
	if err != nil || !ok || iface.Index != a.Ifindex {
		return a
	}
	if id, err := programID(p); err == nil && (id == a.ProgID || a.Yielded) {
		a.Stale = false
	}
	return a
}

// updateLinks moves every attachment of prog that runs other code to p:
// an upgrade that swaps code under running traffic without a moment with no
// program attached. Attachments already on p are left alone, so that every
// Open may call it to heal a load that was killed between pinning a program
// and moving its attachments. tc filters are found by interface name in the
// caller's network namespace; others wait for the agent's reconcile.
func (d *Datapath) updateLinks(prog string, p *ebpf.Program, log *slog.Logger) error {
	entries, err := os.ReadDir(filepath.Join(d.Root, "links", prog))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list %s links: %w", prog, err)
	}
	want, err := programID(p)
	if err != nil {
		return fmt.Errorf("upgrade %s links: %w", prog, err)
	}
	mode, err := d.AttachMode()
	if err != nil {
		return fmt.Errorf("upgrade %s links: %w", prog, err)
	}
	update := updateTCX
	if mode == AttachTC {
		update = updateTC
	}
	for _, e := range entries {
		pin := d.linkPin(prog, e.Name())
		updated, err := update(prog, e.Name(), pin, p, want)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			// detached since the listing: a DEL ran
		case err != nil:
			// An attachment whose interface is gone cannot be
			// updated; the agent's reconcile removes it.
			log.Warn("cannot upgrade attachment", "pin", pin, "err", err)
		case updated:
			log.Info("upgraded attachment", "prog", prog, "ifname", e.Name(), "mode", mode)
		}
	}
	return nil
}

func updateTCX(_, _, pin string, p *ebpf.Program, want ebpf.ProgramID) (bool, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return false, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil || info.Program == want {
		return false, err
	}
	return true, l.Update(p)
}

func updateTC(prog, ifname, pin string, p *ebpf.Program, want ebpf.ProgramID) (bool, error) {
	if _, err := os.Stat(pin); err != nil || yielded(pin) {
		return false, err
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return false, fmt.Errorf("interface %s in this network namespace: %w", ifname, err)
	}
	info, _ := programInfo(prog)
	f, err := tcFind(l, info)
	switch {
	case err != nil:
		return false, err
	case f == nil:
		return false, fmt.Errorf("%s has no patchcord tc filter for %s", ifname, prog)
	case ebpf.ProgramID(f.Id) == want:
		return false, pinRecord(p, pin)
	}
	if err := tcAttach(l, info, p); err != nil {
		return false, err
	}
	return true, pinRecord(p, pin)
}
