// Package cni implements the patchcord-cni plugin's verbs. The plugin runs in
// two modes: primary (it creates the veth and delegates addresses to an IPAM
// plugin) and chained (a plugin before it, such as ptp, made the veth; it only
// registers the endpoint and attaches the datapath).
package cni

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// NetConf is the plugin's section of a conflist. Unknown keys are ignored,
// as the CNI spec asks.
type NetConf struct {
	types.NetConf
	// BpffsRoot is where this node's datapath is pinned.
	BpffsRoot string `json:"bpffsRoot,omitempty"`
	// MTU of the pod interface in primary mode; 0 picks the node's (see podMTU).
	MTU int `json:"mtu,omitempty"`
	// LogLevel of the plugin's stderr: debug, info, warn (default), error.
	LogLevel string `json:"logLevel,omitempty"`
	// HostPath keeps every pod of this network on the host stack path:
	// for shaping or filtering set up on the host veth outside CNI's view.
	HostPath bool `json:"hostPath,omitempty"`
	// AttachMode picks the attach backend: auto (tcx where the kernel has
	// it, 6.6 and later, tc otherwise), tcx or tc. The node's first load
	// records it; a conflicting one is refused.
	AttachMode string `json:"attachMode,omitempty"`
	// RuntimeConfig carries the runtime's per-pod settings; with the
	// "bandwidth" capability declared, a shaped pod is kept on the host
	// path so that the bandwidth plugin's qdiscs see its traffic.
	RuntimeConfig struct {
		Bandwidth *struct {
			IngressRate int64 `json:"ingressRate,omitempty"`
			EgressRate  int64 `json:"egressRate,omitempty"`
			EgressBurst int64 `json:"egressBurst,omitempty"`
		} `json:"bandwidth,omitempty"`
	} `json:"runtimeConfig,omitempty"`

	attachMode datapath.AttachMode
}

// shapedEgress reports whether the bandwidth plugin will shape what the pod
// sends: it then adds its own ingress qdisc to the host veth, which in tc
// mode must find that slot free (datapath.AttachYielding).
func (c *NetConf) shapedEgress() bool {
	bw := c.RuntimeConfig.Bandwidth
	return bw != nil && bw.EgressRate > 0 && bw.EgressBurst > 0
}

// hostPath reports whether this pod's traffic must cross its veth's qdiscs.
func (c *NetConf) hostPath() bool {
	bw := c.RuntimeConfig.Bandwidth
	return c.HostPath || bw != nil && (bw.IngressRate > 0 || bw.EgressRate > 0)
}

// primary reports whether the plugin owns the veth and the addresses.
func (c *NetConf) primary() bool { return c.IPAM.Type != "" }

func parseConf(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot parse network configuration: is it valid JSON?", err.Error())
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot parse prevResult", err.Error())
	}
	if conf.BpffsRoot == "" {
		conf.BpffsRoot = datapath.DefaultRoot
	}
	if !filepath.IsAbs(conf.BpffsRoot) {
		return nil, invalidConf("bpffsRoot %q must be an absolute path", conf.BpffsRoot)
	}
	if conf.MTU != 0 && (conf.MTU < 576 || conf.MTU > 65535) {
		return nil, invalidConf("mtu %d is out of range: use 576..65535, or leave it out to derive it from the node", conf.MTU)
	}
	var err error
	if conf.attachMode, err = datapath.ParseAttachMode(conf.AttachMode); err != nil {
		return nil, invalidConf("attachMode: %v", err)
	}
	if _, err := parseLevel(conf.LogLevel); err != nil {
		return nil, invalidConf("%v", err)
	}
	return conf, nil
}

// The plugin's verbs, as skel.PluginMainFuncs calls them: each parses the
// configuration once, through withConf, and hands it to its implementation.

// Add is the ADD verb.
func Add(args *skel.CmdArgs) error { return withConf(args, add) }

// Check is the CHECK verb: the interface, its addresses and routes, the
// endpoint entries and the attachment must all be as ADD left them.
func Check(args *skel.CmdArgs) error { return withConf(args, check) }

// Del is the DEL verb. It succeeds however far ADD got, however often it is
// called, and when the pod's namespace is already gone.
func Del(args *skel.CmdArgs) error { return withConf(args, del) }

// GC is the GC verb (CNI 1.1): it removes what patchcord holds for any
// attachment not in cni.dev/valid-attachments, then lets IPAM do the same.
func GC(args *skel.CmdArgs) error { return withConf(args, gc) }

// Status is the STATUS verb (CNI 1.1): ready when the datapath can be
// loaded (or is) under the configured root.
func Status(args *skel.CmdArgs) error { return withConf(args, status) }

// withConf runs a verb on the parsed network configuration. Every verb
// starts there; a configuration that does not parse fails the verb with
// parseConf's error, as the runtime should see it.
func withConf(args *skel.CmdArgs, verb func(*skel.CmdArgs, *NetConf) error) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	return verb(args, conf)
}

func invalidConf(format string, args ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, "invalid patchcord-cni configuration: "+fmt.Sprintf(format, args...), "")
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "", "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logLevel %q is not one of debug, info, warn, error", s)
}

// logger writes to stderr only: stdout carries the CNI result.
func logger(conf *NetConf, w io.Writer) *slog.Logger {
	level, _ := parseLevel(conf.LogLevel)
	if w == nil {
		w = os.Stderr
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).With("plugin", "patchcord-cni")
}
