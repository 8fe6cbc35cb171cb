package cni

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// patchcord carries no IPv6 yet, so a pod's host veth must not speak it:
// with a link-local address the node's services on [::] answer the pod, and
// with autoconf or accept_ra a pod's router advertisement would configure the
// node. The pod's own interface gets the same, so that it does not send
// what from_pod drops anyway (solicitations, MLD reports) and fills the
// drop counters with noise. The keys are written in this order so that nothing is learnt while
// they change; disable_ipv6 also removes any address already there.
var hostVethIPv6Off = []struct{ key, value string }{
	{"accept_ra", "0"},
	{"autoconf", "0"},
	{"disable_ipv6", "1"},
}

func ipv6ConfPath(ifname, key string) string {
	return filepath.Join("/proc/sys/net/ipv6/conf", ifname, key)
}

// disableIPv6 turns IPv6 off on the interface ifname of the caller's
// network namespace. A kernel booted
// without IPv6 has nothing to turn off.
func disableIPv6(ifname string) error {
	if _, err := os.Stat("/proc/sys/net/ipv6"); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	for _, s := range hostVethIPv6Off {
		if err := os.WriteFile(ipv6ConfPath(ifname, s.key), []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("turn off IPv6 on %s (%s=%s): %w", ifname, s.key, s.value, err)
		}
	}
	return nil
}

// checkIPv6Off says what CHECK finds wrong with an interface's IPv6 state.
func checkIPv6Off(ifname string) error {
	if _, err := os.Stat("/proc/sys/net/ipv6"); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	for _, s := range hostVethIPv6Off {
		b, err := os.ReadFile(ipv6ConfPath(ifname, s.key))
		if err != nil {
			return fmt.Errorf("read IPv6 setting %s of %s: %w", s.key, ifname, err)
		}
		if got := strings.TrimSpace(string(b)); got != s.value {
			return fmt.Errorf("%s has IPv6 %s=%s, want %s: IPv6 would pass between pod and node", ifname, s.key, got, s.value)
		}
	}
	return nil
}
