package kubecluster

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

// Cluster is a whole lab cluster with patchcord as its pod network.
type Cluster struct {
	*ControlPlane
	Workers []*Worker
}

// NewCluster brings up a cluster: the control plane and its controllers
// in cpNode, a Worker (kube-proxy in proxyMode) in each of workers, then
// patchcord installed as README tells an operator (deploy/'s manifests, the
// DaemonSet's pods from the image built here), then CoreDNS. It returns
// once every node is Ready and CoreDNS answers. Everything runs until life
// ends or the lab closes.
func NewCluster(t *testing.T, life context.Context, cpNode *lab.Node, workers []*lab.Node, proxyMode string) *Cluster {
	t.Helper()
	cp := Start(t, life, cpNode)
	cp.StartControllers(t, life)
	images := BuildImages(t, cpNode.Lab.Dir, e2e.BinDir(), e2e.CNIPath(t))
	c := &Cluster{ControlPlane: cp}
	var names []string
	for _, n := range workers {
		w := cp.StartWorker(t, life, n, WorkerOptions{ProxyMode: proxyMode, Images: images, Crictl: e2e.Crictl(t)})
		c.Workers = append(c.Workers, w)
		names = append(names, w.Name)
	}
	ctx, cancel := context.WithTimeout(life, 3*time.Minute)
	defer cancel()
	for _, f := range []string{"rbac.yaml", "configmap.yaml", "daemonset.yaml"} {
		cp.Apply(t, ctx, filepath.Join(e2e.RepoDir(), "deploy", f))
	}
	if err := cp.WaitNodesReady(ctx, names...); err != nil {
		t.Fatal(err)
	}
	cp.StartDNS(t, life)
	return c
}
