#!/bin/bash
# Installs what zc's demo and tests need on a Debian machine, as root:
# QEMU (10.0 from bookworm-backports where available), DPDK (testpmd, the
# performance peer and independent client), busybox-static, cpio and kmod
# (the guest image), tshark, tcpdump and tcpreplay (independent readers and
# senders of captures and interface traffic), xdp-tools and libxdp (the
# XDP redirect program of interface ports), libvirt (libvirt-daemon-system,
# libvirt-clients: domains that use zc), prometheus (scrapes --metrics in
# the tests), systemd's systemd-analyze (checks the service unit), and
# reserves 2 MiB hugepages. Safe to run repeatedly:
# it only installs what is missing.
#
# Sourced by scripts/demo.sh and scripts/test.sh; run alone with
#   sudo scripts/setup.sh
set -euo pipefail

say() { echo "zc setup: $*" >&2; }
die() { echo "zc setup: error: $*" >&2; exit 1; }

HUGEPAGES_WANTED=${ZC_HUGEPAGES:-1024}

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): installing packages and reserving hugepages need it"
command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (https://rustup.rs) and run again"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu)
for p in dpdk-dev busybox-static cpio kmod iproute2 tshark tcpdump tcpreplay xdp-tools libxdp1 \
    libvirt-daemon-system libvirt-clients prometheus; do
    installed "$p" || missing+=("$p")
done
command -v systemd-analyze >/dev/null || missing+=(systemd)

if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_update_done=
    apt_update() { [ -n "$apt_update_done" ] || { apt-get update -qq; apt_update_done=1; }; }
    apt_update
    pkgs=()
    for m in "${missing[@]}"; do
        [ "$m" = qemu ] || pkgs+=("$m")
    done
    [ ${#pkgs[@]} -eq 0 ] || apt-get install -y -qq "${pkgs[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" qemu "* ]]; then
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        if [ "$codename" = bookworm ]; then
            # Same mirror apt already uses; QEMU 10 and a 6.12 kernel live in backports.
            mirror=$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
            [ -n "$mirror" ] || mirror=$(grep -hoE '^deb +[^ ]+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
            [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
            if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
                echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/zc-backports.list
                apt-get update -qq
            fi
            apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null \
                || { say "backports QEMU unavailable; installing bookworm's QEMU 7.2"; apt-get install -y -qq qemu-system-x86 >/dev/null; }
        else
            apt-get install -y -qq qemu-system-x86 >/dev/null
        fi
    fi
fi

# Hugepages: the pool, and DPDK's testpmd, live on 2 MiB pages.
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
total=$(cat /proc/sys/vm/nr_hugepages)
if [ "$total" -lt "$HUGEPAGES_WANTED" ]; then
    echo "$HUGEPAGES_WANTED" > /proc/sys/vm/nr_hugepages
    total=$(cat /proc/sys/vm/nr_hugepages)
    [ "$total" -ge "$HUGEPAGES_WANTED" ] || say "warning: only $total of $HUGEPAGES_WANTED hugepages could be reserved (memory fragmented?); zc falls back to /dev/shm"
fi
say "ready: $(qemu-system-x86_64 --version | head -1), DPDK $(dpkg-query -W -f='${Version}' dpdk-dev), $(awk '/HugePages_Free/ {print $2}' /proc/meminfo) free hugepages"
