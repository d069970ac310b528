#!/usr/bin/env bash
# Every VM: base tools, bpffs, and a kernel that keeps forwarding off (the gateway forwards).
source /portcullis/vagrant/provision/lib.sh
apt_install iproute2 ethtool curl ca-certificates tcpdump
step "mount bpffs"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
grep -q ' /sys/fs/bpf ' /etc/fstab || echo 'bpf /sys/fs/bpf bpf defaults 0 0' >> /etc/fstab
step "common provisioning done"
