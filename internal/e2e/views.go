// What the tests read back through the CLI (`patchcord bpf ... -o json`):
// counters and endpoints, and the registration check built on them.
package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/views"
)

// Counter is one line of `bpf stats`.
type Counter = bpfmaps.Counter

// Stats reads a node's counters through the CLI.
func Stats(t *testing.T, ctx context.Context, n *lab.Node) map[string]Counter {
	t.Helper()
	var m map[string]Counter
	cliJSON(t, ctx, n, &m, "bpf", "stats")
	return m
}

// Delta is after minus before for one counter, in packets and bytes.
func Delta(before, after map[string]Counter, name string) Counter {
	return Counter{Packets: after[name].Packets - before[name].Packets, Bytes: after[name].Bytes - before[name].Bytes}
}

// Endpoint is one line of `bpf endpoint list`.
type Endpoint = views.Endpoint

// Endpoints lists a node's endpoints by pod IP.
func Endpoints(t *testing.T, ctx context.Context, n *lab.Node) map[string]Endpoint {
	t.Helper()
	var list []Endpoint
	cliJSON(t, ctx, n, &list, "bpf", "endpoint", "list")
	eps := make(map[string]Endpoint, len(list))
	for _, ep := range list {
		eps[ep.IP] = ep
	}
	return eps
}

// cliJSON runs `patchcord args... -o json` on n and decodes it into v.
func cliJSON(t *testing.T, ctx context.Context, n *lab.Node, v any, args ...string) {
	t.Helper()
	what := strings.Join(args, " ")
	out, err := n.CLI(ctx, append(args, "-o", "json")...)
	if err != nil {
		t.Fatalf("%s on %s: %v", what, n.NetNS, err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("%s on %s: %v\n%s", what, n.NetNS, err, out)
	}
}

// PodRef is what a test knows of a pod, however it was made (lab.Pod,
// a containerd sandbox, a pod wired by cnitool with runtime config).
// MAC and ContainerID are checked only when set.
type PodRef struct {
	Name        string
	IP          netip.Addr
	NSPath      string
	MAC         string
	ContainerID string
}

// RefOf is the PodRef of a lab pod.
func RefOf(p *lab.Pod) PodRef { return PodRef{Name: p.Name, IP: p.IP, NSPath: p.NSPath} }

// RefOfSandbox is the PodRef of a containerd sandbox.
func RefOfSandbox(s *lab.Sandbox) PodRef {
	return PodRef{Name: s.Name, IP: s.IP, NSPath: s.NetNS, ContainerID: s.ID}
}

// AssertRegistered checks that each pod has an address in n's pod CIDR and
// its endpoint: its eth0 in its netns, on a host veth named veth* (if veth is
// set), with from_pod pinned to it.
func AssertRegistered(t *testing.T, ctx context.Context, n *lab.Node, veth string, pods ...PodRef) {
	t.Helper()
	eps := Endpoints(t, ctx, n)
	for _, p := range pods {
		ep, ok := eps[p.IP.String()]
		switch {
		case !n.PodCIDR.Contains(p.IP):
			t.Errorf("pod %s got %s, outside %s", p.Name, p.IP, n.PodCIDR)
			continue
		case !ok:
			t.Errorf("pod %s (%s) has no endpoint", p.Name, p.IP)
			continue
		case ep.Netns != p.NSPath || ep.PodIfname != "eth0":
			t.Errorf("endpoint %s belongs to %s in %s, want eth0 in %s", p.IP, ep.PodIfname, ep.Netns, p.NSPath)
		case p.MAC != "" && ep.MAC != p.MAC:
			t.Errorf("endpoint %s has MAC %s, want %s", p.IP, ep.MAC, p.MAC)
		case p.ContainerID != "" && ep.ContainerID != p.ContainerID:
			t.Errorf("endpoint %s belongs to container %s, want %s", p.IP, ep.ContainerID, p.ContainerID)
		case !strings.HasPrefix(ep.Ifname, veth):
			t.Errorf("endpoint %s is on host veth %q, want a %s* veth", p.IP, ep.Ifname, veth)
		}
		if _, err := os.Stat(filepath.Join(n.BpffsRoot, "links", "from_pod", ep.Ifname)); err != nil {
			t.Errorf("from_pod link of pod %s: %v", p.Name, err)
		}
		AssertAttachBackend(t, ctx, n, "from_pod", ep.Ifname, "ingress")
	}
}

// PodRefs are the PodRefs of lab pods.
func PodRefs(pods []*lab.Pod) []PodRef {
	refs := make([]PodRef, len(pods))
	for i, p := range pods {
		refs[i] = RefOf(p)
	}
	return refs
}

// SandboxRefs are the PodRefs of containerd sandboxes.
func SandboxRefs(pods []*lab.Sandbox) []PodRef {
	refs := make([]PodRef, len(pods))
	for i, s := range pods {
		refs[i] = RefOfSandbox(s)
	}
	return refs
}
