#!/usr/bin/env bash
# benches/host-queues.sh - host cluster queue throughput, zc against DPDK vhost-user.
#
# What it measures (64-byte packets, unlimited rate, one core per side):
#   1. zc: zsend -> one queue of a zc-hostd cluster -> zcount, two processes,
#      zsend pinned to core 1 (-g 1), zcount to core 0 (-g 0), burst 32
#      (built in). Each run: start zsend, then `zcount -t $DURATION --json`
#      (its pps counts from the first packet), then SIGINT zsend.
#      Done with the daemon's default --queue-len and again with
#      --queue-len 512 (a shorter queue stays in cache).
#   2. The DPDK peer from DESIGN.md ("Peers to measure against"): a
#      dpdk-testpmd vhost PMD backend in `rxonly` mode and a dpdk-testpmd
#      virtio_user frontend in `txonly --txpkts 64` mode, lcores pinned as
#      DESIGN.md shows (backend forwards on core 1, frontend on core 0). The
#      backend prints its port stats every second (--stats-period 1); a run's
#      figure is the mean of its "Rx-pps:" samples over $DURATION seconds,
#      skipping the first (partial) sample after traffic starts.
# Every figure is the median of $RUNS runs. A final table prints the medians,
# the ratio zc/DPDK and the per-run figures.
#
# How to run (as root: it needs hugepages; dpdk-testpmd from `apt-get install dpdk-dev`):
#   sudo benches/host-queues.sh
#   sudo RUNS=9 DURATION=5 benches/host-queues.sh
# Environment: RUNS (default 5), DURATION seconds per run (default 3),
#   CLUSTER zc cluster id (default 4242), NO_BUILD=1 to skip `cargo build`,
#   IDLE_WAIT seconds to wait before each run for other processes to leave the
#   CPU idle (default 120), DISTURBED_MAX percent of the CPUs that other
#   processes may take during a run before it is repeated (default 3; after
#   3 disturbed attempts the least disturbed one is kept, flagged '*').
# The script builds the release binaries (cargo build --release --workspace),
# reserves 1024 2 MiB hugepages if fewer are free, uses its own ZC_RUN_DIR in
# a temporary directory, and stops every process it started when it exits.
# Run it on an otherwise idle machine: both cores are busy-polled.
set -euo pipefail

RUNS=${RUNS:-5}
DURATION=${DURATION:-3}
CLUSTER=${CLUSTER:-4242}
PKT_LEN=64
SMALL_QLEN=512
HUGE_DIR=/dev/hugepages
DPDK_RUN_DIR=/var/run/dpdk
PREFIX_BASE="zcbench-$$"            # DPDK --file-prefix stem, unique per invocation

