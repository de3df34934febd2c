#!/bin/bash
# The zc demo: traffic from the host into a VM, counted zero-copy inside it.
#
# Builds everything and the guest image, starts a cluster whose queue 0 is
# exported to a VM as a virtio-net device, boots the VM (QEMU, TCG unless a
# real KVM module is loaded), and streams packets from the host's zsend into
# the guest's zcount, which takes the device over with zc's userspace driver.
# The guest's once-a-second lines appear prefixed with [guest]; at the end the
# daemon's statistics show how many packets were exchanged (zero-copy) rather
# than copied.
#   sudo scripts/demo.sh          (DEMO_SECONDS=N to change the 15 s count)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (sudo $0): it reserves hugepages and runs QEMU" >&2; exit 1; }
bash scripts/setup.sh
echo "== building zc (release) and the guest image"
cargo build --release --workspace -q
NO_CARGO=1 bash vm-images/build.sh
B=$PWD/target/release
CLUSTER=${ZC_CLUSTER:-99}
SECS=${DEMO_SECONDS:-15}
work=$(mktemp -d)
export ZC_RUN_DIR=$work/run
sock=$work/vm1.sock

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== zc-hostd -c $CLUSTER -q 2 --export $sock,rx=0,tx=1"
echo "   queue zc:$CLUSTER@0 feeds the VM's virtio-net device; what the VM sends lands in zc:$CLUSTER@1"
$B/zc-hostd -c "$CLUSTER" -q 2 --export "$sock,rx=0,tx=1" &
pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "demo: zc-hostd did not start" >&2; exit 1; }

qemu_opts=$($B/zc-hostd -c "$CLUSTER" --qemu-args "$sock")
accel=tcg
# A kernel without loadable modules has no /proc/modules: then no KVM module
# is loaded either (-s: not an error worth printing).
grep -qsE '^kvm_(intel|amd) ' /proc/modules && [ -e /dev/kvm ] && accel=kvm
echo "== booting the guest ($accel) with: qemu-system-x86_64 ... $qemu_opts"
echo "   inside it: zcount -i zc:$CLUSTER@0 -t $SECS --verify (the zc driver takes the virtio-net device over)"
qemu-system-x86_64 -machine pc -accel "$accel" -smp 1 -nic none -no-reboot \
    -display none -monitor none -serial stdio \
    -kernel target/vm-images/vmlinuz -initrd target/vm-images/initramfs.cpio.gz \
    -append "console=ttyS0 quiet panic=-1 zc.run=\"zcount -i zc:$CLUSTER@0 -t $SECS --verify\"" \
    $qemu_opts < /dev/null 2>&1 | sed -u 's/^/[guest] /' &
pids+=($!)
guest=$!

echo "== zsend -i zc:$CLUSTER@0 on the host (64-byte packets; it waits while the guest catches up)"
$B/zsend -i "zc:$CLUSTER@0" -l 64 2>/dev/null &
pids+=($!)
sender=$!

wait "$guest" || true
kill -INT "$sender" 2>/dev/null || true
wait "$sender" 2>/dev/null || true
echo "== zc-hostd -c $CLUSTER stats"
$B/zc-hostd -c "$CLUSTER" stats
echo "== 'exchanged' counts packets handed to the guest by swapping pool buffers (zero-copy);"
echo "   'copied' counts those that took the copy path (e.g. the guest kernel's own virtio_net driver)"
