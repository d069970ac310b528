#!/usr/bin/env bash
# A Kubernetes node with k3s (server or agent), using the int network address as its node IP.
source /portcullis/vagrant/provision/lib.sh
: "${K3S_ROLE:?server or agent}" "${NODE_IP:?}"
if systemctl is-active --quiet k3s || systemctl is-active --quiet k3s-agent; then
  step "k3s already running ($K3S_ROLE)"
  exit 0
fi
step "install k3s ($K3S_ROLE) with node IP $NODE_IP"
export INSTALL_K3S_SKIP_SELINUX_RPM=true
if [[ $K3S_ROLE == server ]]; then
  curl -sfL https://get.k3s.io | INSTALL_K3S_EXEC="server --node-ip $NODE_IP --flannel-iface eth1 --disable traefik --write-kubeconfig-mode 644" K3S_TOKEN=portcullis-lab sh -
  cp /etc/rancher/k3s/k3s.yaml /portcullis/vagrant/kubeconfig 2>/dev/null || true
else
  : "${K3S_SERVER_IP:?}"
  curl -sfL https://get.k3s.io | K3S_URL="https://$K3S_SERVER_IP:6443" K3S_TOKEN=portcullis-lab INSTALL_K3S_EXEC="agent --node-ip $NODE_IP --flannel-iface eth1" sh -
fi
step "k3s $K3S_ROLE ready"
