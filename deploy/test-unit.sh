#!/usr/bin/env bash
# Runs deploy/kuasar-vmm.service, unchanged, under a real systemd: a Debian 12 container booted
# with systemd-nspawn (systemd 252 as its PID 1), with the built binaries, the guest image and
# a containerd of its own inside. It shows, and checks:
#   - Type=notify: `systemctl start kuasar-vmm` returns once kuasar-vmm has recovered and bound
#     its socket (its "recovery done" and "kuasar-vmm ready" lines are older than systemd's
#     ActiveEnterTimestamp, and kuasarctl answers at the first try right after the start);
#   - KillMode=process: a VM (a `ctr run` container, podsandbox mode) keeps its QEMU process
#     across `systemctl restart kuasar-vmm`, and across a crash of kuasar-vmm that systemd
#     restarts by itself (Restart=always); each new kuasar-vmm adopts it ("recovery done
#     adopted=1") and the container still runs and answers an exec;
#   - the journal: `journalctl -u kuasar-vmm` holds the logs of every run, readable as text;
#   - the hardening: kuasar-vmm and its QEMU run with NoNewPrivs and a UTS namespace of their own.
# Nothing of the node is used: the container has its own network namespace, /run, containerd,
# kuasar-vmm and state; its root is a cached debootstrap tree under an overlay that vanishes
# with it. Everything (container, VMs, cgroups, the work directory) is gone when the script
# exits, whatever the outcome.
#
# Usage: deploy/test-unit.sh        (root; after `make build guest images`)
# Prints "test-unit: SKIPPED: <why>" and exits 0 when this machine cannot boot a systemd
# container; fails (exit 1) on anything else.
#
# The container's root: debootstrap of bookworm (minbase + systemd, QEMU, procps) cached in
# $KUASAR_SYSTEMD_ROOT_CACHE (default /var/cache/kuasar/systemd-root/<hash of the recipe>).
# Its first creation downloads about 70 MB from the Debian mirror of
# /etc/apt/sources.list.d/debian.sources and takes a few minutes; later runs reuse it.
#
# Env: KUASAR_BIN_DIR (default <repo>/target/release), KUASAR_IMAGE_DIR (default
#      /var/lib/kuasar; mounted read-only), KUASAR_TEST_IMAGES (default $KUASAR_IMAGE_DIR/images),
#      KUASAR_SYSTEMD_ROOT_CACHE, KUASAR_UNIT_TEST_KEEP=1 (leave the work directory: the container's console
#      and its whole journal, for diagnosis).
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN_DIR=${KUASAR_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}
IMAGE_DIR=${KUASAR_IMAGE_DIR:-/var/lib/kuasar}
TEST_IMAGES=${KUASAR_TEST_IMAGES:-$IMAGE_DIR/images}
CACHE=${KUASAR_SYSTEMD_ROOT_CACHE:-/var/cache/kuasar/systemd-root}
UNIT=$HERE/kuasar-vmm.service
VMM_CONFIG=$HERE/installer/kuasar-vmm.toml
MACHINE=kuasar-unit-$$
CTR_ID=unit-test
BUSYBOX=docker.io/library/busybox:latest
RUNTIME=io.containerd.kuasar-vmm.v2

# The container's root filesystem: changing any of these makes a new cache entry.
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,qemu-system-x86,procps
# Units of no use in a test container (a getty on the console, periodic jobs).
MASK="console-getty.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer"
RECIPE="v1 debootstrap --variant=minbase --include=$PACKAGES $SUITE $(dpkg --print-architecture); mask $MASK"

T0=$(date +%s%N)
say() { printf 'test-unit: [%5.1fs] %s\n' "$(( ($(date +%s%N) - T0) / 1000000 ))e-3" "$*" >&2; }
ok() { say "ok: $*"; }
skip() { echo "test-unit: SKIPPED: $*" >&2; exit 0; }
fail() {
  echo "test-unit: FAIL: $*" >&2
  diagnostics
  exit 1
}

[ "$(id -u)" = 0 ] || { echo "test-unit: FAIL: must run as root" >&2; exit 1; }
need() { command -v "$1" >/dev/null || { echo "test-unit: FAIL: $1 not found ($2)" >&2; exit 1; }; }
need systemd-nspawn "Debian package systemd-container: run make deps"
need debootstrap "Debian package debootstrap: run make deps"
need containerd "run make deps"
need ctr "run make deps"
need nsenter "util-linux"
for f in kuasar-vmm containerd-shim-kuasar-vmm-v2 kuasarctl; do
  [ -x "$BIN_DIR/$f" ] || { echo "test-unit: FAIL: $BIN_DIR/$f not found (run: make build)" >&2; exit 1; }
