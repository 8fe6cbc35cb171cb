// Command patchcord-install is the patchcord DaemonSet's init step: it puts
// patchcord-cni and the reference plugins it needs into the host's CNI bin
// dir, and writes the conflist with this node's pod CIDR into the host's CNI
// conf dir. See deploy/daemonset.yaml.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/patchcord/patchcord/deploy"
	"github.com/patchcord/patchcord/pkg/nodes"
)

func main() {
	var (
		opts       deploy.InstallOptions
		kubeconfig string
		nodeName   string
		timeout    time.Duration
	)
	flag.StringVar(&opts.BinSrc, "bin-src", "/opt/patchcord/cni", "directory of the plugin binaries to install")
	flag.StringVar(&opts.BinDir, "cni-bin-dir", "/host/opt/cni/bin", "the host's CNI bin dir, as mounted")
	flag.StringVar(&opts.ConfTemplate, "conf-template", "/etc/patchcord/cni/05-patchcord.conflist", "conflist template ("+deploy.PodCIDRPlaceholder+" becomes the node's pod CIDR)")
	flag.StringVar(&opts.ConfDir, "cni-conf-dir", "/host/etc/cni/net.d", "the host's CNI conf dir, as mounted")
	flag.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config)")
	flag.StringVar(&nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	flag.DurationVar(&timeout, "timeout", 5*time.Minute, "how long to wait for the node's pod CIDR")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := run(ctx, opts, kubeconfig, nodeName, log); err != nil {
		log.Error(err.Error())
		os.Exit(1)
	}
}

func run(ctx context.Context, opts deploy.InstallOptions, kubeconfig, nodeName string, log *slog.Logger) error {
	client, err := nodes.NewKubeClient(kubeconfig)
	if err != nil {
		return err
	}
	return deploy.Install(ctx, opts, &nodes.Kube{Client: client, NodeName: nodeName, Log: log}, log)
}
