package datapath

// The tc backend, for kernels without tcx (before 6.6): each program is a
// cls_bpf filter in direct-action mode on the interface's clsact qdisc. The
// filter holds its program, so it outlives every process as a tcx link
// does; the program is pinned under links/<prog>/<ifname> as the record of
// the attachment. Ours is the filter at tcPriority and tcHandle with our
// name: replacing it there is atomic (the kernel swaps the program of the
// existing filter), and detaching removes it alone.

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// The bandwidth CNI plugin puts its mirred filter at priority 1 with
	// protocol all, and the kernel refuses a second kind of filter at one
	// priority: ours takes the next.
	tcPriority = 2
	tcHandle   = 1
	// tcNamePrefix marks our filters in `tc filter show`.
	tcNamePrefix = "patchcord:"
)

// tcQdiscHandle is ffff:, where both clsact and ingress sit.
var tcQdiscHandle = netlink.MakeHandle(0xffff, 0)

func tcParent(info ProgramInfo) uint32 {
	if info.Attach == ebpf.AttachTCXEgress {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

// tcSlotQdisc returns the kind of the qdisc in l's ingress slot ("clsact",
// "ingress"), "" when it is free.
func tcSlotQdisc(l netlink.Link) (string, error) {
	qs, err := netlinksafe.QdiscList(l)
	if err != nil {
		return "", fmt.Errorf("list qdiscs of %s: %w", l.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS {
			return q.Type(), nil
		}
	}
	return "", nil
}

// tcEnsureQdisc gives l a qdisc with info's hook: the clsact it has, or an
// ingress qdisc someone else added (the bandwidth plugin's), which takes
// ingress filters as clsact does; otherwise a new clsact. An existing qdisc
// is never replaced: that would drop its filters.
func tcEnsureQdisc(l netlink.Link, info ProgramInfo) error {
	for range 2 {
		kind, err := tcSlotQdisc(l)
		switch {
		case err != nil:
			return err
		case kind == "clsact" || kind == "ingress" && info.Attach != ebpf.AttachTCXEgress:
			return nil
		case kind != "":
			return fmt.Errorf("%s holds an %s qdisc, which has no egress hook for %s: remove it (tc qdisc del dev %s ingress) or use tcx (kernel 6.6)",
				l.Attrs().Name, kind, info.Name, l.Attrs().Name)
		}
		err = netlink.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index, Handle: tcQdiscHandle, Parent: netlink.HANDLE_CLSACT,
		}})
		if !errors.Is(err, unix.EEXIST) {
			if err != nil {
				return fmt.Errorf("add clsact qdisc to %s: %w", l.Attrs().Name, err)
			}
			return nil
		}
		// Added by someone else since the listing: use theirs.
	}
	return fmt.Errorf("add clsact qdisc to %s: the ingress slot keeps changing", l.Attrs().Name)
}

// tcFind returns our filter of info on l, nil if there is none. A foreign
// filter at our priority and handle is an error: replacing it would take it
// from its owner.
func tcFind(l netlink.Link, info ProgramInfo) (*netlink.BpfFilter, error) {
	if kind, err := tcSlotQdisc(l); err != nil || kind == "" {
		return nil, err
	}
	fs, err := netlinksafe.FilterList(l, tcParent(info))
	if err != nil {
		return nil, fmt.Errorf("list tc filters of %s: %w", l.Attrs().Name, err)
	}
	for _, f := range fs {
		a := f.Attrs()
		if a.Priority != tcPriority || a.Handle != tcHandle {
			continue
		}
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == tcNamePrefix+info.Name {
			return bf, nil
		}
		return nil, fmt.Errorf("the tc filter at priority %d handle %d on %s is not patchcord's %s (%s %s): move it elsewhere",
			tcPriority, tcHandle, l.Attrs().Name, info.Name, f.Type(), filterName(f))
	}
	return nil, nil
}

func filterName(f netlink.Filter) string {
	if bf, ok := f.(*netlink.BpfFilter); ok {
		return bf.Name
	}
	return ""
}

