#!/bin/bash
# Guest-driver benchmark (issue 4): the zc guest driver over the vhost-user
# transport against a zc-hostd export, side by side with DPDK in one run,
# for 64, 512, 1024 and 1500-byte packets:
#   (tx)   guest-driver zsend --vhost-user -> export tx=1 -> host zcount.
#          The export exchanges every guest buffer for an empty one and the
#          host consumer takes the packet and returns an empty buffer: the
#          work a real consumer causes. (An export without tx only counts
#          and drops: it does not exchange, so it is not used as the sink.)
#          Three busy threads on two cores: the export's poll thread alone on
#          core 1, zsend and zcount sharing core 0 (measured best: sharing
#          the poll thread's core instead costs 6x). Rate: zcount's pps.
#   (rx)   host zsend -> export rx=0 -> guest-driver zcount --vhost-user,
#          three busy threads: the poll thread on core 1, zsend and zcount
#          sharing core 0. Rate: the guest zcount's pps.
#   (dpdk) testpmd virtio_user txonly -> testpmd vhost PMD rxonly (DESIGN.md),
#          two busy threads, one per core (copy path). Rate: the frontend's
#          Tx-pps (what the backend took), median of per-second samples.
# Each figure is the median of RUNS runs of SECS seconds.
# Needs root, dpdk-testpmd (apt-get install dpdk-dev) and ~1.2 GiB of 2 MiB
# hugepages (reserved here if fewer).
#   benches/guest-vhost.sh                       # RUNS=3 SECS=5
#   RUNS=1 SIZES="64 1500" benches/guest-vhost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
SIZES=${SIZES:-"64 512 1024 1500"}
CLUSTER=${CLUSTER:-4343}
TMP=$(mktemp -d /tmp/zc-guest-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "guest-vhost: needs root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "guest-vhost: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
[ "$(cat /proc/sys/vm/nr_hugepages)" -ge 1100 ] || echo 1100 > /proc/sys/vm/nr_hugepages
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
[ -n "${NO_BUILD:-}" ] || cargo build --release -q --workspace
B=target/release
export ZC_RUN_DIR=$TMP/run

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
json_pps() { sed -n 's/.*"pps":\([0-9.e+]*\).*/\1/p' | tail -1; }

start_hostd() {
    rm -f "$TMP/vm.sock"
    "$B/zc-hostd" -c "$CLUSTER" -q 2 --buffers 16384 --export "$TMP/vm.sock,rx=0,tx=1" \
        -g 1 >"$TMP/hostd.log" 2>&1 &
    HOSTD=$!
    PIDS+=("$HOSTD")
    for _ in $(seq 200); do [ -S "$TMP/vm.sock" ] && break; sleep 0.05; done
}
stop_hostd() { kill "$HOSTD" 2>/dev/null; wait "$HOSTD" 2>/dev/null || true; }

# Guest zsend (core 0) -> export tx=1 -> host zcount (core 1).
zc_tx() {
    start_hostd
    "$B/zcount" -i "zc:$CLUSTER@1" -t "$SECS" -g 0 --json >"$TMP/c.json" 2>/dev/null &
    local c=$!
    sleep 0.3
    "$B/zsend" -i "zc:$CLUSTER@1" --vhost-user "$TMP/vm.sock" -l "$1" -g 0 >/dev/null 2>&1 &
    local s=$!
    wait "$c" || true
    kill -INT "$s" 2>/dev/null; wait "$s" 2>/dev/null || true
    "$B/zc-hostd" -c "$CLUSTER" stats >>"$TMP/stats.log" 2>&1 || true
    stop_hostd
    json_pps <"$TMP/c.json"
}

# Host zsend (core 0) -> export rx=0 -> guest zcount (core 1).
zc_rx() {
    start_hostd
    "$B/zcount" -i "zc:$CLUSTER@0" --vhost-user "$TMP/vm.sock" -t "$SECS" -g 0 --json \
        >"$TMP/c.json" 2>/dev/null &
    local c=$!
    sleep 0.3
    "$B/zsend" -i "zc:$CLUSTER@0" -l "$1" -g 0 >/dev/null 2>&1 &
    local s=$!
    wait "$c" || true
    kill -INT "$s" 2>/dev/null; wait "$s" 2>/dev/null || true
    "$B/zc-hostd" -c "$CLUSTER" stats >>"$TMP/stats.log" 2>&1 || true
    stop_hostd
    json_pps <"$TMP/c.json"
}

dpdk() {
    local sock=$TMP/vh.sock
    rm -f "$sock"
    timeout -s INT $((SECS + 8)) dpdk-testpmd --lcores '0@0,1@1' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcgbe --vdev "net_vhost0,iface=$sock,queues=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 -a >"$TMP/be.log" 2>&1 &
    local be=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    timeout -s INT $((SECS + 3)) dpdk-testpmd --lcores '0@1,1@0' -n 1 --no-pci --socket-mem 512 \
        --file-prefix zcgfe --single-file-segments \
        --vdev "virtio_user0,path=$sock,queues=1" -- \
        --forward-mode=txonly --txpkts "$1" --nb-cores 1 --stats-period 1 -a \
        >"$TMP/fe.log" 2>&1 || true
    kill -INT "$be" 2>/dev/null; wait "$be" 2>/dev/null || true
    grep -a 'Tx-pps:' "$TMP/fe.log" | awk '{print $2}' | tail -n +3 | head -n "$((SECS - 1))" | median
}

printf '%-7s %12s %12s %12s %10s %10s\n' size "zc tx Mpps" "zc rx Mpps" "dpdk Mpps" "tx/dpdk" "rx/dpdk"
for size in $SIZES; do
    tx=(); rx=(); dp=()
    for _ in $(seq "$RUNS"); do
        tx+=("$(zc_tx "$size")")
        rx+=("$(zc_rx "$size")")
        dp+=("$(dpdk "$size")")
    done
    t=$(printf '%s\n' "${tx[@]}" | median)
    r=$(printf '%s\n' "${rx[@]}" | median)
    d=$(printf '%s\n' "${dp[@]}" | median)
    awk -v s="$size" -v t="$t" -v r="$r" -v d="$d" -v tr="${tx[*]}" -v rr="${rx[*]}" -v dr="${dp[*]}" 'BEGIN {
        printf "%-7s %12.2f %12.2f %12.2f %10.2f %10.2f   (runs pps: tx %s | rx %s | dpdk %s)\n",
            s " B", t/1e6, r/1e6, d/1e6, (d > 0 ? t/d : 0), (d > 0 ? r/d : 0), tr, rr, dr }'
done
# Proof of the path taken: every zc run's export counters (copied must be 0).
echo "export counters after each zc run (copied = 0: every packet was exchanged):"
grep '^export' "$TMP/stats.log" | sed 's/^/  /'
