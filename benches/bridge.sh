#!/bin/bash
# Copy rate across a trust boundary: zbridge copying every packet from a
# queue of one cluster into a queue of another, next to DPDK's vhost copy
# path (the peer of benches/export-bench.sh), in one run, for 64 and 1500 B.
#   (zc)   zsend -> zc:4311@0 -> zbridge (one copy into cluster 4312's pool)
#          -> zc:4312@0 -> zcount; the two clusters are two zc-hostd.
#   (dpdk) testpmd virtio_user txonly -> testpmd vhost PMD rxonly (the vhost
#          backend copies every packet out of the frontend's memory).
# Thread-to-core layout: the copying thread has core 1 to itself in both
# (zbridge -g 1; the vhost PMD's forwarding lcore on core 1); its feeders
# share core 0 (zsend -g 0 and zcount -g 0; testpmd's txonly lcore). The
# rate is what the copier moved: zbridge's once-a-second pps, and the
# frontend's Tx-pps (packets the backend took) for DPDK. Each run's median
# of per-second samples (first two dropped), then the median of RUNS runs,
# zc and DPDK runs alternating.
# Needs root, dpdk-testpmd and 2 GiB of 2 MiB hugepages (it reserves them).
#   benches/bridge.sh                      # RUNS=3 SECONDS_PER_RUN=8 SIZES="64 1500"
#   RUNS=5 SIZES=64 benches/bridge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
RUNS=${RUNS:-3}
SECS=${SECONDS_PER_RUN:-8}
SIZES=${SIZES:-"64 1500"}
SRC=4311
DST=4312
bench_setup bridge 1024
mkdir -p "$ZC_RUN_DIR"

# The per-second samples of a run (first two dropped), as their median.
samples_median() { tail -n +3 | head -n "$((SECS - 2))" | median; }

for c in $SRC $DST; do
    "$B/zc-hostd" -c "$c" -q 1 --buffers 16384 --queue-len 1024 >"$TMP/hostd-$c.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 200); do
    [ -S "$ZC_RUN_DIR/$SRC/ctl" ] && [ -S "$ZC_RUN_DIR/$DST/ctl" ] && break
    sleep 0.05
done

# One zbridge run with packets of $1 bytes; prints the median pps.
zc_run() {
    local log=$TMP/zbridge.log count send
    "$B/zcount" -i "zc:$DST@0" -g 0 >/dev/null 2>&1 &
    count=$!
    "$B/zbridge" -i "zc:$SRC@0" -o "zc:$DST@0" -g 1 -t "$SECS" --json >"$TMP/zbridge.json" 2>"$log" &
    local bridge=$!
    "$B/zsend" -i "zc:$SRC@0" -l "$1" -g 0 >/dev/null 2>&1 &
    send=$!
    wait "$bridge"
    kill -INT "$send" "$count" 2>/dev/null || true
    wait "$send" "$count" 2>/dev/null || true
    # Nothing may be dropped: every packet fits the destination's buffers.
    [ "$(json_field drops <"$TMP/zbridge.json")" = 0 ] || { echo "bridge: zbridge dropped packets: $(cat "$TMP/zbridge.json")" >&2; exit 1; }
    grep -a 'Actual Stats:' "$log" | awk '{print $3}' | samples_median
}

# The DPDK frontend for SECS seconds against socket $1, packets of $2
# bytes; prints the median Tx-pps.
frontend() {
    local log=$TMP/fe.log
    timeout -s INT $((SECS + 3)) dpdk-testpmd --lcores '0@1,1@0' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcbridgefe --single-file-segments \
        --vdev "virtio_user0,path=$1,queues=1" -- \
        --forward-mode=txonly --txpkts "$2" --nb-cores 1 --stats-period 1 -a \
        >"$log" 2>&1 || true
    grep -a 'Tx-pps:' "$log" | awk '{print $2}' | samples_median
}

dpdk_run() {
    local sock=$TMP/vh.sock
    rm -f "$sock"
    timeout -s INT $((SECS + 8)) dpdk-testpmd --lcores '0@0,1@1' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcbridgebe --vdev "net_vhost0,iface=$sock,queues=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 -a >"$TMP/be.log" 2>&1 &
    local be=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    frontend "$sock" "$1"
    kill -INT "$be" 2>/dev/null || true
    wait "$be" 2>/dev/null || true
}

echo "layout: zc: zbridge (copies) core 1 | zsend + zcount core 0;" \
    "dpdk: vhost PMD rxonly lcore (copies) core 1 | virtio_user txonly lcore core 0"
printf '%-8s %14s %14s %8s\n' size "zbridge Mpps" "dpdk Mpps" ratio
for size in $SIZES; do
    zc=(); dp=()
    for _ in $(seq "$RUNS"); do
        wait_idle
        r=$(zc_run "$size")
        zc+=("$r")
        wait_idle
        r=$(dpdk_run "$size")
        dp+=("$r")
    done
    zm=$(printf '%s\n' "${zc[@]}" | median)
    dm=$(printf '%s\n' "${dp[@]}" | median)
    awk -v s="$size" -v z="$zm" -v d="$dm" -v zr="${zc[*]}" -v dr="${dp[*]}" 'BEGIN {
        printf "%-8s %14.2f %14.2f %8.2f   (runs pps: zbridge %s | dpdk %s)\n", s " B", z/1e6, d/1e6, (d > 0 ? z/d : 0), zr, dr }'
done
