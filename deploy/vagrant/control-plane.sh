#!/usr/bin/env bash
# cp1: kubeadm init (kube-proxy in iptables mode), the patchcord image built
# from /vagrant and served to the workers, and the DaemonSet from deploy/.
# Run again (`vagrant rsync cp1 && vagrant provision cp1 --provision-with
# cluster`) to rebuild the image and re-apply the manifests.
set -euo pipefail
: "${NODE_IP:?}" "${POD_CIDR:?}" "${TOKEN:?}"
export DEBIAN_FRONTEND=noninteractive
export KUBECONFIG=/etc/kubernetes/admin.conf
IMAGE=localhost/patchcord:dev
SERVE=/var/lib/patchcord-image

if [ ! -f /etc/kubernetes/admin.conf ]; then
  cat >/root/kubeadm.yaml <<EOT
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
  - token: "${TOKEN}"
    ttl: "0s"
localAPIEndpoint:
  advertiseAddress: ${NODE_IP}
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
networking:
  podSubnet: ${POD_CIDR}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
EOT
  kubeadm init --config /root/kubeadm.yaml
fi
mkdir -p /root/.kube /home/vagrant/.kube
cp /etc/kubernetes/admin.conf /root/.kube/config
cp /etc/kubernetes/admin.conf /home/vagrant/.kube/config
chown -R vagrant: /home/vagrant/.kube

# The image: built here with buildah (from deploy/Containerfile), imported
# into containerd, and served over HTTP for the workers to import.
apt-get install -y -qq buildah >/dev/null
buildah build --layers -f /vagrant/deploy/Containerfile -t "$IMAGE" /vagrant
mkdir -p "$SERVE"
rm -f "$SERVE/patchcord.tar"
buildah push "$IMAGE" "docker-archive:$SERVE/patchcord.tar:$IMAGE"
ctr -n k8s.io images import "$SERVE/patchcord.tar"
systemctl stop patchcord-image 2>/dev/null || true
systemd-run --unit patchcord-image --collect python3 -m http.server 8000 --bind "$NODE_IP" --directory "$SERVE"

kubectl apply -k /vagrant/deploy
kubectl -n kube-system rollout restart daemonset/patchcord
kubectl -n kube-system rollout status daemonset/patchcord --timeout=5m
kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=5m
kubectl get nodes -o wide