done
for f in "$IMAGE_DIR/vmlinux" "$IMAGE_DIR/initramfs.cpio"; do
  [ -f "$f" ] || { echo "test-unit: FAIL: $f not found (run: make guest)" >&2; exit 1; }
done
[ -f "$TEST_IMAGES/busybox.tar" ] \
  || { echo "test-unit: FAIL: $TEST_IMAGES/busybox.tar not found (run: make images)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/kuasar-unit-test.XXXXXX)
NSPAWN_PID=""
LEADER=""
CGROUPS=()

# --- the cached root ------------------------------------------------------------------------

mirror() {
  local uris
  uris=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "${uris:-http://deb.debian.org/debian}"
}

# root_tree: prints the cached root of $RECIPE, making it first if needed.
root_tree() {
  local key root tmp start u
  key=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
  root=$CACHE/$key
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -f "$root/.complete" ]; then
    tmp=$root.tmp.$$
    # (under the lock: a .tmp.* is what an interrupted run left)
    rm -rf --one-file-system "$root" "$root".tmp.*
    start=$(date +%s)
    say "making the container root $root ($RECIPE) from $(mirror): a download of ~70 MB, a few minutes"
    if ! timeout 1200 debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$(mirror)" \
      >"$WORK/debootstrap.log" 2>&1; then
      tail -n 20 "$WORK/debootstrap.log" >&2
      rm -rf --one-file-system "$tmp"
      fail "debootstrap failed (log above)"
    fi
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    echo kuasar-unit-test > "$tmp/etc/hostname"
    for u in $MASK; do ln -sf /dev/null "$tmp/etc/systemd/system/$u"; done
    echo "$RECIPE" > "$tmp/.complete"
    mv "$tmp" "$root"
    say "container root ready in $(( $(date +%s) - start )) s ($(du -sh "$root" | cut -f1))"
  fi
  exec 9>&-
  echo "$root"
}

# --- the container --------------------------------------------------------------------------

# ct CMD...: runs CMD inside the container (all of its namespaces), bounded to 120 s.
ct() {
  timeout 120 nsenter --target "$LEADER" --all -- env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 TERM=dumb "$@"
}
prop() { ct systemctl show -P "$2" "$1"; }

# own_cgroups: without a systemd on the host nspawn cannot get a scope of its own: it would
# fill the root of the host's hierarchies. Give it (this shell's child) a private cgroup.
own_cgroups() {
  local d
  [ -d /run/systemd/system ] && return 0
  for d in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
    # /sys/fs/cgroup itself only where it is the cgroup2 hierarchy (no v1 controllers).
    [ "$d" != /sys/fs/cgroup ] || [ "$(stat -fc %T "$d")" = cgroup2fs ] || continue
    [ -w "$d/cgroup.procs" ] || continue
    mkdir -p "$d/$MACHINE" && CGROUPS+=("$d/$MACHINE")
  done
}

