#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, then the end-to-end suite (tests/,
# package kuasar-e2e) against a private containerd + kuasar-vmm + QEMU. Whatever the outcome,
# services and processes the run started are stopped at the end.
#
# Usage: scripts/test.sh          run everything (needs `make build guest images` first)
#        scripts/test.sh check    formatting and lints only
#        scripts/test.sh clean    stop every private test/demo/bench environment left behind
#
# Env: KUASAR_E2E_THREADS (default 1: the e2e tests count VMs, they run one at a time);
#      KUASAR_CONTAINERD (the containerd binary the e2e suite runs; default Debian's on PATH);
set -euo pipefail

# shellcheck source=scripts/lib-test-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-test-env.sh"
cd "$REPO_ROOT"

if ! command -v cargo >/dev/null; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
  done
fi

# e2e directories are /run/kuasar-e2e-<pid of the test binary>: stale once that pid is gone.
stale_e2e_dirs() {
  local d pid
  for d in /run/kuasar-e2e-*; do
    [ -d "$d" ] || continue
    pid=${d##*-}
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then continue; fi
    echo "$d"
  done
}

clean_stale() {
  local d
  for d in $(stale_e2e_dirs); do
    echo "test.sh: cleaning up $d" >&2
    "$REPO_ROOT/scripts/containerd.sh" stop "$d" || true
  done
}

# descendants PID: every process below PID (children first listed last).
descendants() {
  local parent=$1 p ppid
  for p in /proc/[0-9]*; do
    ppid=$(awk '{print $4}' "$p/stat" 2>/dev/null) || continue
    if [ "$ppid" = "$parent" ]; then
      descendants "${p#/proc/}"
      echo "${p#/proc/}"
    fi
  done
}

# ensure_component CARGO_SUBCOMMAND RUSTUP_COMPONENT: rustfmt and clippy, installed if missing.
ensure_component() {
  cargo "$1" --version >/dev/null 2>&1 && return 0
  if command -v rustup >/dev/null; then
    echo "test.sh: installing the rust component $2" >&2
    rustup component add "$2" >&2 || true
  fi
  cargo "$1" --version >/dev/null 2>&1 \
    || { echo "test.sh: 'cargo $1' is not available; install the rust component $2" >&2; exit 1; }
}

if [ "${1:-}" = clean ]; then
  for d in /run/kuasar-test /run/kuasar-demo /run/kuasar-bench /run/kuasar-e2e-*; do
    [ -d "$d" ] || continue
    "$REPO_ROOT/scripts/containerd.sh" stop "$d" || true
  done
  exit 0
fi
CHECK_ONLY=0
case ${1:-} in
  '') ;;
  check) CHECK_ONLY=1 ;;
  *) echo "usage: $0 [check|clean]" >&2; exit 2 ;;
esac
ensure_component fmt rustfmt
ensure_component clippy clippy

CHILD=""
on_exit() {
  local rc=$? p
  trap - EXIT INT TERM
  if [ -n "$CHILD" ] && alive "$CHILD"; then
    echo "test.sh: interrupted, stopping the test run (pid $CHILD)" >&2
    for p in $(descendants "$CHILD") "$CHILD"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 2
    for p in $(descendants "$CHILD") "$CHILD"; do kill -KILL "$p" 2>/dev/null || true; done
  fi
  clean_stale
  print_step_times
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run NAME CMD...: runs a step in the background so that a signal can stop it and its
# children, and notes its duration under NAME in target/step-times.
run() {
  local name=$1 rc=0
  shift
  echo "== $*" >&2
  scripts/timed.sh "$name" "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

# Where the time went: the steps of this run (and of make's, before it), at the very end.
print_step_times() {
  [ -s target/step-times ] || return 0
  echo "test.sh: step times:" >&2
  sed 's/^/  /' target/step-times >&2
  rm -f target/step-times
}

clean_stale
run fmt cargo fmt --all -- --check
run clippy cargo clippy --workspace --all-targets -- -D warnings
if [ "$CHECK_ONLY" = 1 ]; then exit 0; fi
run manifests deploy/check.sh
run installer deploy/installer/test-install.sh
run unit cargo test --workspace --exclude kuasar-e2e
# The e2e suite drives the release binaries.
run build cargo build --release --workspace --exclude kuasar-agent
# One test target at a time, each timed; a failing one does not stop the others.
start=$(date +%s)
failed=()
run e2e-lib cargo test -p kuasar-e2e --lib --bins || failed+=(lib)
for target in tests/tests/*.rs; do
  target=$(basename "$target" .rs)
  run "e2e $target" cargo test -p kuasar-e2e --test "$target" \
    -- --test-threads="${KUASAR_E2E_THREADS:-1}" || failed+=("$target")
done
# The CRI suite and the accounting test once more with a warm pool of 2 VMs: every pod of the
# kuasar handlers then starts from a pooled VM (tests/tests/pool.rs checks that it does).
for target in cri accounting; do
  run "e2e $target (pool)" env KUASAR_POOL_SIZE=2 cargo test -p kuasar-e2e --test "$target" \
    -- --test-threads="${KUASAR_E2E_THREADS:-1}" || failed+=("$target (pool)")
done
# Which containerd the e2e suite ran against; CI runs Debian's only, and says so.
containerd_bin=${KUASAR_CONTAINERD:-containerd}
echo "test.sh: e2e ran against containerd $("$containerd_bin" --version 2>/dev/null | awk '{print $3}') ($containerd_bin)" >&2
if [ -z "${KUASAR_CONTAINERD:-}" ]; then
  echo "test.sh: SKIPPED: other containerd releases (2.3.x, 2.4.x) were not run;" \
    "KUASAR_CONTAINERD=/path/to/containerd runs the suite against one (docs/testing.md)" >&2
fi
# kuasar-vmm.service under a booted systemd (prints SKIPPED with the reason where it cannot boot).
run systemd deploy/test-unit.sh || failed+=(systemd)
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test.sh: failed e2e targets: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all tests passed (e2e took $(( $(date +%s) - start )) s)" >&2
