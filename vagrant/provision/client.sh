#!/usr/bin/env bash
# The client VM: kernel pktgen for throughput runs, plus a second client address for the
# allowed/denied client-IP demo (10.77.0.10 is allowed, 10.77.0.11 is not).
source /portcullis/vagrant/provision/lib.sh
apt_install netcat-openbsd "linux-modules-extra-$(uname -r)" 2>/dev/null || apt_install netcat-openbsd
step "load kernel pktgen"
modprobe pktgen && ls /proc/net/pktgen/ || echo "  pktgen is not available in this kernel; use portcullis-bench gen instead"
step "add the denied client address 10.77.0.11/24 on eth1"
ip addr show dev eth1 | grep -q 10.77.0.11/ || ip addr add 10.77.0.11/24 dev eth1
install -m 0755 /portcullis/vagrant/files/pktgen.sh /usr/local/bin/portcullis-pktgen
step "client ready"
