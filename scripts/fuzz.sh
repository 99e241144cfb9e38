#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (its own cargo workspace) for SECONDS each, one after
# the other, with the checked-in seeds (fuzz/seeds/<target>) and a growing corpus
# (fuzz/corpus/<target>, not checked in). A crash stops the script with libFuzzer's report;
# the reproducer is in fuzz/artifacts/<target>/.
#
# Usage: scripts/fuzz.sh [SECONDS]     (default 600)
# Env:   FUZZ_TARGETS="agent_proto config"  run only these targets
#        FUZZ_JOBS=2                        run this many targets at once (default 1)
#
# The stable toolchain is enough: cargo-fuzz needs nightly-only flags (-Zsanitizer), which
# RUSTC_BOOTSTRAP=1 unlocks on a stable rustc.
set -euo pipefail

SECONDS_EACH=${1:-600}
case $SECONDS_EACH in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2 && exit 2 ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

if ! command -v cargo >/dev/null; then
  PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
jobs=${FUZZ_JOBS:-1}
cargo fuzz build

run() {
  local t=$1
  mkdir -p "corpus/$t"
  echo "== $t for ${SECONDS_EACH}s"
  cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
}

pids=()
status=0
for t in $targets; do
  run "$t" &
  pids+=("$!")
  if [ "${#pids[@]}" -ge "$jobs" ]; then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
