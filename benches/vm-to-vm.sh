#!/bin/bash
# VM-to-VM benchmark (issue 13): one guest's TX into another guest's RX
# through zc-hostd, side by side with DPDK's equivalent in one run, for
# 64- and 1500-byte packets (SIZES).
#   (zc)   guest-driver zsend --vhost-user A (core 0) -> export A (tx=0)
#          -> cluster queue 0 -> export B (rx=0) -> guest-driver zcount
#          --vhost-user B (core 0). Both exports are ports of ONE worker
#          (core 1): three busy threads on two cores. Zero-copy end to end:
#          the packet a sender wrote is the buffer the receiver reads.
#   (dpdk) testpmd virtio_user txonly (core 0) -> testpmd with two vhost
#          PMD ports in --forward-mode=io (core 1) -> testpmd virtio_user
#          rxonly (core 0): the same three busy threads on the same cores
#          (the copy path: the switch copies every packet twice).
# Reported: packets delivered per second at the receiver (median over the
# run's middle seconds), and loss = sent - received once everything has
# stopped (zc back-pressures instead of dropping: what the sender counts
# as sent has left its ring). Each figure is the median of RUNS runs of
# SECS seconds; the kinds alternate and each run waits (up to IDLE_WAIT s)
# for an idle machine.
# Needs root, dpdk-testpmd (apt-get install dpdk-dev), ~1.5 GiB of 2 MiB
# hugepages (reserved here if fewer).
#   benches/vm-to-vm.sh                  # RUNS=3 SECS=5 SIZES="64 1500"
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
SIZES=${SIZES:-"64 1500"}
CLUSTER=${CLUSTER:-4344}
. benches/lib.sh
bench_setup v2v 1024


# The packets counter of export $1's direction $2 (rx or tx) from `stats --json`.
counter() {
    "$B/zc-hostd" -c "$CLUSTER" stats --json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)
e = [e for e in j["exports"] if e["name"] == sys.argv[1]][0]
print(e[sys.argv[2]][sys.argv[3]])' "$1" "$2" "${3:-packets}"
}

# Prints "delivered_pps sent received exchanged_rx copied".
zc() {
    rm -f "$TMP/a.sock" "$TMP/b.sock"
    "$B/zc-hostd" -c "$CLUSTER" -q 2 --buffers 16384 --workers 1 -g 1 \
        --export "$TMP/a.sock,tx=0" --export "$TMP/b.sock,rx=0" >"$TMP/hostd.log" 2>&1 &
    local hostd=$!
    PIDS+=("$hostd")
    for _ in $(seq 200); do [ -S "$TMP/b.sock" ] && break; sleep 0.05; done
    "$B/zcount" -i "zc:$CLUSTER@0" --vhost-user "$TMP/b.sock" -g 0 --json \
        >"$TMP/rx.json" 2>"$TMP/rx.err" &
    local rx=$!
    sleep 0.5
    "$B/zsend" -i "zc:$CLUSTER@0" --vhost-user "$TMP/a.sock" -l "$1" -g 0 --json \
        >"$TMP/tx.json" 2>"$TMP/tx.err" &
    local tx=$!
    sleep 1
    local p0 t0 p1 t1
    p0=$(counter b.sock rx); t0=$(now)
    sleep "$SECS"
    p1=$(counter b.sock rx); t1=$(now)
    kill -INT "$tx" 2>/dev/null; wait "$tx" 2>/dev/null || true
    sleep 1
    kill -INT "$rx" 2>/dev/null; wait "$rx" 2>/dev/null || true
    local ex cp
    ex=$(counter b.sock rx exchanged); cp=$(counter b.sock rx copied)
    "$B/zc-hostd" -c "$CLUSTER" stats >>"$TMP/stats.log" 2>&1 || true
    kill "$hostd" 2>/dev/null; wait "$hostd" 2>/dev/null || true
    local sent got
    sent=$(json_field packets <"$TMP/tx.json"); got=$(json_field packets <"$TMP/rx.json")
    awk -v p0="$p0" -v p1="$p1" -v t0="$t0" -v t1="$t1" -v s="${sent:-0}" -v g="${got:-0}" -v ex="$ex" -v cp="$cp" \
        'BEGIN { printf "%.0f %s %s %s %s\n", (p1 - p0) / (t1 - t0), s, g, ex, cp }'
}

