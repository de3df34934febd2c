#!/bin/bash
# The zc demo: builds everything, starts a cluster, and streams packets
# from zsend into zcount across two processes without copying them.
#   sudo scripts/demo.sh            (SECONDS_TO_RUN=N to change the 6 s run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace
B=target/release
CLUSTER=${ZC_CLUSTER:-99}
RUN=${SECONDS_TO_RUN:-6}
export ZC_RUN_DIR=${ZC_RUN_DIR:-/run/zc}

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== zc-hostd -c $CLUSTER -q 2: a cluster with a hugepage pool and two queues"
$B/zc-hostd -c "$CLUSTER" -q 2 &
pids+=($!)
for _ in $(seq 100); do [ -S "$ZC_RUN_DIR/$CLUSTER/ctl" ] && break; sleep 0.1; done
[ -S "$ZC_RUN_DIR/$CLUSTER/ctl" ] || { echo "demo: zc-hostd did not start" >&2; exit 1; }

echo "== zsend -i zc:$CLUSTER@0 -g 1 (64-byte packets, unlimited rate, core 1)"
$B/zsend -i "zc:$CLUSTER@0" -l 64 -g 1 2>/dev/null &
pids+=($!)
sender=$!

echo "== zcount -i zc:$CLUSTER@0 -t $RUN --verify -g 0 (checks every packet's sequence and checksum, core 0)"
$B/zcount -i "zc:$CLUSTER@0" -t "$RUN" -g 0 --verify
kill -INT "$sender"
wait "$sender" || true
echo "== done: every packet above was handed over by swapping buffer handles, none was copied"
