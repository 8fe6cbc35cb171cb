#!/usr/bin/env bash
# Every VM: containerd, kubelet, kubeadm and kubectl from pkgs.k8s.io, and
# what kubeadm checks for. Safe to run again.
set -euo pipefail
: "${NODE_IP:?}" "${K8S_MINOR:?}"
export DEBIAN_FRONTEND=noninteractive

swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab

cat >/etc/modules-load.d/k8s.conf <<EOT
overlay
br_netfilter
EOT
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/k8s.conf <<EOT
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
EOT
sysctl --system >/dev/null

apt-get update -qq
apt-get install -y -qq containerd iptables curl gpg ca-certificates apt-transport-https >/dev/null

# containerd: systemd cgroups (as kubelet), and CNI where the DaemonSet's
# init step installs it, whatever the packaged default.
mkdir -p /etc/containerd
if [ ! -f /etc/containerd/.patchcord ]; then
  containerd config default >/etc/containerd/config.toml
  sed -i -E \
    -e 's/^(\s*)SystemdCgroup = false/\1SystemdCgroup = true/' \
    -e 's#^(\s*)bin_dir = .*#\1bin_dir = "/opt/cni/bin"#' \
    -e 's#^(\s*)bin_dirs = .*#\1bin_dirs = ["/opt/cni/bin"]#' \
    -e 's#^(\s*)conf_dir = .*#\1conf_dir = "/etc/cni/net.d"#' \
    /etc/containerd/config.toml
  touch /etc/containerd/.patchcord
fi
systemctl restart containerd

if [ ! -f /etc/apt/sources.list.d/kubernetes.list ]; then
  mkdir -p /etc/apt/keyrings
  curl -fsSL "https://pkgs.k8s.io/core:/stable:/${K8S_MINOR}/deb/Release.key" |
    gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
  echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/${K8S_MINOR}/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
  apt-get update -qq
fi
apt-get install -y -qq kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# The private network is the cluster's: kubelet must not pick the NAT
# interface, which has the same address on every VM. patchcord takes the
# InternalIP as the tunnel endpoint and the interface holding it as uplink.
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" >/etc/default/kubelet
systemctl enable --now kubelet
