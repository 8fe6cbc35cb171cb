// Package deploy holds what puts patchcord on a Kubernetes cluster: the
// manifests beside this file (DaemonSet, RBAC, the CNI ConfigMap), the
// Containerfile, and the DaemonSet's init step, Install, which the
// patchcord-install command (./install) runs on every node.
package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// PodCIDRPlaceholder in a conflist template becomes the node's pod CIDR.
const PodCIDRPlaceholder = "__POD_CIDR__"

// RenderConflist fills a conflist template with the node's pod CIDR and
// checks that the result is a conflist the runtime will load.
func RenderConflist(tmpl []byte, podCIDR netip.Prefix) ([]byte, error) {
	out := bytes.ReplaceAll(tmpl, []byte(PodCIDRPlaceholder), []byte(podCIDR.String()))
	list, err := libcni.ConfListFromBytes(out)
	if err != nil {
		return nil, fmt.Errorf("render conflist: %w", err)
	}
	if len(list.Plugins) == 0 {
		return nil, errors.New("render conflist: no plugins")
	}
	return out, nil
}

// InstallOptions are patchcord-install's flags.
type InstallOptions struct {
	// BinSrc holds the plugin binaries shipped in the image; each is copied
	// into BinDir (the host's /opt/cni/bin).
	BinSrc, BinDir string
	// ConfTemplate is rendered into ConfDir (the host's /etc/cni/net.d)
	// under its own base name.
	ConfTemplate, ConfDir string
	// Poll is how often the node is read again while it has no pod CIDR;
	// default 2s.
	Poll time.Duration
}

// Install copies the CNI binaries, then waits for the node's pod CIDR and
// writes the conflist. Every file appears whole or not at all: the runtime
// may exec a plugin or read the conf dir at any moment.
func Install(ctx context.Context, opts InstallOptions, node *nodes.Kube, log *slog.Logger) error {
	entries, err := os.ReadDir(opts.BinSrc)
	if err != nil {
		return fmt.Errorf("read plugin binaries: %w", err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(opts.BinSrc, e.Name()))
		if err != nil {
			return fmt.Errorf("read plugin binary: %w", err)
		}
		dst := filepath.Join(opts.BinDir, e.Name())
		if err := writeAtomic(dst, data, 0o755); err != nil {
			return err
		}
		log.Info("installed CNI plugin", "path", dst)
	}

	tmpl, err := os.ReadFile(opts.ConfTemplate)
	if err != nil {
		return fmt.Errorf("read conflist template: %w", err)
	}
	self, err := waitForPodCIDR(ctx, node, opts.Poll, log)
	if err != nil {
		return err
	}
	conf, err := RenderConflist(tmpl, self.PodCIDR)
	if err != nil {
		return fmt.Errorf("%s: %w", opts.ConfTemplate, err)
	}
	dst := filepath.Join(opts.ConfDir, filepath.Base(opts.ConfTemplate))
	if err := writeAtomic(dst, conf, 0o644); err != nil {
		return err
	}
	log.Info("installed CNI conflist", "path", dst, "node", self.Name, "pod_cidr", self.PodCIDR)
	return nil
}

// waitForPodCIDR reads the node until the controller manager has given it a
// pod CIDR: the init step may run before it has.
func waitForPodCIDR(ctx context.Context, node *nodes.Kube, poll time.Duration, log *slog.Logger) (nodes.Node, error) {
	if poll == 0 {
		poll = 2 * time.Second
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		self, err := node.Self(ctx)
		if err == nil {
			return self, nil
		}
		if !errors.Is(err, nodes.ErrNotReady) {
			return nodes.Node{}, err
		}
		log.Info("waiting for the node's pod CIDR", "err", err)
		select {
		case <-t.C:
		case <-ctx.Done():
			return nodes.Node{}, fmt.Errorf("%w (gave up: %v)", err, ctx.Err())
		}
	}
}

// writeAtomic writes a temporary file beside path and renames it over path:
// a running plugin binary cannot be overwritten ("text file busy"), but it
// can be replaced.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	defer os.Remove(f.Name()) // no-op after the rename
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	return nil
}
