# shellcheck shell=bash
# Helpers shared by scripts/containerd.sh, scripts/sandboxer.sh and the demo/test/bench
# scripts: everything a private test environment directory (DIR) owns is found by its
# path, so cleaning up never touches the node's own containerd, shims or VMs.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The release binaries (kuasar-vmm, containerd-shim-kuasar-vmm-v2): $KUASAR_BIN_DIR, else the
# cargo target dir's release/.
KUASAR_BIN_DIR=${KUASAR_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}

# check_dir DIR: refuses paths a cleanup must never remove.
check_dir() {
  local dir=$1
  case $dir in
    /*) ;;
    *) echo "$(basename "$0"): DIR must be an absolute path, got '$dir'" >&2; return 1 ;;
  esac
  case ${dir%/} in
    ''|/|/run|/var|/var/lib|/tmp|/home|/root|/usr|/etc)
      echo "$(basename "$0"): refusing to use '$dir' as a private test directory" >&2
      return 1 ;;
  esac
}

# pids_in_dir DIR NAME...: pids of processes whose executable name is one of NAMEs and whose
# command line mentions DIR/ (or whose environment carries KUASAR_TEST_DIR=DIR).
pids_in_dir() {
  local dir=${1%/}; shift
  local p cmd exe name env
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    [ -n "$cmd" ] || continue
    exe=${cmd%% *}
    exe=${exe##*/}
    for name in "$@"; do
      if [ "$exe" = "$name" ]; then
        if [[ $cmd == *"$dir/"* || $cmd == *" $dir "* ]]; then
          echo "${p#/proc/}"
        else
          env=$(tr '\0' '\n' 2>/dev/null <"$p/environ" || true)
          if grep -qxF "KUASAR_TEST_DIR=$dir" <<<"$env"; then echo "${p#/proc/}"; fi
        fi
        break
      fi
    done
  done
}

# kill_in_dir DIR SIGNAL NAME...: signals the processes pids_in_dir finds; prints their count.
kill_in_dir() {
  local dir=$1 sig=$2; shift 2
  local pids n=0 p
  mapfile -t pids < <(pids_in_dir "$dir" "$@")
  for p in "${pids[@]}"; do
    [ -n "$p" ] || continue
    kill "-$sig" "$p" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

# alive PID: true while PID runs (and is not a zombie).
alive() {
  local state
  [ -r "/proc/$1/stat" ] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# stop_pid PID [GRACE_SECS]: SIGTERM, then SIGKILL after GRACE_SECS (default 5).
stop_pid() {
  local pid=$1 grace=${2:-5} i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  echo "$(basename "$0"): pid $pid ignored SIGTERM for ${grace}s, sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
}

# kill_leftovers DIR NAME...: SIGKILLs the named processes mentioning DIR, waits (bounded).
kill_leftovers() {
  local dir=$1; shift
  local n i
  n=$(kill_in_dir "$dir" KILL "$@")
  [ "$n" = 0 ] && return 0
  echo "$(basename "$0"): killed $n leftover process(es) ($*) of $dir" >&2
  for ((i = 0; i < 50; i++)); do
    [ -z "$(pids_in_dir "$dir" "$@")" ] && return 0
    sleep 0.1
  done
  echo "$(basename "$0"): processes of $dir still alive after SIGKILL: $(pids_in_dir "$dir" "$@" | tr '\n' ' ')" >&2
}

# unmount_under DIR: unmounts every mount at or below DIR, deepest/newest first.
unmount_under() {
  local dir=${1%/}
  local mounts m i
  for ((i = 0; i < 3; i++)); do
    mapfile -t mounts < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' \
      /proc/self/mountinfo | tac)
    [ "${#mounts[@]}" -gt 0 ] && [ -n "${mounts[0]}" ] || return 0
    for m in "${mounts[@]}"; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null \
        || echo "$(basename "$0"): cannot unmount $m" >&2
    done
  done
}

# pid_from_file FILE: the pid recorded in FILE if that process is alive.
pid_from_file() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && echo "$pid"
}
