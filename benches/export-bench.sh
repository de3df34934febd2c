#!/bin/bash
# Copy-path benchmark of a zc-hostd export against DPDK's vhost PMD, side by
# side in one run (issue 3): testpmd virtio_user txonly into
#   (zc)   a zc-hostd export without tx (packets counted and dropped), and
#   (dpdk) testpmd's vhost PMD in rxonly,
# for 64, 512 and 1500-byte packets. Two busy threads, one per core: the
# frontend's forwarding lcore on core 0, the backend (zc poll thread or
# vhost PMD forwarding lcore) on core 1. The rate is the frontend's Tx-pps
# (packets the backend took), the same meter for both; each run's median of
# per-second samples (first two dropped), then the median of RUNS runs.
# Needs root, dpdk-testpmd and ~1.2 GiB of 2 MiB hugepages (it reserves them).
#   benches/export-bench.sh              # RUNS=3 SECONDS_PER_RUN=8
#   RUNS=5 SIZES="64 1500" benches/export-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECONDS_PER_RUN:-8}
SIZES=${SIZES:-"64 512 1500"}
TMP=$(mktemp -d /tmp/zc-export-bench.XXXXXX)
HOSTD_PID=
cleanup() {
    [ -n "$HOSTD_PID" ] && kill "$HOSTD_PID" 2>/dev/null && wait "$HOSTD_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "export-bench: needs root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "export-bench: dpdk-testpmd missing (apt-get install dpdk)" >&2; exit 1; }
pages=$(cat /proc/sys/vm/nr_hugepages)
[ "$pages" -ge 1024 ] || echo 1024 > /proc/sys/vm/nr_hugepages
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
cargo build --release -q -p zc-host --bin zc-hostd
HOSTD=target/release/zc-hostd

# Median of the numbers on stdin.
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# Runs the frontend for SECS seconds against socket $1 with packets of $2
# bytes; prints the median Tx-pps.
frontend() {
    local log=$TMP/fe.log
    timeout -s INT $((SECS + 3)) dpdk-testpmd --lcores '0@1,1@0' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcbfe --single-file-segments \
        --vdev "virtio_user0,path=$1,queues=1" -- \
        --forward-mode=txonly --txpkts "$2" --nb-cores 1 --stats-period 1 -a \
        >"$log" 2>&1 || true
    grep -a 'Tx-pps:' "$log" | awk '{print $2}' | tail -n +3 | head -n "$((SECS - 1))" | median
}

zc_run() {
    local sock=$TMP/zc.sock
    rm -f "$sock"
    "$HOSTD" -c 4242 -q 2 --buffers 16384 --queue-len 1024 --run-dir "$TMP/run" \
        --export "$sock,rx=0" -g 1 >"$TMP/hostd.log" 2>&1 &
    HOSTD_PID=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    frontend "$sock" "$1"
    kill "$HOSTD_PID"; wait "$HOSTD_PID" 2>/dev/null || true
    HOSTD_PID=
}

dpdk_run() {
    local sock=$TMP/vh.sock
    rm -f "$sock"
    timeout -s INT $((SECS + 8)) dpdk-testpmd --lcores '0@0,1@1' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcbbe --vdev "net_vhost0,iface=$sock,queues=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 -a >"$TMP/be.log" 2>&1 &
    local be=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    frontend "$sock" "$1"
    kill -INT "$be" 2>/dev/null; wait "$be" 2>/dev/null || true
}

printf '%-8s %14s %14s %8s\n' size "zc Mpps" "dpdk Mpps" ratio
for size in $SIZES; do
    zc=(); dp=()
    for _ in $(seq "$RUNS"); do
        zc+=("$(zc_run "$size")")
        dp+=("$(dpdk_run "$size")")
    done
    zm=$(printf '%s\n' "${zc[@]}" | median)
    dm=$(printf '%s\n' "${dp[@]}" | median)
    awk -v s="$size" -v z="$zm" -v d="$dm" -v zr="${zc[*]}" -v dr="${dp[*]}" 'BEGIN {
        printf "%-8s %14.2f %14.2f %8.2f   (runs pps: zc %s | dpdk %s)\n", s " B", z/1e6, d/1e6, (d > 0 ? z/d : 0), zr, dr }'
done
