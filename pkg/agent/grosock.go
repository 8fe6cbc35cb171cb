// GRO for patchcord's VXLAN: the kernel merges VXLAN frames on receive
// (udp_gro_receive) only for a UDP tunnel socket that owns the destination
// port. patchcord decapsulates in eBPF and needs no socket, so on a physical
// NIC from_uplink would see every MTU-sized frame. The agent therefore keeps
// an idle vxlan device in external (collect_md) mode on the VXLAN port: its
// socket makes GRO merge, and from_uplink, which runs after GRO and before
// any socket, redirects every packet it accepts. The device forwards
// nothing: see groSysctls.
package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"github.com/patchcord/patchcord/internal/ipv6off"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/vishvananda/netlink"
)

// GRODevice is the name of the idle vxlan device that holds the VXLAN port.
const GRODevice = "pc-gro0"

// groSysctls keep the device from delivering or forwarding what reaches its
// socket anyway (VXLAN that from_uplink passes: with IP options, fragments,
// or to another local address): such packets were never checked for a
// forged inner source. With forwarding off a packet to a pod is not routed,
// and strict rp_filter drops every source, since no route points at the
// device; NOARP (set on the link) keeps ARP away.
var groSysctls = []struct{ key, value string }{
	{"forwarding", "0"},
	{"rp_filter", "1"},
	{"accept_local", "0"},
	{"accept_source_route", "0"},
}

// ensureGRODevice creates or repairs the GRO device for port; with off, it
// removes it. Failure is a degraded mode, not an error: traffic flows
// without GRO, so it is logged and the agent goes on. It reports whether
// the device holds the port.
func ensureGRODevice(port uint16, off bool, log *slog.Logger) bool {
	log = log.With("dev", GRODevice, "vxlan_port", port)
	if off {
		if err := removeGRODevice(); err != nil {
			log.Warn("remove the GRO device (--vxlan-gro=false)", "err", err)
		}
		return false
	}
	err := setupGRODevice(port)
	switch {
	case err == nil:
		log.Info("VXLAN GRO: the port is held by an idle external vxlan device")
	case errors.Is(err, syscall.EADDRINUSE):
		// A Flannel flannel.1 on 8472 merges as well; anything else on the
		// port leaves every frame unmerged.
		log.Warn("VXLAN GRO off: another socket owns the VXLAN port; the uplink merges VXLAN only if that is a kernel vxlan device", "owner", vxlanOwner(port), "err", err)
	default:
		log.Warn("VXLAN GRO off: no device holds the VXLAN port; traffic flows unmerged", "err", err)
	}
	return err == nil
}

// setupTunnel attaches from_tunnel to the GRO device when it holds the
// port, so that VXLAN the stack reassembled from fragments reaches pods,
// and detaches it otherwise. Without it such VXLAN dies at the device, as
// it did before; the rest of the datapath is unaffected, so a failure is
// logged, not fatal.
func (a *Agent) setupTunnel(held bool) {
	log := a.log.With("prog", datapath.FromTunnel, "dev", GRODevice)
	// With the port held, the tick's repairHooks tries again after a
	// failure below, or after the device was deleted.
	a.tunnel = held
	if !held {
		if err := a.dp.Detach(datapath.FromTunnel, GRODevice); err != nil {
			log.Warn("detach from the GRO device", "err", err)
		}
		return
	}
	if err := a.dp.Attach(datapath.FromTunnel, GRODevice, log); err != nil {
		log.Warn("VXLAN in IP fragments (Flannel peers behind a smaller-MTU hop) is dropped: attach failed", "err", err)
		return
	}
	log.Info("VXLAN reassembled from fragments is decapsulated by the kernel's vxlan socket and judged by from_tunnel")
}

// setupGRODevice makes GRODevice what it must be, reusing one a previous
// agent left (the datapath outlives the agent).
func setupGRODevice(port uint16) error {
	link, err := netlink.LinkByName(GRODevice)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		link, err = addGRODevice(port)
		if err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("look up %s: %w", GRODevice, err)
	default:
		vx, ok := link.(*netlink.Vxlan)
		if !ok {
			return fmt.Errorf("%s exists and is a %s, not patchcord's vxlan device: left alone", GRODevice, link.Type())
		}
		if !vx.FlowBased || vx.Port != int(port) {
			// Ours, from an agent with another --vxlan-port.
			if err := netlink.LinkDel(link); err != nil {
				return fmt.Errorf("replace %s (port %d): %w", GRODevice, vx.Port, err)
			}
			if link, err = addGRODevice(port); err != nil {
				return err
			}
		}
	}
	if err := quiet(link); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(link); err != nil {
		// The socket is bound only now: a taken port fails here. A device
		// that cannot hold the port has no reason to stay.
		if derr := netlink.LinkDel(link); derr != nil {
			err = fmt.Errorf("%w (and removing it: %v)", err, derr)
		}
		return fmt.Errorf("set %s up (bind UDP port %d): %w", GRODevice, port, err)
	}
	return nil
}

func addGRODevice(port uint16) (netlink.Link, error) {
	vx := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{Name: GRODevice, TxQLen: -1},
		FlowBased: true, // external: any VNI, no FDB, no peers of its own
		Port:      int(port),
		Learning:  false,
	}
	if err := netlink.LinkAdd(vx); err != nil {
		return nil, fmt.Errorf("add vxlan %s (external, port %d): %w", GRODevice, port, err)
	}
	link, err := netlink.LinkByName(GRODevice)
	if err != nil {
		return nil, fmt.Errorf("look up %s: %w", GRODevice, err)
	}
	return link, nil
}

// quiet applies groSysctls, NOARP and IPv6 off, so that the device delivers
// and forwards nothing. Done on every start: a setting changed by hand is
// set back.
func quiet(link netlink.Link) error {
	if err := netlink.LinkSetARPOff(link); err != nil {
		return fmt.Errorf("set %s noarp: %w", GRODevice, err)
	}
	for _, s := range groSysctls {
		path := filepath.Join("/proc/sys/net/ipv4/conf", GRODevice, s.key)
		if err := os.WriteFile(path, []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("set %s %s=%s: %w", GRODevice, s.key, s.value, err)
		}
	}
	return ipv6off.Disable(GRODevice)
}

func removeGRODevice() error {
	link, err := netlink.LinkByName(GRODevice)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		return nil
	case err != nil:
		return fmt.Errorf("look up %s: %w", GRODevice, err)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return nil // not ours
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete %s: %w", GRODevice, err)
	}
	return nil
}

// vxlanOwner names a vxlan device on port, for the log ("" if none).
func vxlanOwner(port uint16) string {
	links, err := netlink.LinkList()
	if err != nil {
		return ""
	}
	for _, l := range links {
		if vx, ok := l.(*netlink.Vxlan); ok && vx.Port == int(port) && l.Attrs().Name != GRODevice {
			return vx.Name
		}
	}
	return ""
}
