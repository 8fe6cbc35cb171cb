// Nodes files for labs, in pkg/nodes' own format.
package e2e

import (
	"testing"

	"github.com/patchcord/patchcord/internal/lab"
	"github.com/patchcord/patchcord/pkg/nodes"
)

// EntryOf is n's entry in a nodes file.
func EntryOf(n *lab.Node) nodes.Entry {
	return nodes.Entry{Name: n.NetNS, NodeIP: n.IP.String(), PodCIDR: n.PodCIDR.String()}
}

// WriteNodes writes a nodes file atomically (as config management does), so
// an agent never reads half of it.
func WriteNodes(t *testing.T, path string, entries ...nodes.Entry) {
	t.Helper()
	if err := nodes.WriteFile(path, entries); err != nil {
		t.Fatal(err)
	}
}