die() { echo "host-queues.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer (got '$RUNS')"
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer of seconds (got '$DURATION')"
[[ $(id -u) -eq 0 ]] || die "must run as root (hugepages, DPDK): sudo $0"
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd not found: apt-get install dpdk-dev"
(( $(nproc) >= 2 )) || die "needs at least 2 CPU cores (cores 0 and 1 are used)"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$REPO/target/release
TMP=$(mktemp -d /tmp/zc-host-queues.XXXXXX)
export ZC_RUN_DIR=$TMP/run
mkdir -p "$ZC_RUN_DIR"

# ---------------------------------------------------------------- cleanup
PIDS=()          # every background process we started (and may still be running)
PREFIXES=()      # DPDK file prefixes we used

# stop_pid PID [SECONDS]: SIGINT, wait up to SECONDS (default 5), then SIGKILL.
stop_pid() {
    local pid=$1 limit=$(( ${2:-5} * 10 )) i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -INT "$pid" 2>/dev/null || true
    for (( i = 0; i < limit; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGINT; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Remove the hugepage files and runtime dir of a DPDK instance that is gone.
dpdk_clean_prefix() {
    local p=$1
    rm -f "$HUGE_DIR/${p}map_"* 2>/dev/null || true
    rm -rf "${DPDK_RUN_DIR:?}/$p" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid p
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 3; done
    for p in "${PREFIXES[@]}"; do dpdk_clean_prefix "$p"; done
    # a zc-hostd that had to be SIGKILLed leaves its pool behind
    if [[ -e $HUGE_DIR/zc/$CLUSTER/pool ]] && ! fuser -s "$HUGE_DIR/zc/$CLUSTER/pool" 2>/dev/null; then
        rm -rf "${HUGE_DIR:?}/zc/$CLUSTER"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Hugepage files left by earlier invocations of this script that died.
for f in "$HUGE_DIR"/zcbench-*map_* "$DPDK_RUN_DIR"/zcbench-*; do
    [[ -e $f ]] || continue
    owner=${f##*/zcbench-}; owner=${owner%%-*}
    if [[ $owner =~ ^[0-9]+$ ]] && ! kill -0 "$owner" 2>/dev/null; then
        rm -rf "$f"
    fi
done

# ---------------------------------------------------------------- build
if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "cargo build --release --workspace"
    (cd "$REPO" && cargo build --release --workspace --quiet) || die "cargo build --release --workspace failed"
fi
for b in zc-hostd zsend zcount; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing: run cargo build --release --workspace"
done

# ---------------------------------------------------------------- hugepages
# Another daemon serving the same cluster id would share the pool file's path.
if [[ -e $HUGE_DIR/zc/$CLUSTER/pool ]] && fuser -s "$HUGE_DIR/zc/$CLUSTER/pool" 2>/dev/null; then
    die "a running zc-hostd already serves cluster $CLUSTER ($HUGE_DIR/zc/$CLUSTER/pool is in use): rerun with CLUSTER=<another id>"
fi

meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
[[ $(meminfo Hugepagesize) == 2048 ]] || die "default hugepage size is not 2 MiB"
mkdir -p "$HUGE_DIR"
mountpoint -q "$HUGE_DIR" || mount -t hugetlbfs nodev "$HUGE_DIR" || die "cannot mount hugetlbfs on $HUGE_DIR"
# (Other processes may take hugepages meanwhile: try a few times.)
for attempt in 1 2 3; do
    free_pages=$(meminfo HugePages_Free)
    (( free_pages >= 1024 )) && break
    total=$(cat /proc/sys/vm/nr_hugepages)
    want=$(( total + 1024 - free_pages ))
    log "only $free_pages 2 MiB hugepages free: raising vm.nr_hugepages from $total to $want"
    echo "$want" > /proc/sys/vm/nr_hugepages
    sleep 0.2
done
free_pages=$(meminfo HugePages_Free)
(( free_pages >= 1024 )) || die "could get only $free_pages free 2 MiB hugepages, need 1024 (memory too fragmented? free some memory)"

# ---------------------------------------------------------------- helpers
# median of the arguments (mean of the middle two for an even count); a
# trailing '*' (a disturbed run) is ignored
median() {
    printf '%s\n' "${@%\*}" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf "%.2f\n", v[(NR + 1) / 2]
        else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# wait_for COND_CMD TIMEOUT_S WHAT PID: poll until COND_CMD succeeds; fail if PID died.
wait_for() {
    local cond=$1 limit=$(( $2 * 10 )) what=$3 pid=$4 i
    for (( i = 0; i < limit; i++ )); do
        eval "$cond" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    log "timed out after $2 s waiting for $what"
    return 1
}

# Percentage of CPU time (all cores) not idle over half a second.
cpu_busy() {
    local a b
    a=$(awk '$1 == "cpu" { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
    sleep 0.5
    b=$(awk '$1 == "cpu" { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d\n", (busy + idle > 0) ? 100 * busy / (busy + idle) : 0 }'
}

# Both cores are busy-polled by a run: anything else running skews it. Wait
# (up to IDLE_WAIT seconds) for the machine to be idle.
IDLE_WAIT=${IDLE_WAIT:-120}
wait_idle() {
    local waited=0 busy
    while :; do
        busy=$(cpu_busy)
        (( busy < 10 )) && return 0
        if (( waited == 0 )); then log "  machine busy ($busy% CPU used by other processes): waiting up to ${IDLE_WAIT} s for it to go idle"; fi
        if (( waited >= IDLE_WAIT )); then
            log "  still busy ($busy% CPU) after ${IDLE_WAIT} s: running anyway"
            return 0
        fi
        sleep 1.5; waited=$(( waited + 2 ))
    done
}

# After the fact: how much CPU did processes other than this script and its
# children take during a run? cpu_mark prints "<ns> <busy jiffies of all
# CPUs> <jiffies of this shell and its reaped children>"; disturbed_pct
# MARK_A MARK_B prints the others' share of all CPUs in between, in percent
# (take the second mark once every child of the run has been reaped).
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
cpu_mark() {
    local ns busy ours
    ns=$(date +%s%N)
    busy=$(awk '$1 == "cpu" { print $2+$3+$4+$7+$8+$9 }' /proc/stat)
    ours=$(awk '{ sub(/^.*\) /, ""); print $12+$13+$14+$15 }' /proc/$$/stat)
    echo "$ns $busy $ours"
}
disturbed_pct() {
    awk -v a="$1" -v b="$2" -v hz="$CLK_TCK" -v ncpu="$NCPU" 'BEGIN {
        split(a, x, " "); split(b, y, " ");
        secs = (y[1] - x[1]) / 1e9; others = (y[2] - x[2]) - (y[3] - x[3]);
        if (others < 0) others = 0;
        printf "%.1f\n", (secs > 0) ? 100 * others / (secs * hz * ncpu) : 0 }'
}
DISTURBED_MAX=${DISTURBED_MAX:-3}     # percent of all CPUs
ATTEMPTS=3
BUSY_RUNS=0

# phase LABEL RUN_FUNC ARGS... : RUNS runs of RUN_FUNC <run id> ARGS...;
# sets RESULTS. A run during which other processes took more than
# DISTURBED_MAX % of the CPUs is repeated (up to ATTEMPTS times in all);
# if every attempt was disturbed the least disturbed one counts, flagged '*'.
phase() {
    local label=$1 fn=$2; shift 2
    local i attempt a b pct best_pct best_mpps
    RESULTS=()
    for (( i = 1; i <= RUNS; i++ )); do
        best_pct=; best_mpps=
        for (( attempt = 1; attempt <= ATTEMPTS; attempt++ )); do
            wait_idle
            a=$(cpu_mark)
            "$fn" "${i}a$attempt" "$@"
            b=$(cpu_mark)
            pct=$(disturbed_pct "$a" "$b")
            if awk -v p="$pct" -v m="$DISTURBED_MAX" 'BEGIN { exit !(p != "" && p + 0 <= m + 0) }'; then
                log "$label run $i/$RUNS: $RUN_MPPS Mpps   (other processes: $pct% CPU)"
                RESULTS+=("$RUN_MPPS")
                break
            fi
            if [[ -z $best_pct ]] || awk -v p="$pct" -v q="$best_pct" 'BEGIN { exit !(p + 0 < q + 0) }'; then
                best_pct=$pct; best_mpps=$RUN_MPPS
            fi
            if (( attempt < ATTEMPTS )); then
                log "$label run $i/$RUNS: $RUN_MPPS Mpps, but other processes used $pct% of the CPUs meanwhile: repeating it"
            else
                log "$label run $i/$RUNS: $RUN_MPPS Mpps, other processes used $pct% of the CPUs; disturbed $ATTEMPTS times: keeping the least disturbed attempt, $best_mpps Mpps ($best_pct%), flagged '*'"
                RESULTS+=("$best_mpps*")
                BUSY_RUNS=$(( BUSY_RUNS + 1 ))
            fi
        done
    done
}

# Drop a finished pid from PIDS.
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- zc
# zc_run N QLEN_ARGS... : one run; sets RUN_MPPS. (Runs are not in $(...)
# subshells, so that PIDS stays complete for the EXIT trap.)
zc_run() {
    local n=$1; shift
    local dlog=$TMP/hostd.$n.log slog=$TMP/zsend.$n.log clog=$TMP/zcount.$n.log
    local json=$TMP/zcount.$n.json hostd zsend mpps packets drops

    "$BIN/zc-hostd" -c "$CLUSTER" -q 1 "$@" </dev/null >"$dlog" 2>&1 &
    hostd=$!; PIDS+=("$hostd")
    wait_for "[[ -S $ZC_RUN_DIR/$CLUSTER/ctl ]]" 10 "zc-hostd's control socket" "$hostd" \
        || { cat "$dlog" >&2; die "zc-hostd -c $CLUSTER did not start"; }

    "$BIN/zsend" -i "zc:$CLUSTER@0" -l "$PKT_LEN" -g 1 </dev/null >"$slog" 2>&1 &
    zsend=$!; PIDS+=("$zsend")
    sleep 0.5
    kill -0 "$zsend" 2>/dev/null || { cat "$slog" >&2; die "zsend exited early"; }

    if ! "$BIN/zcount" -i "zc:$CLUSTER@0" -t "$DURATION" -g 0 --json </dev/null >"$json" 2>"$clog"; then
        cat "$clog" >&2; die "zcount failed"
    fi
    kill -0 "$zsend" 2>/dev/null || { cat "$slog" >&2; die "zsend died during the run"; }
    stop_pid "$zsend"; forget_pid "$zsend"
    stop_pid "$hostd"; forget_pid "$hostd"

    packets=$(sed -n 's/.*"packets":\([0-9]*\).*/\1/p' "$json")
    drops=$(sed -n 's/.*"drops":\([0-9]*\).*/\1/p' "$json")
    mpps=$(sed -n 's/.*"pps":\([0-9.eE+-]*\).*/\1/p' "$json" | awk '{ printf "%.2f", $1 / 1e6 }')
    [[ -n $packets && $packets -gt 0 && -n $mpps ]] || { cat "$json" "$clog" >&2; die "zcount counted nothing"; }
    (( ${drops:-0} == 0 )) || log "  note: zcount reports $drops drops"
    RUN_MPPS=$mpps
}

# ---------------------------------------------------------------- DPDK
rx_samples() { grep -a 'Rx-pps:' "$1" | awk '{ print $2 }'; }

# Samples after the first non-zero one (traffic start); prints how many.
steady_count() {
    rx_samples "$1" | awk 'f { n++ } !f && $1 > 0 { f = 1 } END { print n + 0 }'
}

# dpdk_run N : one run; sets RUN_MPPS.
dpdk_run() {
    local n=$1
    local be_p=$PREFIX_BASE-be$n fe_p=$PREFIX_BASE-fe$n sock=$TMP/vhost$n.sock
    local blog=$TMP/testpmd-be.$n.log flog=$TMP/testpmd-fe.$n.log be fe mpps
    PREFIXES+=("$be_p" "$fe_p")

    dpdk-testpmd --lcores '0@0,1@1' -n 1 --no-pci --socket-mem 512 --file-prefix "$be_p" \
        --vdev "net_vhost0,iface=$sock,queues=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 </dev/null >"$blog" 2>&1 &
    be=$!; PIDS+=("$be")
    wait_for "[[ -S $sock ]] && grep -aq 'Port statistics' '$blog'" 30 "the vhost backend" "$be" \
        || { tail -20 "$blog" >&2; die "testpmd vhost backend did not start (log above)"; }

    dpdk-testpmd --lcores '0@1,1@0' -n 1 --no-pci --socket-mem 512 --file-prefix "$fe_p" --single-file-segments \
        --vdev "virtio_user0,path=$sock,queues=1" -- \
        --forward-mode=txonly --txpkts "$PKT_LEN" --nb-cores 1 --stats-period 1 </dev/null >"$flog" 2>&1 &
    fe=$!; PIDS+=("$fe")

    # Wait for traffic, then for DURATION full one-second samples after the first (partial) one.
    wait_for "(( \$(steady_count '$blog') >= $DURATION ))" $(( 30 + DURATION )) "$DURATION s of traffic at the vhost backend" "$fe" \
        || { tail -20 "$flog" >&2; die "testpmd virtio_user frontend sent nothing (log above)"; }

    stop_pid "$fe" 10; forget_pid "$fe"
    stop_pid "$be" 10; forget_pid "$be"
    dpdk_clean_prefix "$fe_p"; dpdk_clean_prefix "$be_p"

    mpps=$(rx_samples "$blog" | awk -v d="$DURATION" '
        f && n < d { s += $1; n++; if ($1 <= 0) bad = 1 }
        !f && $1 > 0 { f = 1 }
        END { if (n < d || bad) exit 1; printf "%.2f", s / n / 1e6 }') \
        || { tail -40 "$blog" >&2; die "could not read $DURATION steady Rx-pps samples from testpmd"; }
    RUN_MPPS=$mpps
}

# ---------------------------------------------------------------- run
default_qlen=$("$BIN/zc-hostd" --help 2>/dev/null | awk '/--queue-len/ { f = 1 } f && /\[default:/ { gsub(/[^0-9]/, ""); print; exit }')
default_qlen=${default_qlen:-?}
log "host queues, ${PKT_LEN} B packets, $RUNS runs x $DURATION s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"

phase "zc (queue-len $default_qlen)" zc_run
ZC_DEFAULT=("${RESULTS[@]}")
phase "zc (queue-len $SMALL_QLEN)" zc_run --queue-len "$SMALL_QLEN"
ZC_SMALL=("${RESULTS[@]}")
phase "DPDK vhost-user" dpdk_run
DPDK=("${RESULTS[@]}")

zc_med=$(median "${ZC_DEFAULT[@]}")
zc_small_med=$(median "${ZC_SMALL[@]}")
dpdk_med=$(median "${DPDK[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo
echo "== host queues: one sender core, one receiver core, ${PKT_LEN} B, unlimited rate, $RUNS runs x $DURATION s =="
echo "zc host queue ${PKT_LEN}B: $zc_med Mpps (median of $RUNS)   [default queue-len, $default_qlen]"
echo "zc host queue ${PKT_LEN}B, --queue-len $SMALL_QLEN: $zc_small_med Mpps (median of $RUNS)"
echo "DPDK vhost-user ${PKT_LEN}B: $dpdk_med Mpps (median of $RUNS)   [testpmd virtio_user txonly -> vhost PMD rxonly]"
echo "ratio zc/DPDK: $(ratio "$zc_med" "$dpdk_med")"
echo "ratio zc (--queue-len $SMALL_QLEN)/DPDK: $(ratio "$zc_small_med" "$dpdk_med")"
(( BUSY_RUNS == 0 )) || echo "WARNING: $BUSY_RUNS run(s) (flagged '*') shared the CPUs with other processes: they may read low"
echo
echo "per-run Mpps:"
printf '  %-30s %s\n' \
    "zc (queue-len $default_qlen)" "${ZC_DEFAULT[*]}" \
    "zc (queue-len $SMALL_QLEN)" "${ZC_SMALL[*]}" \
    "DPDK vhost-user" "${DPDK[*]}"
