#!/usr/bin/env bash
# w1, w2: import the patchcord image cp1 built, then join. Run again to
# re-import a rebuilt image.
set -euo pipefail
: "${NODE_IP:?}" "${CP_IP:?}" "${TOKEN:?}"

curl -fsS --retry 30 --retry-delay 10 --retry-all-errors -o /tmp/patchcord.tar "http://${CP_IP}:8000/patchcord.tar"
ctr -n k8s.io images import /tmp/patchcord.tar
rm -f /tmp/patchcord.tar

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
  cat >/root/kubeadm-join.yaml <<EOT
apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: ${CP_IP}:6443
    token: "${TOKEN}"
    unsafeSkipCAVerification: true
EOT
  kubeadm join --config /root/kubeadm-join.yaml
fi
