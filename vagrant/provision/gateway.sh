#!/usr/bin/env bash
# The gateway VM: build Portcullis from /portcullis and run it on eth1 (ext) and eth2 (int) as a
# systemd service with the edge policies. Idempotent: re-running rebuilds and restarts.
source /portcullis/vagrant/provision/lib.sh
QUEUES="${PORTCULLIS_QUEUES:-2}"
TOPOLOGY="${PORTCULLIS_TOPOLOGY:-edge}"

step "build dependencies"
/portcullis/scripts/deps 2>/dev/null || apt_install libelf-dev zlib1g-dev pkg-config clang llvm m4 gcc-multilib libpcap-dev
if ! command -v cargo >/dev/null && [[ ! -x /root/.cargo/bin/cargo ]]; then
  step "install the Rust toolchain (rustup)"
  apt_install rustup || true
  if command -v rustup >/dev/null; then rustup default stable; else
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal; fi
fi
export PATH="/root/.cargo/bin:$PATH"

step "build portcullis (release)"
cd /portcullis && cargo build --release --bin portcullis
install -m 0755 target/release/portcullis /usr/local/bin/portcullis

step "prepare ext/int NICs (eth1, eth2): up, no addresses, ${QUEUES} queue(s), offloads that AF_XDP cannot carry off"
for ifc in eth1 eth2; do
  ip link set dev "$ifc" up
  ip addr flush dev "$ifc"
  sysctl -qw "net.ipv6.conf.$ifc.disable_ipv6=1"
  ethtool -L "$ifc" combined "$QUEUES" 2>/dev/null || echo "  $ifc: cannot set $QUEUES channels (driver limit); check 'ethtool -l $ifc'"
  ethtool -K "$ifc" gro off lro off 2>/dev/null || true
done

step "install config and policies in /etc/portcullis"
mkdir -p /etc/portcullis/policies
cp /portcullis/vagrant/files/gateway.yaml /etc/portcullis/gateway.yaml
sed -i "s/^queues: .*/queues: ${QUEUES}/" /etc/portcullis/gateway.yaml
cp /portcullis/vagrant/files/policies/*.yaml /etc/portcullis/policies/
portcullis check --config /etc/portcullis/gateway.yaml

step "systemd unit portcullis.service"
cat > /etc/systemd/system/portcullis.service <<'UNIT'
[Unit]
Description=Portcullis AF_XDP edge gateway
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/local/bin/portcullis run --config /etc/portcullis/gateway.yaml
ExecReload=/bin/kill -HUP $MAINPID
LimitMEMLOCK=infinity
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now portcullis.service
systemctl restart portcullis.service
sleep 2
systemctl --no-pager --lines=5 status portcullis.service || true
step "gateway ready (${TOPOLOGY}): portcullis stats"
portcullis stats || true
