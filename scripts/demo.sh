#!/usr/bin/env bash
# Demo: one busybox container in its own microVM, through a private containerd and a private
# kuasar-vmm (nothing of the node's own containerd is touched). Everything it starts is
# stopped at the end, also on failure or Ctrl-C.
# Needs `make build guest images` (`make demo` does all of it).
# Env: KUASAR_DEMO_DIR (default /run/kuasar-demo), KUASAR_BIN_DIR, KUASAR_IMAGE_DIR.
set -euo pipefail

# shellcheck source=scripts/lib-test-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-test-env.sh"

DIR=${KUASAR_DEMO_DIR:-/run/kuasar-demo}
RUNTIME=io.containerd.kuasar-vmm.v2
IMAGE=docker.io/library/busybox:latest

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  echo "demo: stopping the private containerd and kuasar-vmm ($DIR)"
  "$REPO_ROOT/scripts/containerd.sh" stop "$DIR" >/dev/null || rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$REPO_ROOT/scripts/containerd.sh" start "$DIR"
"$REPO_ROOT/scripts/sandboxer.sh" start "$DIR"

id=demo-$RANDOM$RANDOM
echo "demo: ctr run --rm --runtime $RUNTIME $IMAGE $id sh -c 'echo \"hello from the guest: \$(uname -r)\"'"
t0=$(date +%s%N)
# shellcheck disable=SC2016 # $(uname -r) is for the guest's shell
if ! out=$(timeout 120 ctr --address "$DIR/containerd.sock" run --rm --runtime "$RUNTIME" \
    "$IMAGE" "$id" sh -c 'echo "hello from the guest: $(uname -r)"' 2>&1); then
  echo "$out"
  echo "demo: ctr run failed; last lines of $DIR/kuasar-vmm.log:" >&2
  tail -n 20 "$DIR/kuasar-vmm.log" >&2 || true
  exit 1
fi
t1=$(date +%s%N)
echo
echo "$out"
echo "hello from the host:  $(uname -r)"
echo
echo "demo: ctr run took $(( (t1 - t0) / 1000000 )) ms (VM boot included)"
