package datapath

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// MigrateAttachMode moves every attachment to the backend want (auto: what
// the kernel supports) and records it. Each interface gets its new
// attachment before the old one goes, so no packet meets no program: tcx
// runs before tc filters, and during the overlap a packet the first passes
// on meets the second too. Interfaces are looked up in the caller's network
// namespace; one that is not there keeps its record for the reconcile. A
// migration killed halfway is finished by the next: each attachment is
// judged by its own pin, not by the record.
func (d *Datapath) MigrateAttachMode(want AttachMode, log *slog.Logger) (AttachMode, error) {
	unlock, err := d.lockMode()
	if err != nil {
		return "", err
	}
	defer unlock()
	to, err := d.chooseMode(want)
	if err != nil {
		return "", err
	}
	pins, err := filepath.Glob(filepath.Join(d.Root, "links", "*", "*"))
	if err != nil {
		return "", err
	}
	for _, pin := range pins {
		prog, ifname := filepath.Base(filepath.Dir(pin)), filepath.Base(pin)
		if err := d.migrateOne(prog, ifname, pin, to); err != nil {
			log.Warn("cannot migrate attachment; the agent's reconcile retries", "prog", prog, "ifname", ifname, "err", err)
			continue
		}
		log.Info("migrated attachment", "prog", prog, "ifname", ifname, "mode", to)
	}
	return to, d.recordMode(to)
}

// migrateOne moves one attachment, whichever backend its pin says, to to.
func (d *Datapath) migrateOne(prog, ifname, pin string, to AttachMode) error {
	p, err := d.Program(prog)
	if err != nil {
		return err
	}
	info, ok := programInfo(prog)
	if !ok {
		return fmt.Errorf("no program %s in this build", prog)
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return err
	}
	old, linkErr := link.LoadPinnedLink(pin, nil)
	if linkErr == nil {
		// A tcx link: it holds on through our handle until the tc record
		// has replaced its pin.
		defer old.Close()
		if to == AttachTCX {
			return nil
		}
		if err := tcAttach(l, info, p); err != nil {
			return err
		}
		return pinRecord(p, pin)
	}
	if to == AttachTC {
		return nil
	}
	if yielded(pin) {
		if err := os.Remove(pin); err != nil {
			return err
		}
	}
	nl, err := link.AttachTCX(link.TCXOptions{Interface: l.Attrs().Index, Program: p, Attach: info.Attach})
	if err != nil {
		return err
	}
	defer nl.Close()
	if err := replacePin(nl, pin); err != nil {
		return err
	}
	return tcDetach(l, info)
}