boot() {
  local root=$1 args=() i
  args=(--quiet --register=no --machine="$MACHINE" --directory="$root" --volatile=overlay
        --private-network
        --bind-ro="$BIN_DIR/kuasar-vmm:/usr/local/bin/kuasar-vmm"
        --bind-ro="$BIN_DIR/containerd-shim-kuasar-vmm-v2:/usr/local/bin/containerd-shim-kuasar-vmm-v2"
        --bind-ro="$BIN_DIR/kuasarctl:/usr/local/bin/kuasarctl"
        --bind-ro="$(command -v containerd):/usr/local/bin/containerd"
        --bind-ro="$(command -v ctr):/usr/local/bin/ctr"
        --bind-ro="$IMAGE_DIR:/var/lib/kuasar"
        --bind-ro="$TEST_IMAGES:/var/lib/kuasar-test-images"
        --bind-ro="$UNIT:/etc/systemd/system/kuasar-vmm.service"
        --bind-ro="$VMM_CONFIG:/etc/kuasar/kuasar-vmm.toml"
        --bind-ro="$WORK/containerd.toml:/etc/containerd/config.toml"
        --tmpfs=/var/lib/containerd
        --boot)
  [ -d /run/systemd/system ] || args=(--keep-unit "${args[@]}")
  cat >"$WORK/containerd.toml" <<'EOF'
# The container's containerd: defaults (root /var/lib/containerd, state /run/containerd,
# socket /run/containerd/containerd.sock), no CRI (the test uses ctr).
version = 3
disabled_plugins = ['io.containerd.grpc.v1.cri', 'io.containerd.cri.v1.runtime',
                    'io.containerd.cri.v1.images', 'io.containerd.nri.v1.nri']
EOF
  own_cgroups
  (
    local c
    for c in "${CGROUPS[@]}"; do echo "$BASHPID" > "$c/cgroup.procs"; done
    exec systemd-nspawn "${args[@]}" </dev/null >"$WORK/console.log" 2>&1
  ) &
  NSPAWN_PID=$!
  for ((i = 0; i < 300; i++)); do
    LEADER=$(ps -o pid= --ppid "$NSPAWN_PID" 2>/dev/null | head -1 | tr -d ' ' || true)
    if [ -n "$LEADER" ] && [ "$(cat "/proc/$LEADER/comm" 2>/dev/null)" = systemd ]; then break; fi
    LEADER=""
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$LEADER" ]; then
    wait "$NSPAWN_PID" 2>/dev/null || true
    NSPAWN_PID=""
    skip "this machine cannot boot a systemd container (systemd-nspawn -b of $root): $(tail -n 5 "$WORK/console.log" | tr '\n' ' ')"
  fi
  PIDNS=$(readlink "/proc/$LEADER/ns/pid")
  local state
  # (is-system-running --wait needs D-Bus, which this minimal root does not have.)
  for ((i = 0; i < 600; i++)); do
    state=$(ct systemctl is-system-running 2>&1) || true
    case $state in initializing|starting|offline|*"Failed to connect"*) sleep 0.1 ;; *) break ;; esac
  done
  case $state in
    running) ;;
    degraded) say "container booted degraded: $(ct systemctl --failed --no-legend --plain | tr '\n' ' ')" ;;
    *) skip "systemd in the container did not finish booting ($state): $(tail -n 5 "$WORK/console.log" | tr '\n' ' ')" ;;
  esac
}

diagnostics() {
  [ -n "$LEADER" ] || return 0
  echo "--- journalctl -u kuasar-vmm (last 40)" >&2
  ct journalctl -u kuasar-vmm -n 40 --no-pager -a >&2 2>&1 || true
  echo "--- journalctl -u containerd (last 20)" >&2
  ct journalctl -u containerd -n 20 --no-pager -a >&2 2>&1 || true
  echo "--- processes in the container" >&2
  ct ps -eo pid,ppid,stat,args --cols 200 >&2 2>&1 || true
}

