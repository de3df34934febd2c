#!/bin/bash
# Runs every zc test on a fresh Debian machine, as root: installs what is
# missing (scripts/setup.sh), then checks formatting and lints and runs the
# whole workspace's tests, including the multi-process ones.
#   sudo scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run zc-hostd from zc-host and the tools from zc:
# build every binary first.
cargo build --workspace --all-targets
cargo test --workspace
