// Link, address and sysctl plumbing inside the lab's namespaces. Links go through netlink
// handles bound to a namespace, so no goroutine ever switches namespace for them; sysctls
// need the writer to be in the namespace and go through ns.WithNetNSPath.
package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// withHandle runs fn with a netlink handle whose sockets live in the namespace at path.
func withHandle(path string, fn func(h *netlink.Handle) error) error {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	defer h.Close()
	return fn(h)
}

func linkUp(path, name string) error {
	return withHandle(path, func(h *netlink.Handle) error {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", name, path, err)
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up in %s: %w", name, path, err)
		}
		return nil
	})
}

// deleteLink deletes a link if it exists.
func deleteLink(path, name string) error {
	return withHandle(path, func(h *netlink.Handle) error {
		link, err := h.LinkByName(name)
		if _, ok := err.(netlink.LinkNotFoundError); ok {
			return nil
		}
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", name, path, err)
		}
		if err := h.LinkDel(link); err != nil {
			return fmt.Errorf("delete %s in %s: %w", name, path, err)
		}
		return nil
	})
}

// setSysctls writes /proc/sys entries (keys relative to /proc/sys, e.g.
// "net/ipv4/ip_forward") as seen from the namespace at path. Missing keys are an error
// unless optional, for knobs that exist only with a module loaded (br_netfilter).
func setSysctls(path string, kv map[string]string, optional bool) error {
	return ns.WithNetNSPath(path, func(ns.NetNS) error {
		for k, v := range kv {
			err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644)
			if optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return fmt.Errorf("sysctl %s=%s in %s: %w", k, v, path, err)
			}
		}
		return nil
	})
}

// setupFabric makes the switch: bridge br0, up, with nothing on it but the nodes' uplinks.
func setupFabric(path string) error {
	// IPv6 off before any link exists, so that br0 and its ports never get link-local
	// addresses and send no router solicitations or MLD reports into the nodes' uplinks.
	// br_netfilter (loaded on this machine) would pass bridged frames through the fabric
	// namespace's iptables: a switch does not.
	if err := setSysctls(path, map[string]string{
		"net/ipv6/conf/all/disable_ipv6":     "1",
		"net/ipv6/conf/default/disable_ipv6": "1",
	}, false); err != nil {
		return err
	}
	if err := setSysctls(path, map[string]string{
		"net/bridge/bridge-nf-call-iptables":  "0",
		"net/bridge/bridge-nf-call-ip6tables": "0",
		"net/bridge/bridge-nf-call-arptables": "0",
	}, true); err != nil {
		return err
	}
	return withHandle(path, func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", MTU: 1500, TxQLen: -1}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge br0: %w", err)
		}
		if err := h.LinkSetUp(br); err != nil {
			return fmt.Errorf("set br0 up: %w", err)
		}
		return nil
	})
}

// setupUplink connects a node to the fabric: a veth whose switch end (port) joins br0 and
// whose other end is created directly inside the node namespace as eth0, so that no link
// ever appears in the root namespace, not even for a moment.
func setupUplink(fabricPath, nodePath, port string, addr netip.Prefix) error {
	nodeNS, err := netns.GetFromPath(nodePath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", nodePath, err)
	}
	defer nodeNS.Close()
	err = withHandle(fabricPath, func(h *netlink.Handle) error {
		br, err := h.LinkByName("br0")
		if err != nil {
			return fmt.Errorf("find br0: %w", err)
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: port, MTU: 1500, TxQLen: -1, MasterIndex: br.Attrs().Index},
			PeerName:      "eth0",
			PeerTxQLen:    -1,
			PeerNamespace: netlink.NsFd(nodeNS),
		}
		if err := h.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s/eth0: %w", port, err)
		}
		if err := h.LinkSetUp(veth); err != nil {
			return fmt.Errorf("set %s up: %w", port, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return withHandle(nodePath, func(h *netlink.Handle) error {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return fmt.Errorf("find eth0: %w", err)
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}
		if err := h.AddrAdd(eth0, a); err != nil {
			return fmt.Errorf("add %s to eth0: %w", addr, err)
		}
		if err := h.LinkSetUp(eth0); err != nil {
			return fmt.Errorf("set eth0 up: %w", err)
		}
		// Carrier comes when both ends are up; wait for it rather than let the first
		// packet of a test race it.
		deadline := time.Now().Add(5 * time.Second)
		for {
			l, err := h.LinkByIndex(eth0.Attrs().Index)
			if err != nil {
				return fmt.Errorf("read eth0: %w", err)
			}
			if l.Attrs().OperState == netlink.OperUp {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("eth0 has no carrier after 5s (state %s)", l.Attrs().OperState)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}
