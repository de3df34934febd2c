#!/bin/bash
# Runs every zc test on a fresh Debian machine, as root: installs what is
# missing (scripts/setup.sh), then checks formatting and lints and runs the
# whole workspace's tests, including the multi-process ones.
#   sudo scripts/test.sh
# A test that lacks something (root, QEMU, DPDK, hugepages) skips itself, so
# that it can be run by hand anywhere. Here everything was installed first,
# so a skip is a bug: each one is recorded in $ZC_SKIP_LOG (cargo shows
# nothing of a passing test), listed at the end, and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
skips=$(mktemp)
export ZC_SKIP_LOG=$skips
summary() {
    local status=$?
    if [ -s "$skips" ]; then
        echo "test.sh: FAILED: skipped tests ($(wc -l <"$skips"); what they need was installed, so each is a bug): $(sort "$skips" | paste -sd '|' | sed 's/|/; /g')" >&2
        status=1
    else
        echo "test.sh: no test skipped" >&2
    fi
    rm -f "$skips"
    exit "$status"
}
trap summary EXIT
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run zc-hostd from zc-host and the tools from zc:
# build every binary first.
cargo build --workspace --all-targets
cargo test --workspace
