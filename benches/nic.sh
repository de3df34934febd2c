#!/usr/bin/env bash
# Interface ports (issue 11): the same traffic, a fixed pcap of 64-byte
# UDP frames replayed at top speed (tcpreplay --topspeed) into the peer end
# of a veth pair, received on the other end by
#   (zc)   zc-hostd --nic IF,ingress=0 (AF_XDP, the pool as UMEM; veth is
#          copy mode) and zcount -i zc:IF,
#   (dpdk) dpdk-testpmd --vdev net_af_xdp0,iface=IF in rxonly,
# alternating, RUNS times each; prints the medians of the receive rates
# (packets received / seconds tcpreplay took) and of the drops (sent -
# received), and the thread-to-core layout.
#
#   RUNS=5 LOOPS=20 bash benches/nic.sh     (as root; ZCOUNT_CORE=0|1)
#
# Needs root, dpdk-testpmd, tcpreplay and ~600 MiB of 2 MiB hugepages.
# veth bounds both well under 1 Mpps here: the sender's core runs
# tcpreplay, veth_xmit and the receive side's XDP program in its softirq
# (the kernel copies each frame into the UMEM there). zc's drops show up as
# drop_queue_full: zcount, a second thread beside the worker, drains the
# cluster queue, where testpmd frees mbufs in its own poll loop.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_setup nic 600
command -v tcpreplay >/dev/null || { echo "nic: tcpreplay missing (apt-get install tcpreplay)" >&2; exit 1; }
RUNS=${RUNS:-5}
LOOPS=${LOOPS:-20}
FRAMES=${FRAMES:-50000}
# zcount's core: 0 (default) shares the worker's, 1 shares tcpreplay's
# (and the softirq's), which starves it.
ZCOUNT_CORE=${ZCOUNT_CORE:-0}

TAG=$$
NS_A=zcbna$TAG NS_B=zcbnb$TAG IF_A=zbna$TAG IF_B=zbnb$TAG
nic_cleanup() {
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    bench_cleanup
}
trap nic_cleanup EXIT
for ns in "$NS_A" "$NS_B"; do
    ip netns add "$ns"
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
done
ip link add "$IF_A" netns "$NS_A" type veth peer name "$IF_B" netns "$NS_B"
ip -n "$NS_A" link set "$IF_A" up
ip -n "$NS_B" link set "$IF_B" up
# Runs a command in the receiving namespace. An array, not a function:
# `ip netns exec` execs its command, so after `"${NSA[@]}" cmd &` $! is
# cmd's own pid; a backgrounded function would leave $! the pid of a
# subshell, which does not pass the stopping signal on.
NSA=(ip netns exec "$NS_A")

