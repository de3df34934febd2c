#!/bin/bash
# Runs the two-thread ring tests of the host export and the guest driver
# under ThreadSanitizer: the ring indices are the only synchronisation
# between the two sides, so a data race reported in them means the indices
# are not the atomics the memory model asks for. Needs a nightly toolchain
# (`cargo +nightly`, with its TSan runtime); std is not instrumented, so
# reports inside libtest's own machinery are left out.
#   scripts/tsan-rings.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "tsan-rings: needs a nightly toolchain (cargo +nightly); none here" >&2
  exit 1
fi
target=$(rustc -vV | sed -n 's/^host: //p')
dir=${CARGO_TARGET_DIR:-target}/tsan
export RUSTFLAGS="-Zsanitizer=thread -Cunsafe-allow-abi-mismatch=sanitizer"
fail=0
for t in "zc-host export_and_driver_on_two_threads" "zc-guest driver_and_device_on_two_threads"; do
  set -- $t
  bin=$(cargo +nightly test -p "$1" --lib --target "$target" --target-dir "$dir" --no-run \
    --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  log=$(mktemp)
  # TSan exits non-zero for any report, libtest's included: judge the log.
  "$bin" "$2" --test-threads 1 >"$log" 2>&1 || true
  if ! grep -q '^test result: ok. 1 passed' "$log"; then
    cat "$log"; fail=1
  fi
  races=$(grep '^SUMMARY: ThreadSanitizer' "$log" | grep -v 'test::event' || true)
  if [ -n "$races" ]; then
    echo "tsan-rings: $1 $2:"; echo "$races"; fail=1
  else
    echo "tsan-rings: $1 $2: no data race"
  fi
  rm -f "$log"
done
exit $fail
