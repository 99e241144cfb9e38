#!/usr/bin/env bash
# Runs a build or test step and notes how long it took in target/step-times, which
# scripts/test.sh prints at its end (so that a CI log's tail tells where the time went).
#
# Usage: scripts/timed.sh NAME CMD [ARG...]
set -uo pipefail
name=$1
shift
times=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/step-times
start=$(date +%s)
"$@"
rc=$?
mkdir -p "$(dirname "$times")"
printf '%-12s %5d s%s\n' "$name" "$(( $(date +%s) - start ))" \
  "$([ "$rc" = 0 ] || echo " (exit $rc)")" >>"$times"
exit "$rc"