# The fixed capture: FRAMES distinct 64-byte Ethernet/IPv4/UDP frames.
CAP=$TMP/in.pcap
python3 - "$CAP" "$FRAMES" <<'EOF'
import struct, sys
path, n = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.write(struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1))
    for i in range(n):
        eth = bytes.fromhex("ffffffffffff027a63000001") + b"\x08\x00"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, 0, 0x4000, 64, 17, 0,
                         bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
        udp = struct.pack("!HHHH", 9, 9, 30, 0)
        frame = (eth + ip + udp + struct.pack("<Q", i)).ljust(64, b"\0")
        f.write(struct.pack("<IIII", i // 1000000, i % 1000000, 64, 64) + frame)
EOF
SENT=$((FRAMES * LOOPS))

# Replays the capture LOOPS times at top speed from the peer, on core 1;
# prints the seconds it took.
replay() {
    local out
    out=$(ip netns exec "$NS_B" taskset -c 1 tcpreplay --topspeed -q -l "$LOOPS" -i "$IF_B" "$CAP" 2>&1)
    echo "$out" | sed -n 's/.*Actual: [0-9]* packets ([0-9]* bytes) sent in \([0-9.]*\) seconds.*/\1/p' | tail -1
}

zc_run() {
    "${NSA[@]}" "$B/zc-hostd" -c 4343 -q 2 --run-dir "$ZC_RUN_DIR" -g 0 --nic "$IF_A,ingress=0" \
        >"$TMP/hostd.log" 2>&1 &
    local hostd=$!
    PIDS+=("$hostd")
    for _ in $(seq 200); do grep -q "interface port .* ready" "$TMP/hostd.log" && break; sleep 0.05; done
    "${NSA[@]}" "$B/zcount" -i "zc:$IF_A" -g "$ZCOUNT_CORE" --json >"$TMP/zcount.json" 2>/dev/null &
    local count=$!
    sleep 0.5
    local secs
    secs=$(replay)
    sleep 1
    kill -INT "$count"; wait "$count" 2>/dev/null || true
    local got
    got=$(json_field packets <"$TMP/zcount.json")
    "$B/zc-hostd" -c 4343 --run-dir "$ZC_RUN_DIR" stats --json >"$TMP/stats.json"
    kill "$hostd"; wait "$hostd" 2>/dev/null || true
    echo "$got $secs"
}

dpdk_run() {
    local log=$TMP/testpmd.log
    "${NSA[@]}" timeout -s INT 120 dpdk-testpmd --lcores '0@1,1@0' -n 1 --no-pci --socket-mem 256 \
        --file-prefix zcnic$TAG --vdev "net_af_xdp0,iface=$IF_A,start_queue=0,queue_count=1" -- \
        --forward-mode=rxonly --nb-cores 1 --stats-period 1 -a >"$log" 2>&1 &
    local pmd=$!
    PIDS+=("$pmd")
    for _ in $(seq 200); do grep -q "Press enter to exit\|Port statistics" "$log" && break; sleep 0.05; done
    sleep 0.5
    local secs
    secs=$(replay)
    sleep 1.5
    local got
    got=$(grep -a "RX-packets:" "$log" | tail -1 | awk '{print $2}')
    kill -INT "$pmd" 2>/dev/null; wait "$pmd" 2>/dev/null || true
    echo "${got:-0} $secs"
}

echo "layout: core 1: tcpreplay (and the veth softirq: XDP, the copy into the UMEM); core 0: the zc-hostd worker | testpmd's rxonly lcore; zcount on core $ZCOUNT_CORE | testpmd's main lcore on core 1"
echo "sent per run: $SENT frames of 64 B ($FRAMES in $CAP, $LOOPS loops)"
zr=() zd=() dr=() dd=() zs=()
for i in $(seq "$RUNS"); do
    wait_idle
    read -r got secs < <(zc_run)
    zr+=("$(awk -v g="$got" -v s="$secs" 'BEGIN { print (s > 0 ? g / s : 0) }')")
    zd+=("$((SENT - got))")
    zs+=("$(tr ',' '\n' <"$TMP/stats.json" | grep -E '"(drop_[a-z_]+|mode)"' | tr '\n' ' ')")
    wait_idle
    read -r got secs < <(dpdk_run)
    dr+=("$(awk -v g="$got" -v s="$secs" 'BEGIN { print (s > 0 ? g / s : 0) }')")
    dd+=("$((SENT - got))")
    echo "run $i: zc ${zr[-1]} pps, ${zd[-1]} dropped (${zs[-1]}) | dpdk ${dr[-1]} pps, ${dd[-1]} dropped"
done
z=$(printf '%s\n' "${zr[@]}" | median)
d=$(printf '%s\n' "${dr[@]}" | median)
printf '%-22s %12s %16s\n' receiver "Mpps (median)" "drops (median)"
printf "%-22s %12s %16s\n" "zc --nic + zcount" "$(echo "$z" | mpps)" "$(printf '%s\n' "${zd[@]}" | median)"
printf "%-22s %12s %16s\n" "testpmd net_af_xdp" "$(echo "$d" | mpps)" "$(printf '%s\n' "${dd[@]}" | median)"
awk -v z="$z" -v d="$d" 'BEGIN { printf "ratio zc/dpdk: %.2f\n", (d > 0 ? z / d : 0) }'
