#!/usr/bin/env bash
# The sink VM (bench topology): counts what crosses the gateway with an XDP drop on eth1.
source /portcullis/vagrant/provision/lib.sh
apt_install xdp-tools
step "xdp-filter in drop-all mode on eth1 (counts frames at the driver)"
xdp-filter load --mode native eth1 2>/dev/null || xdp-filter load --mode skb eth1 || true
step "sink ready: watch with 'ip -s link show eth1'"
