#!/usr/bin/env bash
# Demo workloads on the cluster: one web Deployment behind a NodePort with
# externalTrafficPolicy Cluster (30080), one with Local (30081), and a LoadBalancer (k3s
# ServiceLB), plus the Portcullis CRDs and a NetworkPolicy admitting the lab client network.
source /portcullis/vagrant/provision/lib.sh
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
step "wait for the API"
for _ in $(seq 60); do kubectl get nodes >/dev/null 2>&1 && break; sleep 2; done
step "apply Portcullis CRDs and deploy manifests"
kubectl apply -f /portcullis/configs/deploy/00-crd-gatewaypolicy.yaml -f /portcullis/configs/deploy/01-crd-securitygroup.yaml
[[ -d /portcullis/configs/deploy ]] && kubectl apply -f /portcullis/configs/deploy/ || echo "  configs/deploy/ not present yet (live Kubernetes source)"
step "apply demo Services"
kubectl apply -f /portcullis/vagrant/files/demo-services.yaml
kubectl get svc -n demo -o wide
step "demo services ready"
