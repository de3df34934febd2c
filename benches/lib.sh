# What every benchmark script shares; sourced, not run.
#   . "$(dirname "$0")/lib.sh"; bench_setup NAME HUGEPAGES
# bench_setup checks root and testpmd, reserves hugepages, builds the
# release binaries (unless NO_BUILD is set), and sets B (the binaries) and
# TMP (removed at exit, with every pid in PIDS killed first).

bench_setup() {
    BENCH=$1
    [ "$(id -u)" = 0 ] || { echo "$BENCH: needs root (hugepages)" >&2; exit 1; }
    command -v dpdk-testpmd >/dev/null || { echo "$BENCH: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
    [ "$(cat /proc/sys/vm/nr_hugepages)" -ge "$2" ] || echo "$2" > /proc/sys/vm/nr_hugepages
    mkdir -p /dev/hugepages
    mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
    [ -n "${NO_BUILD:-}" ] || cargo build --release -q --workspace
    B=target/release
    TMP=$(mktemp -d "/tmp/zc-$BENCH.XXXXXX")
    export ZC_RUN_DIR=$TMP/run
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
    # What testpmd leaves behind under this benchmark's file prefixes.
    rm -rf /dev/hugepages/zc"$BENCH"* /var/run/dpdk/zc"$BENCH"*
}

# Percent of all CPU time used over half a second (between runs: by others).
cpu_busy() {
    local a b
    a=$(awk '$1 == "cpu" { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat); sleep 0.5
    b=$(awk '$1 == "cpu" { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
    echo "$a $b" | awk '{ t = $3 - $1 + $4 - $2; print (t > 0 ? int(100 * ($3 - $1) / t) : 0) }'
}

# Waits up to IDLE_WAIT seconds (default 120) for the machine to go idle.
wait_idle() {
    local i
    for ((i = 0; i < ${IDLE_WAIT:-120} * 2; i++)); do
        [ "$(cpu_busy)" -lt 10 ] && return 0
    done
    echo "$BENCH: other processes keep the CPUs busy; measuring anyway" >&2
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# The last value of JSON field NAME in the lines on stdin.
json_field() { sed -n "s/.*\"$1\":\([0-9.e+]*\).*/\1/p" | tail -1; }
json_pps() { json_field pps; }

now() { date +%s.%N; }

# Prints a list of numbers as Mpps, two decimals.
mpps() { awk '{ for (i = 1; i <= NF; i++) printf "%s%.2f", (i > 1 ? " " : ""), $i / 1e6 }'; }
