#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s each) with cargo-fuzz (libFuzzer),
# on the stable toolchain without a sanitizer. A crash stops the script and leaves its
# input under fuzz/artifacts/<target>/: turn it into a regression test.
# usage: scripts/fuzz.sh [seconds-per-target] [target...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"; shift || true
targets=("${@:-request template teacher_sse}")
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scripts/fetch-models.sh all >/dev/null   # the template target renders the real templates
for t in ${targets[@]}; do
  echo "== fuzzing $t for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --release "$t" -- -max_total_time="$secs" -max_len=4096
done
echo "fuzzing clean: ${targets[*]} for ${secs}s each"
