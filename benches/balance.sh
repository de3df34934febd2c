#!/bin/bash
# The balancer's rate next to the plain host queue, in one invocation:
# 64-byte packets of 1024 flows (zsend --flows 1024), RUNS runs of each,
# alternating, medians.
#   (queue)   zsend -> zc:C@0 -> zcount                 (no balancer)
#   (hash)    zsend -> zc:C@0 -> balancer (worker) -> zc:C@1, zc:C@2, each
#             with a zcount  (--balance in=0,out=1+2,hash=5tuple)
#   (fanout)  zsend -> zc:C@0 -> balancer -> zc:C@1 and zc:C@2, every packet
#             to both         (--balance in=0,out=1/2)
# Rates: "in" is what the balancer took off queue 0 per second, each output
# queue's rate is what its zcount counted per second (from its first
# packet); drops are the balancer's per-queue drop counters. The bytes the
# balancer copied come from `zc-hostd stats --json`: fan-out copies every
# packet for all but the last group today (no shared buffers yet).
# Thread-to-core layout: the daemon's worker has core 1 to itself (-g 1);
# zsend and the zcounts share core 0 (four busy threads on two cores). The
# plain queue: zsend on core 1, zcount on core 0.
# Needs root and 1 GiB of 2 MiB hugepages (it reserves them).
#   benches/balance.sh                     # RUNS=3 SECS=5
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
RUNS=${RUNS:-3}
SECS=${SECS:-5}
C=4321
bench_setup balance 512
mkdir -p "$ZC_RUN_DIR"

start_daemon() {
    "$B/zc-hostd" -c "$C" -q 3 --buffers 32768 -g 1 "$@" >"$TMP/hostd.log" 2>&1 &
    DAEMON=$!
    PIDS+=("$DAEMON")
    for _ in $(seq 200); do [ -S "$ZC_RUN_DIR/$C/ctl" ] && return 0; sleep 0.05; done
    echo "balance: zc-hostd did not start: $(cat "$TMP/hostd.log")" >&2
    exit 1
}

stop_daemon() {
    kill -INT "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
}

# zcount on queue $1 for SECS seconds, JSON into $2.
count() { "$B/zcount" -i "zc:$C@$1" -g 0 -t "$SECS" --json >"$2" 2>/dev/null & }

# Plain queue: prints pps.
queue_run() {
    start_daemon
    count 0 "$TMP/q.json"
    local cnt=$!
    "$B/zsend" -i "zc:$C@0" -l 64 --flows 1024 -g 1 >/dev/null 2>&1 &
    local send=$!
    wait "$cnt"
    kill -INT "$send" 2>/dev/null || true
    wait "$send" 2>/dev/null || true
    stop_daemon
    json_pps <"$TMP/q.json"
}

# Balancer with --balance $1: prints "in q1 q2 drops1 drops2 copied_bytes" (pps, counts).
balance_run() {
    start_daemon --balance "$1"
    count 1 "$TMP/b1.json"
    local c1=$!
    count 2 "$TMP/b2.json"
    local c2=$!
    sleep 0.3
    local s0 t0
    s0=$("$B/zc-hostd" -c "$C" stats --json)
    t0=$(now)
    "$B/zsend" -i "zc:$C@0" -l 64 --flows 1024 -g 0 >/dev/null 2>&1 &
    local send=$!
    wait "$c1" "$c2"
    local s1 t1
    s1=$("$B/zc-hostd" -c "$C" stats --json)
    t1=$(now)
    kill -INT "$send" 2>/dev/null || true
    wait "$send" 2>/dev/null || true
    stop_daemon
    python3 - "$s0" "$s1" "$t0" "$t1" "$(json_pps <"$TMP/b1.json")" "$(json_pps <"$TMP/b2.json")" <<'EOF'
import json, sys
a, b = (json.loads(x)["balancers"][0] for x in sys.argv[1:3])
secs = float(sys.argv[4]) - float(sys.argv[3])
rate_in = (b["packets_in"] - a["packets_in"]) / secs
drops = [o["dropped"] for o in b["outputs"]]
copied = sum(o.get("bytes_copied", 0) for o in b["outputs"])
print(rate_in, sys.argv[5] or 0, sys.argv[6] or 0, drops[0], drops[1], copied)
EOF
}

declare -a Q H F
for r in $(seq "$RUNS"); do
    wait_idle
    Q+=("$(queue_run)")
    wait_idle
    H+=("$(balance_run in=0,out=1+2,hash=5tuple)")
    wait_idle
    F+=("$(balance_run in=0,out=1/2)")
    echo "run $r: queue ${Q[-1]} | hash ${H[-1]} | fanout ${F[-1]}" >&2
done

col() { local i=$1; shift; for l in "$@"; do echo "$l" | awk -v i="$i" '{print $i}'; done | median; }
qm=$(printf '%s\n' "${Q[@]}" | median)
echo "layout: balancer runs: worker alone on core 1, zsend and both zcounts on core 0; plain queue: zsend core 1, zcount core 0; 64 B, 1024 flows, medians of $RUNS runs of ${SECS} s"
printf '%-34s %8s\n' "path" "Mpps"
printf '%-34s %8s\n' "plain queue (zsend -> zcount)" "$(echo "$qm" | mpps)"
for kind in H F; do
    declare -n arr=$kind
    name=$([ "$kind" = H ] && echo "hash=5tuple, out=1+2" || echo "fan-out, out=1/2")
    in=$(col 1 "${arr[@]}")
    printf '%-34s %8s   (q1 %s, q2 %s Mpps; drops q1 %s, q2 %s; bytes copied %s; in/queue %.2f)\n' \
        "balancer $name, in" "$(echo "$in" | mpps)" \
        "$(col 2 "${arr[@]}" | mpps)" "$(col 3 "${arr[@]}" | mpps)" \
        "$(col 4 "${arr[@]}")" "$(col 5 "${arr[@]}")" "$(col 6 "${arr[@]}")" \
        "$(awk -v a="$in" -v b="$qm" 'BEGIN { print (b > 0 ? a / b : 0) }')"
done
