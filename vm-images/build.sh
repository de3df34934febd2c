#!/bin/bash
# Builds the zc guest image from Debian's packages only:
#   target/vm-images/vmlinuz          kernel of the current linux-image-amd64
#                                     (bookworm-backports' when configured),
#                                     downloaded with apt-get download and
#                                     unpacked, never installed on the host
#   target/vm-images/initramfs.cpio.gz  busybox-static, virtio_net and the
#                                     modules it needs, the release zcount,
#                                     zsend and zping and the shared libraries
#                                     they link,
#                                     and vm-images/init
#   target/vm-images/manifest.txt     package versions and binary hashes
# Rebuilding with unchanged inputs is a no-op; changed binaries are picked up.
# Needs: apt-get, dpkg-deb, cpio, gzip, xz, busybox-static (scripts/setup.sh
# installs them). Run as any user that can run apt-get download (no root).
#   vm-images/build.sh            (builds the release binaries first)
#   NO_CARGO=1 vm-images/build.sh (use the binaries already in target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/target/vm-images
CACHE=$OUT/cache
mkdir -p "$CACHE"
say() { echo "vm-images: $*" >&2; }
die() { echo "vm-images: error: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip xz; do
    command -v $tool >/dev/null || die "$tool is missing (run scripts/setup.sh as root)"
done
[ -x /bin/busybox ] || die "/bin/busybox is missing: apt-get install busybox-static"
case "$(ldd /bin/busybox 2>&1 || true)" in
    *"not a dynamic"*) ;;
    *) die "/bin/busybox is not static: apt-get install busybox-static" ;;
esac

if [ -z "${NO_CARGO:-}" ]; then
    cargo build --release -q -p zc --bin zcount --bin zsend --bin zping
fi
BINS=(target/release/zcount target/release/zsend target/release/zping)
for b in "${BINS[@]}"; do [ -x "$b" ] || die "$b is missing: cargo build --release -p zc"; done

# The kernel package: what linux-image-amd64 depends on, preferring backports.
suite_opt=()
# (Output captured first: grep -q closing the pipe early would trip pipefail.)
policy=$(apt-cache policy linux-image-amd64)
[[ "$policy" == *bookworm-backports* ]] && suite_opt=(-t bookworm-backports)
kpkg=$(apt-cache depends "${suite_opt[@]}" linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 (run apt-get update)"
kver_pkg=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
busybox_ver=$(dpkg-query -W -f='${Version}' busybox-static)

# Everything that decides the image's content, hashed.
inputs=$( {
    echo "kernel $kpkg $kver_pkg"
    echo "busybox-static $busybox_ver"
    sha256sum vm-images/init vm-images/build.sh "${BINS[@]}"
} )
stamp=$(echo "$inputs" | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/manifest.txt" ] && grep -q "^inputs $stamp$" "$OUT/manifest.txt" \
    && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    say "up to date ($OUT)"
    exit 0
fi

deb=$(ls "$CACHE"/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
    say "downloading $kpkg $kver_pkg"
    (cd "$CACHE" && apt-get -o APT::Sandbox::User=root download "$kpkg" >/dev/null) || die "apt-get download $kpkg failed"
    deb=$(ls "$CACHE"/"${kpkg}"_*.deb | head -1)
fi
kdir=$CACHE/kernel-$kpkg
if [ ! -d "$kdir" ]; then
    rm -rf "$kdir.tmp"
    dpkg-deb -x "$deb" "$kdir.tmp"
    mv "$kdir.tmp" "$kdir"
fi
kver=$(ls "$kdir/lib/modules" | head -1)
[ -f "$kdir/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $deb"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,lib/modules,lib64,usr/bin,proc,sys,dev,tmp,run,etc}
# The image's root is mktemp's 0700 directory: open it to other users (tests
# run tools as one), and /tmp as usual.
chmod 755 "$stage"
chmod 1777 "$stage/tmp"
cp /bin/busybox "$stage/bin/busybox"
cp vm-images/init "$stage/init"
chmod 755 "$stage/init"
# virtio_net and what it depends on; virtio and virtio_pci are built in.
for m in failover net_failover virtio_net; do
    src=$(find "$kdir/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$src" ] || die "module $m not found in $kpkg"
    case "$src" in
        *.xz) xz -dc "$src" > "$stage/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" > "$stage/lib/modules/$m.ko" ;;
        *.gz) gzip -dc "$src" > "$stage/lib/modules/$m.ko" ;;
        *) cp "$src" "$stage/lib/modules/$m.ko" ;;
    esac
done
for b in "${BINS[@]}"; do
    cp "$b" "$stage/usr/bin/"
    # The shared libraries it links, at the paths the loader expects.
    ldd "$b" | awk '/=> \// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
done
echo "root:x:0:0:root:/:/bin/sh" > "$stage/etc/passwd"
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initramfs.cpio.gz.tmp"
cp "$kdir/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
{
    echo "inputs $stamp"
    echo "kernel_release $kver"
    echo "$inputs"
} > "$OUT/manifest.txt"
say "built $OUT (kernel $kver, initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
