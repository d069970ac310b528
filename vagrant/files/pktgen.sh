#!/usr/bin/env bash
# Kernel pktgen through the gateway: UDP to the sink (or a k8s node) on the discard port.
# Usage: portcullis-pktgen DST_IP DST_MAC [SECONDS] [PKT_SIZE] [THREADS]
set -euo pipefail
DST=${1:?destination IP}; MAC=${2:?destination MAC}; SECS=${3:-10}; SIZE=${4:-64}; THREADS=${5:-1}
DEV=eth1
[[ -d /proc/net/pktgen ]] || { echo "pktgen not loaded (modprobe pktgen); or use portcullis-bench gen" >&2; exit 1; }
pg() { echo "$2" > "/proc/net/pktgen/$1"; }
for t in $(seq 0 $((THREADS - 1))); do
  pg "kpktgend_$t" "rem_device_all"
  pg "kpktgend_$t" "add_device $DEV@$t"
  f="$DEV@$t"
  pg "$f" "count 0"; pg "$f" "pkt_size $SIZE"; pg "$f" "delay 0"
  pg "$f" "dst $DST"; pg "$f" "dst_mac $MAC"; pg "$f" "udp_dst_min 9"; pg "$f" "udp_dst_max 9"
  pg "$f" "udp_src_min 1024"; pg "$f" "udp_src_max 65000"; pg "$f" "flag UDPSRC_RND"
  pg "$f" "queue_map_min $t"; pg "$f" "queue_map_max $t"
done
echo "pktgen: $THREADS thread(s), ${SIZE}B to $DST ($MAC) for ${SECS}s"
timeout --signal=INT "$SECS" bash -c 'echo start > /proc/net/pktgen/pgctrl' || true
for t in $(seq 0 $((THREADS - 1))); do grep -E "pps|errors" "/proc/net/pktgen/$DEV@$t" | sed "s/^/  [$t] /"; done