# testpmd's last "<key>: N" total for port 0.
total() { grep -a "$1" "$2" | tail -1 | awk -v k="$1" '{ for (i = 1; i < NF; i++) if ($i == k) { print $(i + 1); exit } }'; }

# Prints "delivered_pps sent received".
dpdk() {
    rm -f "$TMP/va.sock" "$TMP/vb.sock"
    timeout -s INT $((SECS + 12)) dpdk-testpmd --lcores '0@1,1@1' -n 1 --no-pci --socket-mem 256 \
        --file-prefix zcv2vsw --vdev "net_vhost0,iface=$TMP/va.sock,queues=1" \
        --vdev "net_vhost1,iface=$TMP/vb.sock,queues=1" -- \
        --forward-mode=io --nb-cores 1 --stats-period 1 -a >"$TMP/sw.log" 2>&1 &
    local sw=$!
    for _ in $(seq 200); do [ -S "$TMP/vb.sock" ] && break; sleep 0.05; done
    timeout -s INT $((SECS + 8)) dpdk-testpmd --lcores '0@0,1@0' -n 1 --no-pci --socket-mem 256 \
        --file-prefix zcv2vrx --single-file-segments --vdev "virtio_user0,path=$TMP/vb.sock,queues=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 -a >"$TMP/rx.log" 2>&1 &
    local rx=$!
    sleep 1
    timeout -s INT $((SECS + 3)) dpdk-testpmd --lcores '0@0,1@0' -n 1 --no-pci --socket-mem 256 \
        --file-prefix zcv2vtx --single-file-segments --vdev "virtio_user0,path=$TMP/va.sock,queues=1" -- \
        --forward-mode=txonly --txpkts "$1" --nb-cores 1 --stats-period 1 -a >"$TMP/tx.log" 2>&1 || true
    sleep 1
    kill -INT "$rx" 2>/dev/null; wait "$rx" 2>/dev/null || true
    kill -INT "$sw" 2>/dev/null; wait "$sw" 2>/dev/null || true
    local pps sent got
    pps=$(grep -a 'Rx-pps:' "$TMP/rx.log" | awk '{print $2}' | tail -n +3 | head -n "$((SECS - 1))" | median)
    sent=$(total TX-packets: "$TMP/tx.log"); got=$(total RX-packets: "$TMP/rx.log")
    echo "${pps:-0} ${sent:-0} ${got:-0}"
}

echo "layout: zc: zsend (guest driver) core 0, zcount (guest driver) core 0, worker (both exports) core 1"
echo "        dpdk: txonly core 0, rxonly core 0, io switch (two vhost ports) core 1"
printf '%-7s %14s %14s %8s %12s %12s\n' size "zc Mpps" "dpdk Mpps" "zc/dpdk" "zc loss" "dpdk loss"
for size in $SIZES; do
    z=(); d=(); zl=(); dl=(); proof=""
    for _ in $(seq "$RUNS"); do
        wait_idle
        read -r pps sent got ex cp < <(zc "$size")
        z+=("$pps"); zl+=("$((sent - got))")
        proof="rx exchanged $ex, copied $cp (of $got received)"
        wait_idle
        read -r pps sent got < <(dpdk "$size")
        d+=("$pps"); dl+=("$((sent - got))")
    done
    zm=$(printf '%s\n' "${z[@]}" | median)
    dm=$(printf '%s\n' "${d[@]}" | median)
    zlm=$(printf '%s\n' "${zl[@]}" | median)
    dlm=$(printf '%s\n' "${dl[@]}" | median)
    awk -v s="$size" -v z="$zm" -v d="$dm" -v zl="$zlm" -v dl="$dlm" 'BEGIN {
        printf "%-7s %14.3f %14.3f %8.1f %12d %12d\n", s " B", z/1e6, d/1e6, (d > 0 ? z/d : 0), zl, dl }'
    echo "        runs Mpps: zc $(echo "${z[*]}" | mpps) | dpdk $(echo "${d[*]}" | mpps); last zc run: $proof"
done
echo "export counters after each zc run:"
grep -E '^(export|worker)' "$TMP/stats.log" | sed 's/^/  /'