# pids_in_container: pids (host view) of every process in the container's pid namespace.
pids_in_container() {
  local p
  [ -n "${PIDNS:-}" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$PIDNS" ] && echo "${p#/proc/}"
  done
  return 0
}

cleanup() {
  local rc=$? i d left
  trap - EXIT INT TERM
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    if [ -n "$LEADER" ] && [ "${KUASAR_UNIT_TEST_KEEP:-0}" = 1 ]; then
      ct journalctl -a -o short-iso --no-pager >"$WORK/container-journal" 2>&1 || true
    fi
    if [ -n "$LEADER" ]; then
      # The VM first, through containerd, so that kuasar-vmm removes its files and mounts.
      ct ctr tasks kill -s SIGKILL "$CTR_ID" >/dev/null 2>&1 || true
      ct ctr tasks rm -f "$CTR_ID" >/dev/null 2>&1 || true
      ct ctr containers rm "$CTR_ID" >/dev/null 2>&1 || true
    fi
    # SIGTERM: nspawn asks the container's systemd to power off; then SIGKILL its PID 1,
    # which takes every process of its pid namespace (QEMU included) with it.
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
      echo "test-unit: the container did not power off in 15 s; killing it" >&2
      if [ -n "$LEADER" ]; then kill -KILL "$LEADER" 2>/dev/null || true; fi
      kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    fi
    wait "$NSPAWN_PID" 2>/dev/null || true
  fi
  for ((i = 0; i < 50; i++)); do
    left=$(pids_in_container)
    [ -z "$left" ] && break
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  [ -z "$left" ] || echo "test-unit: processes of the container still alive: $left" >&2
  for ((i = ${#CGROUPS[@]} - 1; i >= 0; i--)); do
    find "${CGROUPS[$i]}" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "${CGROUPS[$i]}" ] && echo "test-unit: could not remove cgroup ${CGROUPS[$i]}" >&2
  done
  # nspawn leaves this directory when /run is not a tmpfs (it refuses to remove a disk tree).
  rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null || true
  if [ "${KUASAR_UNIT_TEST_KEEP:-0}" = 1 ]; then
    echo "test-unit: work directory kept: $WORK" >&2
  else
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
# Any other failing command: say which (set -E: in functions too).
set -E
trap 'echo "test-unit: FAIL: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
trap 'echo "test-unit: interrupted" >&2; exit 130' INT
trap 'echo "test-unit: terminated" >&2; exit 143' TERM

# --- checks ---------------------------------------------------------------------------------

# usecs TIME: microseconds since the epoch of a date(1)-readable time.
usecs() { date -u -d "$1" +%s%6N; }

# log_line PID TEXT: kuasar-vmm's (pid PID, container view) first journal line with TEXT;
# waits up to 10 s for journald to have read it.
log_line() {
  local pid=$1 text=$2 line="" i
  for ((i = 0; i < 100; i++)); do
    line=$(ct journalctl -u kuasar-vmm "_PID=$pid" -o cat --no-pager -a | grep -F -m1 -- "$text" || true)
    [ -n "$line" ] && break
    sleep 0.1
  done
  [ -n "$line" ] || fail "no line '$text' in the journal of kuasar-vmm pid $pid"
  [[ $line != *$'\e'* ]] || fail "kuasar-vmm writes terminal escapes into the journal: $(printf '%q' "$line")"
  echo "$line"
}

# check_ready_after HOW PID: the unit is active with main pid PID; kuasar-vmm's own log lines
# "recovery done" and "kuasar-vmm ready" were written before systemd saw it ready; kuasarctl
# answers at once. Prints the "recovery done" line.
check_ready_after() {
  local how=$1 pid=$2 state main enter start rec ready t_enter t_rec t_ready
  state=$(prop kuasar-vmm ActiveState)/$(prop kuasar-vmm SubState)
  [ "$state" = active/running ] || fail "after $how: kuasar-vmm is $state"
  main=$(prop kuasar-vmm MainPID)
  [ "$main" = "$pid" ] || fail "after $how: MainPID $main, expected $pid"
  # Straight away, once: a READY=1 sent before the socket is served would fail here.
  ct kuasarctl list >"$WORK/list" 2>&1 || fail "after $how: kuasarctl list failed: $(cat "$WORK/list")"
  enter=$(ct systemctl show -P ActiveEnterTimestamp --timestamp=us+utc kuasar-vmm)
  start=$(ct systemctl show -P ExecMainStartTimestamp --timestamp=us+utc kuasar-vmm)
  rec=$(log_line "$pid" "recovery done")
  ready=$(log_line "$pid" "kuasar-vmm ready")
  t_enter=$(usecs "$enter")
  t_rec=$(usecs "${rec%% *}")
  t_ready=$(usecs "${ready%% *}")
  # shellcheck disable=SC2015 # fail exits
  [ "$t_rec" -le "$t_ready" ] && [ "$t_ready" -le "$t_enter" ] \
    || fail "after $how: systemd saw kuasar-vmm ready at $enter, its log says recovery done at ${rec%% *}, ready at ${ready%% *}"
  say "  ExecMainStartTimestamp=$start"
  say "  log: $rec"
  say "  log: $ready"
  say "  ActiveEnterTimestamp=$enter (ready $(( t_enter - t_ready ))us after the log line; StatusText=$(prop kuasar-vmm StatusText))"
  echo "$rec"
}

# starttime PID: field 22 of /proc/PID/stat in the container (same process across checks).
starttime() { ct cat "/proc/$1/stat" 2>/dev/null | awk '{print $22}'; }

check_vm_kept() {
  local how=$1 vmm=$2 born=$3 list got out
  [ "$(starttime "$vmm")" = "$born" ] || fail "after $how: QEMU (pid $vmm) is gone"
  list=$(ct kuasarctl list -o json)
  got=$(jq -r --arg id "$CTR_ID" '.[] | select(.id == $id) | "\(.state) \(.vmm_pid)"' <<<"$list")
  [ "$got" = "running $vmm" ] || fail "after $how: kuasarctl list says '$got' for $CTR_ID: $list"
  out=$(ct ctr tasks ls | awk -v id="$CTR_ID" '$1 == id {print $3}')
  [ "$out" = RUNNING ] || fail "after $how: containerd says the task is '$out'"
  out=$(ct ctr tasks exec --exec-id "probe-$RANDOM" "$CTR_ID" echo still here 2>&1) \
    || fail "after $how: exec in the adopted VM failed: $out"
  [ "$out" = "still here" ] || fail "after $how: exec printed '$out'"
}

# --- the test -------------------------------------------------------------------------------

ROOT=$(root_tree)
boot "$ROOT"
ok "container $MACHINE booted: $(ct systemctl --version | head -1), PID 1 of its own pid namespace ($PIDNS)"

# The shipped unit, as installed.
for p in LoadState=loaded FragmentPath=/etc/systemd/system/kuasar-vmm.service Type=notify KillMode=process Restart=always Delegate=yes; do
  v=$(prop kuasar-vmm "${p%%=*}")
  [ "$v" = "${p#*=}" ] || fail "kuasar-vmm.service: ${p%%=*}=$v, expected ${p#*=}"
done
ok "kuasar-vmm.service loaded from deploy/kuasar-vmm.service (Type=notify KillMode=process Restart=always)"

# 1. Start: systemctl returns once READY=1 came, after recovery.
t=$(date +%s%N)
ct systemctl start kuasar-vmm || fail "systemctl start kuasar-vmm failed"
say "systemctl start kuasar-vmm returned after $(( ($(date +%s%N) - t) / 1000000 )) ms"
PID1=$(prop kuasar-vmm MainPID)
rec=$(check_ready_after "systemctl start" "$PID1")
[[ $rec == *"adopted=0"* ]] || fail "first start: expected adopted=0: $rec"
ok "Type=notify: start returned after recovery and bind (pid $PID1)"

# 2. A VM through the node's own path: containerd (a unit of its own) and a ctr container.
ct systemd-run --quiet --unit=containerd --description="containerd (test)" \
  /usr/local/bin/containerd --config /etc/containerd/config.toml || fail "could not start containerd"
for ((i = 0; i < 100; i++)); do ct ctr version >/dev/null 2>&1 && break; sleep 0.2; done
ct ctr version >/dev/null 2>&1 || fail "containerd does not answer"
ct ctr images import --local /var/lib/kuasar-test-images/busybox.tar >/dev/null \
  || fail "could not import busybox"
t=$(date +%s%N)
out=$(ct ctr run -d --runtime "$RUNTIME" "$BUSYBOX" "$CTR_ID" sleep 3600 2>&1) \
  || fail "ctr run failed: $out"
list=$(ct kuasarctl list -o json)
VMM=$(jq -r --arg id "$CTR_ID" '.[] | select(.id == $id and .state == "running") | .vmm_pid' <<<"$list")
[[ $VMM =~ ^[0-9]+$ ]] || fail "no running sandbox $CTR_ID: $list"
[ "$(ct cat "/proc/$VMM/comm")" = qemu-system-x86 ] || fail "pid $VMM is not QEMU"
BORN=$(starttime "$VMM")
cg=$(ct cat "/proc/$VMM/cgroup" | awk -F: '$2 == "name=systemd" || $1 == "0" {print $3; exit}')
say "VM up in $(( ($(date +%s%N) - t) / 1000000 )) ms: QEMU pid $VMM, cgroup $cg"
[[ $cg == */kuasar-vmm.service ]] || fail "QEMU is not in kuasar-vmm.service's cgroup: $cg"
ok "a VM runs under kuasar-vmm.service (QEMU pid $VMM in the unit's cgroup)"
# The unit's hardening reaches kuasar-vmm and the QEMU it starts.
for p in "$PID1" "$VMM"; do
  nnp=$(ct awk '$1 == "NoNewPrivs:" {print $2}' "/proc/$p/status")
  [ "$nnp" = 1 ] || fail "pid $p: NoNewPrivs $nnp, expected 1 (NoNewPrivileges=yes)"
done
[ "$(ct readlink /proc/"$VMM"/ns/uts)" != "$(ct readlink /proc/1/ns/uts)" ] \
  || fail "QEMU shares the host name namespace (ProtectHostname=yes)"
ok "hardening: NoNewPrivs=1 for kuasar-vmm and QEMU, a UTS namespace of the unit's own"

# 3. systemctl restart: only the main process goes; the VM stays and is adopted.
t=$(date +%s%N)
ct systemctl restart kuasar-vmm || fail "systemctl restart kuasar-vmm failed"
say "systemctl restart kuasar-vmm returned after $(( ($(date +%s%N) - t) / 1000000 )) ms"
PID2=$(prop kuasar-vmm MainPID)
[ "$PID2" != "$PID1" ] || fail "restart: MainPID did not change ($PID1)"
ct kill -0 "$PID1" 2>/dev/null && fail "restart: the old kuasar-vmm (pid $PID1) still runs"
rec=$(check_ready_after "systemctl restart" "$PID2")
[[ $rec == *"adopted=1"* ]] || fail "restart: expected adopted=1: $rec"
check_vm_kept "systemctl restart" "$VMM" "$BORN"
ok "KillMode=process: systemctl restart kept QEMU pid $VMM; kuasar-vmm pid $PID2 adopted it"

# 4. A crash: systemd restarts kuasar-vmm (Restart=always, RestartSec=1); the VM stays.
ct systemctl kill --kill-who=main --signal=SIGKILL kuasar-vmm
for ((i = 0; i < 200; i++)); do
  PID3=$(prop kuasar-vmm MainPID)
  [ "$PID3" != 0 ] && [ "$PID3" != "$PID2" ] && [ "$(prop kuasar-vmm ActiveState)" = active ] && break
  sleep 0.1
done
if [ "$PID3" = 0 ] || [ "$PID3" = "$PID2" ]; then fail "kuasar-vmm was not restarted after SIGKILL"; fi
[ "$(prop kuasar-vmm NRestarts)" = 1 ] || fail "NRestarts=$(prop kuasar-vmm NRestarts), expected 1"
rec=$(check_ready_after "a crash (SIGKILL)" "$PID3")
[[ $rec == *"adopted=1"* ]] || fail "after the crash: expected adopted=1: $rec"
check_vm_kept "a crash (SIGKILL)" "$VMM" "$BORN"
ok "Restart=always: after SIGKILL systemd started pid $PID3 (NRestarts=1), which adopted QEMU pid $VMM"

# 5. The journal: every run's lines, as text.
ct journalctl -u kuasar-vmm -o short-iso --no-pager >"$WORK/journal"
if grep -q $'\e' "$WORK/journal"; then
  fail "kuasar-vmm's journal holds terminal escapes: $(grep -m1 $'\e' "$WORK/journal" | cat -v)"
fi
for p in "$PID1" "$PID2" "$PID3"; do
  grep -q "kuasar-vmm\[$p\]: .*kuasar-vmm ready" "$WORK/journal" \
    || fail "the journal has no 'kuasar-vmm ready' of pid $p"
done
grep -q "kuasar-vmm\[$PID1\]: .*shutting down; VMs keep running" "$WORK/journal" \
  || fail "the journal has no shutdown line of pid $PID1"
say "journalctl -u kuasar-vmm (kuasar-vmm's recovery/ready lines and systemd's):"
grep -E 'recovery done|re-adopted|kuasar-vmm ready|shutting down|systemd\[1\]: ' "$WORK/journal" \
  | sed 's/^/    /' >&2
ok "the journal holds the logs of all three runs (pids $PID1 $PID2 $PID3)"

# 6. Teardown through containerd: the VM goes, nothing is left.
ct ctr tasks kill -s SIGKILL "$CTR_ID" >/dev/null 2>&1 || fail "ctr tasks kill failed"
for ((i = 0; i < 100; i++)); do
  [ "$(ct ctr tasks ls | awk -v id="$CTR_ID" '$1 == id {print $3}')" = STOPPED ] && break
  sleep 0.1
done
ct ctr tasks rm -f "$CTR_ID" >/dev/null 2>&1 || fail "ctr tasks rm failed"
ct ctr containers rm "$CTR_ID" >/dev/null || fail "ctr containers rm failed"
for ((i = 0; i < 100; i++)); do [ -z "$(starttime "$VMM")" ] && break; sleep 0.1; done
[ -z "$(starttime "$VMM")" ] || fail "QEMU pid $VMM still runs after the container was removed"
ct systemctl stop kuasar-vmm containerd
[ "$(prop kuasar-vmm ActiveState)" = inactive ] || fail "kuasar-vmm did not stop"
ok "container removed: its QEMU exited; kuasar-vmm stopped"
say "PASS"