// tcAttach makes our filter of info on l run p: created, or its program
// replaced in place (no moment without one), or left as it is if current.
func tcAttach(l netlink.Link, info ProgramInfo, p *ebpf.Program) error {
	if err := tcEnsureQdisc(l, info); err != nil {
		return err
	}
	f, err := tcFind(l, info)
	if err != nil {
		return err
	}
	want, err := programID(p)
	if err != nil {
		return err
	}
	if f != nil && ebpf.ProgramID(f.Id) == want {
		return nil
	}
	err = netlink.FilterReplace(&netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: l.Attrs().Index, Parent: tcParent(info),
			Handle: tcHandle, Priority: tcPriority, Protocol: unix.ETH_P_ALL,
		},
		Fd: p.FD(), Name: tcNamePrefix + info.Name, DirectAction: true,
	})
	if err != nil {
		return fmt.Errorf("replace tc filter on %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// tcDetach removes our filter of info from l, and the clsact qdisc if no
// filter at all is left on it: an empty clsact serves no one, and one that
// holds others' filters stays.
func tcDetach(l netlink.Link, info ProgramInfo) error {
	f, err := tcFind(l, info)
	if err != nil || f == nil {
		return err
	}
	if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete tc filter on %s: %w", l.Attrs().Name, err)
	}
	if kind, err := tcSlotQdisc(l); err != nil || kind != "clsact" {
		return err
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		if fs, err := netlinksafe.FilterList(l, parent); err != nil || len(fs) > 0 {
			return err
		}
	}
	err = netlink.QdiscDel(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: l.Attrs().Index, Handle: tcQdiscHandle, Parent: netlink.HANDLE_CLSACT,
	}})
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("delete empty clsact of %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// AttachYielding is Attach for a pod veth whose ingress qdisc slot a later
// plugin of the chain needs: the bandwidth plugin adds its ingress qdisc
// with NLM_F_EXCL and fails with "file exists" beside any clsact or ingress
// qdisc (containernetworking/plugins#894), and its mirred filter, at
// priority 1, takes every packet to its ifb before any filter behind it
// runs (the ifb re-injects them with tc classification skipped). So in tc
// mode from_pod can neither go first nor run second on such a veth: the
// attachment is recorded as yielded (a directory where the program pin
// would be), and the host stack, which sees all of the pod's traffic,
// polices it instead (hostStackPolices). With tcx the slot stays free, and
// this is Attach.
func (d *Datapath) AttachYielding(prog, ifname string, log *slog.Logger) error {
	s, err := d.StageYielding(prog, ifname, log)
	if err != nil {
		return err
	}
	return s.Commit()
}

// StageYielding is AttachYielding up to the record, as Stage is Attach's.
func (d *Datapath) StageYielding(prog, ifname string, log *slog.Logger) (*Staged, error) {
	mode, err := d.mode(log)
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	if mode != AttachTC {
		return d.Stage(prog, ifname, log)
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", prog, ifname, err)
	}
	if err := hostStackPolices(l); err != nil {
		return nil, fmt.Errorf("hand %s's policing to the host stack: %w", ifname, err)
	}
	pin := d.linkPin(prog, ifname)
	return &Staged{
		what: fmt.Sprintf("record yielded %s on %s", prog, ifname),
		commit: func() error {
			if err := os.MkdirAll(pin, 0o700); err != nil {
				return err
			}
			log.Info("tc mode: ingress qdisc slot left to a later plugin, the host stack polices the pod", "prog", prog, "ifname", ifname)
			return nil
		},
		// The policing stays: it is harmless, and the veth goes with
		// a failed ADD.
		abort: func() {},
	}, nil
}

// hostStackPolices makes the host stack do for a yielded veth what from_pod
// would: strict reverse-path filtering drops sources other than the pod's
// (its /32 route is the only one through the veth), and the gateway's /32
// on the veth answers the pod's ARP for it. Proxy ARP would need a route to
// the gateway, which a node need not have.
func hostStackPolices(l netlink.Link) error {
	if _, err := sysctl.Sysctl(fmt.Sprintf("net/ipv4/conf/%s/rp_filter", l.Attrs().Name), "1"); err != nil {
		return err
	}
	gw := PodGateway()
	err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: unix.RT_SCOPE_LINK})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add %s/32: %w", gw, err)
	}
	return nil
}

// yielded reports whether the record at pin is an AttachYielding one.
func yielded(pin string) bool {
	st, err := os.Stat(pin)
	return err == nil && st.IsDir()
}
