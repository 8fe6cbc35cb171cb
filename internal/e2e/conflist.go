// Conflists of the reference plugins the labs compare patchcord with.
package e2e

import (
	"encoding/json"

	"github.com/patchcord/patchcord/internal/lab"
)

// BridgeConflist is the reference bridge plugin as Flannel's CNI plugin
// configures it: cni0 as the pods' default gateway, hairpin on, no
// masquerade, host-local over the node's pod CIDR.
func BridgeConflist(n *lab.Node, name string, mtu int) []byte {
	return Conflist(name, map[string]any{
		"type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true,
		"hairpinMode": true, "ipMasq": false, "mtu": mtu, "ipam": HostLocal(n),
	})
}

// PTPConflist is the reference ptp plugin, no masquerade.
func PTPConflist(n *lab.Node, name string, mtu int) []byte {
	ipam := HostLocal(n)
	ipam["routes"] = []map[string]string{{"dst": "0.0.0.0/0"}}
	return Conflist(name, map[string]any{"type": "ptp", "ipMasq": false, "mtu": mtu, "ipam": ipam})
}

// HostLocal is host-local IPAM over n's pod CIDR, leases in n's IPAM dir.
func HostLocal(n *lab.Node) map[string]any {
	return map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": n.PodCIDR.String()}}},
		"dataDir": n.IPAMDir,
	}
}

// Conflist is a CNI 1.1.0 conflist of plugins.
func Conflist(name string, plugins ...any) []byte {
	b, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": name, "plugins": plugins})
	if err != nil {
		panic(err) // maps of strings, numbers and bools: cannot fail
	}
	return b
}
