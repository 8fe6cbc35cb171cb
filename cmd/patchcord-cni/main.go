// Command patchcord-cni is the CNI plugin a container runtime calls (conflist
// type "patchcord-cni"), as the first plugin of a chain or after ptp/bridge.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/patchcord/patchcord/pkg/cni"
)

func init() {
	// Namespace switches apply to one OS thread; keep main on its own.
	runtime.LockOSThread()
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cni.Add,
		Del:    cni.Del,
		Check:  cni.Check,
		GC:     cni.GC,
		Status: cni.Status,
	}, version.PluginSupports("0.4.0", "1.0.0", "1.1.0"), "patchcord-cni: eBPF pod datapath (bpf_redirect_peer, VXLAN in TC)")
}
