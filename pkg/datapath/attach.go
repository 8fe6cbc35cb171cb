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
)

// Attachment is one pinned tcx link: a program on an interface.
type Attachment struct {
	Program   string
	Ifname    string
	Ifindex   int // where the link is attached; 0 once its interface is gone
	Direction string
	LinkID    link.ID
	ProgID    ebpf.ProgramID
	Pin       string
	// Stale is set when the link no longer runs the current program on the
	// interface of that name (interface gone or recreated, or old code).
	Stale bool
}

func (d *Datapath) linkPin(prog, ifname string) string {
	return filepath.Join(d.Root, "links", prog, ifname)
}

// Attach attaches prog to the interface ifname (in the caller's network
// namespace) and pins the link, so it stays when this process exits. It is
// idempotent: a current attachment is kept, one running older code is
// updated in place, and one left on a deleted interface of the same name is
// replaced; never with a moment without a program on the interface.
func (d *Datapath) Attach(prog, ifname string, log *slog.Logger) error {
	p, err := d.Program(prog)
	if err != nil {
		return err
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	pin := d.linkPin(prog, ifname)
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}

	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		defer old.Close()
		if done, err := refreshLink(old, iface.Index, p); done || err != nil {
			if err != nil {
				return fmt.Errorf("update %s link on %s: %w", prog, ifname, err)
			}
			return nil
		}
		log.Info("replacing attachment of a deleted interface", "prog", prog, "ifname", ifname)
	case !errors.Is(err, fs.ErrNotExist):
		log.Warn("replacing unreadable link pin", "pin", pin, "err", err)
	}

	// The new link goes in before the old pin goes: tcx holds several
	// links per hook, and the rename swaps the pin atomically.
	info, _ := programInfo(prog)
	l, err := link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: p, Attach: info.Attach})
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	defer l.Close()
	if err := replacePin(l, pin); err != nil {
		return fmt.Errorf("pin %s link of %s: %w", prog, ifname, err)
	}
	return nil
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

// Detach removes prog's pinned link from ifname. A missing link is not an
// error: DEL must succeed however far ADD got.
func (d *Datapath) Detach(prog, ifname string) error {
	pin := d.linkPin(prog, ifname)
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
	l, err := link.LoadPinnedLink(d.linkPin(prog, ifname), nil)
	if err != nil {
		return fmt.Errorf("%s is not attached to %s: %w", prog, ifname, err)
	}
	defer l.Close()
	current, err := linkRuns(l, iface.Index, p)
	if err != nil {
		return err
	}
	if !current {
		return fmt.Errorf("%s link on %s is stale: the interface was recreated or the program replaced", prog, ifname)
	}
	return nil
}

// Attachments lists every pinned link under the root.
func (d *Datapath) Attachments() ([]Attachment, error) {
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
			out = append(out, d.inspect(prog, e.Name()))
		}
	}
	return out, nil
}

func (d *Datapath) inspect(prog, ifname string) Attachment {
	pi, _ := programInfo(prog)
	a := Attachment{Program: prog, Ifname: ifname, Pin: d.linkPin(prog, ifname), Stale: true, Direction: pi.Direction()}
	l, err := link.LoadPinnedLink(a.Pin, nil)
	if err != nil {
		return a
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return a
	}
	a.LinkID = info.ID
	a.ProgID = info.Program
	if tcx := info.TCX(); tcx != nil {
		a.Ifindex = int(tcx.Ifindex)
	}
	iface, err := net.InterfaceByName(ifname)
	p, ok := d.progs[prog]
	if err != nil || !ok || iface.Index != a.Ifindex {
		return a
	}
	if pinfo, err := p.Info(); err == nil {
		if id, ok := pinfo.ID(); ok && id == a.ProgID {
			a.Stale = false
		}
	}
	return a
}

// linkRuns reports whether l is attached to ifindex and runs p.
func linkRuns(l link.Link, ifindex int, p *ebpf.Program) (bool, error) {
	_, current, err := linkState(l, ifindex, p)
	return current, err
}

// updateLinks moves every pinned link of prog that runs other code to p:
// an upgrade that swaps code under running traffic without a moment with no
// program attached. Links already on p are left alone, so that every Open
// may call it to heal a load that was killed between pinning a program and
// moving its links.
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
	for _, e := range entries {
		pin := d.linkPin(prog, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue // detached since the listing: a DEL ran
		}
		if err != nil {
			log.Warn("cannot open link to upgrade", "pin", pin, "err", err)
			continue
		}
		info, err := l.Info()
		if err == nil && info.Program != want {
			err = l.Update(p)
			if err == nil {
				log.Info("upgraded attachment", "prog", prog, "ifname", e.Name())
			}
		}
		l.Close()
		if err != nil {
			// A link whose interface is gone cannot be updated; the
			// agent's reconcile removes it.
			log.Warn("cannot upgrade link", "pin", pin, "err", err)
		}
	}
	return nil
}
