// Flannel compatibility, the writing half: the agent publishes this node's
// VTEP in the Node annotations Flannel's vxlan backend writes and reads, and
// keeps it published. The node source (pkg/nodes) only reads them.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/patchcord/patchcord/pkg/nodes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// VTEP is this node's published VTEP (Config.VTEP).
type VTEP struct {
	kube *nodes.Kube
	log  *slog.Logger
	// want holds the annotations written, to write them again if they go
	// missing (a Node deleted and re-registered by kubelet). from is the
	// resourceVersion of the object last patched: the informer may still
	// hold it, and it needs no second patch.
	want map[string]string
	from string
}

// PublishVTEP writes this node's (kube.NodeName) VTEP into Flannel's
// annotations, so that Flannel nodes send this node's pod traffic to nodeIP
// with inner destination mac, over VNI vni. A node whose annotations
// already say so is not patched: restarts cost no write.
func PublishVTEP(ctx context.Context, kube *nodes.Kube, mac net.HardwareAddr, vni int, nodeIP netip.Addr) (*VTEP, error) {
	name := kube.NodeName
	switch {
	case name == "":
		return nil, errors.New("publish VTEP: --node-name: required (or set NODE_NAME)")
	case len(mac) != 6:
		return nil, fmt.Errorf("publish VTEP on node %s: MAC %q is not 6 bytes", name, mac)
	case vni < 1 || vni > 1<<24-1:
		return nil, fmt.Errorf("publish VTEP on node %s: VNI %d is out of range 1..16777215", name, vni)
	case !nodeIP.Is4():
		return nil, fmt.Errorf("publish VTEP on node %s: %q is not an IPv4 address", name, nodeIP)
	}
	data, err := json.Marshal(nodes.FlannelBackend{VNI: vni, VtepMAC: mac.String()})
	if err != nil {
		return nil, fmt.Errorf("publish VTEP on node %s: %w", name, err)
	}
	v := &VTEP{kube: kube, log: kube.Log, want: map[string]string{
		nodes.FlannelBackendData:       string(data),
		nodes.FlannelBackendType:       "vxlan",
		nodes.FlannelPublicIP:          nodeIP.String(),
		nodes.FlannelKubeSubnetManager: "true",
	}}
	if v.log == nil {
		v.log = slog.New(slog.DiscardHandler)
	}
	obj, err := kube.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("publish VTEP: get node %s: %w", name, err)
	}
	if err := v.patch(ctx, obj); err != nil {
		return nil, err
	}
	return v, nil
}

// patch writes the annotations into obj's node unless they are there.
func (v *VTEP) patch(ctx context.Context, obj *corev1.Node) error {
	name := v.kube.NodeName
	same := true
	for key, val := range v.want {
		same = same && obj.Annotations[key] == val
	}
	if same {
		v.log.Debug("VTEP already published", "node", name, "backend_data", v.want[nodes.FlannelBackendData])
		return nil
	}
	// A merge patch touches these keys only: other annotations stay, and
	// there is no read-modify-write race with kubelet's status updates.
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": v.want}})
	if err != nil {
		return fmt.Errorf("publish VTEP on node %s: %w", name, err)
	}
	if _, err := v.kube.Client.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "patchcord"}); err != nil {
		return fmt.Errorf("publish VTEP: patch annotations of node %s: %w", name, err)
	}
	v.from = obj.ResourceVersion
	v.log.Info("published VTEP in Flannel's annotations", "node", name, "backend_data", v.want[nodes.FlannelBackendData], "public_ip", v.want[nodes.FlannelPublicIP])
	return nil
}

// keep publishes the VTEP again when this node's annotations lost it, e.g.
// after its Node object was deleted and kubelet registered it anew: Flannel
// nodes would stop sending to it otherwise. The agent calls it with every
// node set; it reads the node source's cache, so a set costs no request.
func (v *VTEP) keep(ctx context.Context) {
	obj := v.kube.Cached(v.kube.NodeName)
	if obj == nil || obj.ResourceVersion == v.from {
		return
	}
	if err := v.patch(ctx, obj); err != nil {
		// The next set tries again.
		v.log.Error("keep VTEP published", "err", err)
	}
}
