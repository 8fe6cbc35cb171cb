// Package ipv6off turns IPv6 off on the interfaces patchcord gives a pod,
// and checks that it stays off: the CNI plugin does it at ADD and CHECK,
// the agent for pods set up by releases that did not.
package ipv6off

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
var settings = []struct{ key, value string }{
	{"accept_ra", "0"},
	{"autoconf", "0"},
	{"disable_ipv6", "1"},
}

func confPath(ifname, key string) string {
	return filepath.Join("/proc/sys/net/ipv6/conf", ifname, key)
}

// Disable turns IPv6 off on the interface ifname of the caller's network
// namespace. A kernel booted without IPv6 has nothing to turn off.
func Disable(ifname string) error {
	if _, err := os.Stat("/proc/sys/net/ipv6"); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	for _, s := range settings {
		if err := os.WriteFile(confPath(ifname, s.key), []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("turn off IPv6 on %s (%s=%s): %w", ifname, s.key, s.value, err)
		}
	}
	return nil
}

// Check says what is wrong with an interface's IPv6 state, nil if IPv6 is
// off as Disable leaves it.
func Check(ifname string) error {
	if _, err := os.Stat("/proc/sys/net/ipv6"); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	for _, s := range settings {
		b, err := os.ReadFile(confPath(ifname, s.key))
		if err != nil {
			return fmt.Errorf("read IPv6 setting %s of %s: %w", s.key, ifname, err)
		}
		if got := strings.TrimSpace(string(b)); got != s.value {
			return fmt.Errorf("%s has IPv6 %s=%s, want %s: IPv6 would pass between pod and node", ifname, s.key, got, s.value)
		}
	}
	return nil
}
