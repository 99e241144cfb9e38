#!/usr/bin/env bash
# Start-up time and memory of kuasar-vmm containers, through a private containerd and a private
# kuasar-vmm (stopped at the end, also on failure), for each guest kernel side by side in one
# run: KUASAR_BENCH_KERNELS (files of the image dir; default "vmlinux vmlinux-debian", the
# project's kernel and Debian's); kuasar-vmm is restarted with `kernel = <file>` for each.
#   (a) wall time of `ctr run --rm --runtime io.containerd.kuasar-vmm.v2 busybox echo hello`
#   (b) guest boot to agent-ready, from the sandboxer's log (`agent ready ... boot_ms=N`)
#   (c) a bare QEMU boot of the same vmlinux, same machine options, with an initramfs whose
#       /init (busybox) writes a marker to the serial console: spawn to marker
#   (d) RSS and PSS (/proc/PID/smaps_rollup) of one shim, of kuasar-vmm with 3 VMs, of one
#       QEMU (an idle VM running one container), of one VM's virtiofsd (its two processes; the
#       PSS of the guest memory QEMU and virtiofsd both map is split between them, so the VM's
#       host cost is their sum); and the agent's own create + start time of those containers
#       (`container created/started ... elapsed_ms=N` on the guest console)
#   (e) through CRI, runc against kuasar-vmm (tests/src/bin/cri-bench.rs, its own private
#       environment, the default kernel): RunPodSandbox to ready, pod start to a container's
#       first log line, and the memory of the shims and of kuasar-vmm with 5 pods of each
#       running, and `kuasarctl list` with KUASAR_BENCH_CTL_PODS (default 20) pods running,
#       and warm start: the same with the VM pool off and with a pool of 5, a waiting pooled
#       VM's cost, 20 pods at once (skip all of (e) with KUASAR_BENCH_CRI=0)
# (a) to (d) again for the first kernel with `[qemu] confine = false`: what QEMU's confinement
# costs (column KERNEL+unconfined); with `[qemu] share = "9p"`, QEMU serving the share
# itself, no virtiofsd (column KERNEL+9p); and with a VM pool of 1 (column KERNEL+pool, warm
# start: each run waits until the pool is full again; its (b) is the take, its (c) the
# first column's).
# Medians of N runs (KUASAR_BENCH_RUNS, default 5); ratio (a)/(c), target <= 1.3; the first
# kernel against the last: (b) target <= 0.5x, one VM's QEMU + virtiofsd PSS target <= 0.6x.
# Needs `make build guest images`. Env: KUASAR_BENCH_DIR (default /run/kuasar-bench),
# KUASAR_BIN_DIR, KUASAR_IMAGE_DIR, KUASAR_BENCH_KERNELS.
set -euo pipefail

# shellcheck source=scripts/lib-test-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-test-env.sh"

DIR=${KUASAR_BENCH_DIR:-/run/kuasar-bench}
N=${KUASAR_BENCH_RUNS:-5}
IMAGE_DIR=${KUASAR_IMAGE_DIR:-/var/lib/kuasar}
RUNTIME=io.containerd.kuasar-vmm.v2
IMAGE=docker.io/library/busybox:latest
MARKER=KUASAR-BARE-BOOT-MARKER
QEMU_BIN=${KUASAR_QEMU:-/usr/bin/qemu-system-x86_64}
C=(ctr --address "$DIR/containerd.sock")

die() { echo "bench.sh: $*" >&2; exit 1; }
log() { echo "bench.sh: $*" >&2; }

read -r -a KERNELS <<< "${KUASAR_BENCH_KERNELS:-vmlinux vmlinux-debian}"
[ ${#KERNELS[@]} -gt 0 ] || die "KUASAR_BENCH_KERNELS names no kernel"
[ -x "$KUASAR_BIN_DIR/kuasar-vmm" ] || die "$KUASAR_BIN_DIR/kuasar-vmm missing (run: make build)"
[ -x "$KUASAR_BIN_DIR/containerd-shim-kuasar-vmm-v2" ] \
  || die "$KUASAR_BIN_DIR/containerd-shim-kuasar-vmm-v2 missing (run: make build)"
for k in "${KERNELS[@]}"; do
  [ -f "$IMAGE_DIR/$k" ] || die "$IMAGE_DIR/$k missing (run: make guest)"
done
[ -x "$QEMU_BIN" ] || die "$QEMU_BIN missing (run: make deps)"
command -v cpio >/dev/null || die "cpio missing (run: make deps)"
BUSYBOX=$(command -v busybox) || die "busybox missing (run: make deps)"

WORK=$(mktemp -d /tmp/kuasar-bench.XXXXXX)
QEMU_BARE=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$QEMU_BARE" ]; then kill -KILL "$QEMU_BARE" 2>/dev/null || true; fi
  "$REPO_ROOT/scripts/containerd.sh" stop "$DIR" >/dev/null 2>&1 || rc=1
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }
# mem PID FIELD: Rss or Pss of PID in kB.
mem() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo "-"; }
kb_to_mb() { awk -v k="$1" 'BEGIN {if (k == "-" || k == "") print "-"; else printf "%.1f", k / 1024}'; }
# ratio A B: A / B to two places, "-" when either is missing.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || a == "" || b == "-" || b == "" || b == 0) print "-"; else printf "%.2f", a / b}'; }
# verdict RATIO TARGET
verdict() { awk -v r="$1" -v t="$2" 'BEGIN {if (r == "-") print "n/a"; else if (r <= t) print "ok (target <= " t ")"; else print "ABOVE target " t}'; }

# --- the bare boot's initramfs: busybox as /init writes a marker to the serial console -------
bare=$WORK/bare
mkdir -p "$bare/bin" "$bare/dev" "$bare/proc"
cp "$BUSYBOX" "$bare/bin/busybox"
ln -s busybox "$bare/bin/sh"
cat > "$bare/init" <<INIT
#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
echo $MARKER > /dev/ttyS0
/bin/busybox poweroff -f
INIT
chmod 0755 "$bare/init"
(cd "$bare" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$WORK/bare.cpio"

# --- environment -----------------------------------------------------------------------------
"$REPO_ROOT/scripts/containerd.sh" start "$DIR" >&2
VMM_LOG=$DIR/kuasar-vmm.log

# Per kernel: medians, the raw runs, memory, the guest's release, the bare boot's options.
declare -A RUN BOOT BARE RUNS BOOTS BARES SHIM_RSS SHIM_PSS VMM_RSS VMM_PSS QEMU_RSS QEMU_PSS
declare -A VFSD_PSS HOST_PSS
declare -A CREATE_START CREATE_STARTS
declare -A RELEASE BARE_OPTS

# POOL_TAKES: how many pooled VMs the current kuasar-vmm handed out; 0 without a pool.
POOL_TAKES=""
# pool_wait: with a pool, waits until it is full again (one more "pooled VM ready" in the log
# than VMs taken) and counts the take that follows.
pool_wait() {
  [ -n "$POOL_TAKES" ] || return 0
  local i ready
  for ((i = 0; i < 600; i++)); do
    ready=$(sed 's/\x1b\[[0-9;]*m//g' "$VMM_LOG" | tail -c +"$((POOL_LOG_START + 1))" \
      | grep -c 'pooled VM ready' || true)
    [ "$ready" -gt "$POOL_TAKES" ] && break
    sleep 0.1
  done
  [ "$ready" -gt "$POOL_TAKES" ] || die "the pool did not refill within 60 s; see $VMM_LOG"
  POOL_TAKES=$((POOL_TAKES + 1))
}

# measure COLUMN: (a) to (d) with kuasar-vmm booting $IMAGE_DIR/KERNEL, where COLUMN is KERNEL,
# KERNEL+unconfined for the same with `[qemu] confine = false`, KERNEL+9p for the same with
# `[qemu] share = "9p"`, or KERNEL+pool with a pool of 1 (no bare boot: the first column's).
# Results are keyed by COLUMN.
measure() {
  local column=$1 kernel=${1%+*} confine=true share=virtio-fs pool="" i j id out t0 t1 offset
  case $column in
    *+unconfined) confine=false ;;
    *+9p) share=9p ;;
    *+pool) pool=1 ;;
  esac
  log "=== kernel $kernel, QEMU confined: $confine, share: $share, pool: ${pool:-0} ==="
  "$REPO_ROOT/scripts/sandboxer.sh" stop "$DIR" >&2
  POOL_LOG_START=$(stat -c %s "$VMM_LOG" 2>/dev/null || echo 0)
  KUASAR_KERNEL=$kernel KUASAR_CONFINE=$confine KUASAR_SHARE=$share KUASAR_POOL_SIZE=$pool \
    "$REPO_ROOT/scripts/sandboxer.sh" start "$DIR" >&2
  POOL_TAKES=${pool:+0}

  log "warm-up run"
  pool_wait
  out=$("${C[@]}" run --rm --runtime "$RUNTIME" "$IMAGE" "bench-warm-$$" uname -r) \
    || die "the warm-up ctr run failed; see $VMM_LOG"
  RELEASE[$column]=$out

  # (a) ctr run wall time, (b) boot_ms
  offset=$(stat -c %s "$VMM_LOG")
  local run_times=() boot_times=()
  for ((i = 1; i <= N; i++)); do
    pool_wait
    t0=$(now_ms)
    out=$(timeout 120 "${C[@]}" run --rm --runtime "$RUNTIME" "$IMAGE" "bench-$$-$i" echo hello) \
      || die "ctr run #$i failed"
    t1=$(now_ms)
    [ "$out" = hello ] || die "ctr run #$i printed '$out' instead of 'hello'"
    run_times+=($((t1 - t0)))
    log "ctr run #$i: $((t1 - t0)) ms"
  done
  mapfile -t boot_times < <(tail -c +"$((offset + 1))" "$VMM_LOG" | sed 's/\x1b\[[0-9;]*m//g' \
    | grep 'agent ready' | sed -n 's/.*boot_ms=\([0-9][0-9]*\).*/\1/p')
  [ "${#boot_times[@]}" -gt 0 ] || log "no 'agent ready ... boot_ms=N' lines in $VMM_LOG"

  # (d) memory with 3 VMs; the QEMU options for (c)
  local ids=() shims=() qemus=() vmm
  for i in 1 2 3; do
    id="bench-mem-$$-$i"
    pool_wait
    "${C[@]}" run -d --runtime "$RUNTIME" "$IMAGE" "$id" sleep 300 >/dev/null || die "ctr run -d $id failed"
    ids+=("$id")
  done
  for ((i = 0; i < 300; i++)); do
    [ "$("${C[@]}" tasks ls | grep -c ' RUNNING')" -ge 3 ] && break
    sleep 0.1
  done
  # Idle: the guest reports the pages it freed (free page reporting) 2 s after freeing them.
  sleep 3
  mapfile -t shims < <(pids_in_dir "$DIR" containerd-shim-kuasar-vmm-v2)
  # The first container's VM (with a pool, a refill may be booting next to it).
  local qpid
  qpid=$(pid_from_file "$DIR/vmm/${ids[0]}/qemu.pid") || die "no QEMU for ${ids[0]}"
  qemus=("$qpid")
  vmm=$(pid_from_file "$DIR/kuasar-vmm.pid") || die "kuasar-vmm is not running"
  [ -n "${shims[0]:-}" ] || die "no shim process found for $DIR"
  # The agent's own create + start time of each of these containers (its console log).
  local cs=() con c s
  for id in "${ids[@]}"; do
    con=$(sed 's/\x1b\[[0-9;]*m//g' "$DIR/vmm/$id/console.log" 2>/dev/null || true)
    c=$(sed -n 's/.*container created.*elapsed_ms=\([0-9][0-9]*\).*/\1/p' <<< "$con" | head -1)
    s=$(sed -n 's/.*container started.*elapsed_ms=\([0-9][0-9]*\).*/\1/p' <<< "$con" | head -1)
    [ -n "$c" ] && [ -n "$s" ] && cs+=("$((c + s))")
  done
  [ "${#cs[@]}" -gt 0 ] || log "no 'container created/started elapsed_ms=N' lines in the guests' consoles"
  CREATE_START[$column]=$(printf '%s\n' "${cs[@]}" | median); CREATE_STARTS[$column]="${cs[*]}"
  SHIM_RSS[$column]=$(mem "${shims[0]}" Rss); SHIM_PSS[$column]=$(mem "${shims[0]}" Pss)
  VMM_RSS[$column]=$(mem "$vmm" Rss); VMM_PSS[$column]=$(mem "$vmm" Pss)
  QEMU_RSS[$column]=$(mem "${qemus[0]}" Rss); QEMU_PSS[$column]=$(mem "${qemus[0]}" Pss)
  # virtiofsd: the first VM's (its pid file in the VM's directory) and its sandboxed child.
  local v c vfsd=0
  if [ "$share" = virtio-fs ]; then
    v=$(pid_from_file "$DIR/vmm/${ids[0]}/virtiofsd.pid") || die "no virtiofsd for ${ids[0]}"
    for c in "$v" $(cat "/proc/$v/task/$v/children" 2>/dev/null); do
      vfsd=$((vfsd + $(mem "$c" Pss)))
    done
  fi
  VFSD_PSS[$column]=$vfsd
  HOST_PSS[$column]=$(( ${QEMU_PSS[$column]:-0} + vfsd ))

  # The machine options the sandboxer used, for the bare boot.
  local machine="microvm,acpi=on" accel="tcg,tb-size=16" cpu="max" memory=256 smp=1 append=""
  local qargs=()
  mapfile -d '' qargs < "/proc/${qemus[0]}/cmdline"
  for ((i = 0; i < ${#qargs[@]} - 1; i++)); do
    case ${qargs[i]} in
      # The bare boot has no virtiofsd: plain guest memory, not the shared memfd.
      -machine) machine=${qargs[i + 1]/,memory-backend=mem/} ;;
      -accel) accel=${qargs[i + 1]} ;;
      -cpu) cpu=${qargs[i + 1]} ;;
      -m) memory=${qargs[i + 1]} ;;
      -smp) smp=${qargs[i + 1]} ;;
      -append) append=${qargs[i + 1]} ;;
    esac
  done
  for id in "${ids[@]}"; do
    "${C[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  for id in "${ids[@]}"; do
    for ((i = 0; i < 100; i++)); do
      "${C[@]}" tasks ls | grep -q "^$id .*RUNNING" || break
      sleep 0.1
    done
    "${C[@]}" tasks rm -f "$id" >/dev/null 2>&1 || true
    "${C[@]}" containers rm "$id" >/dev/null 2>&1 || true
  done

  RUN[$column]=$(printf '%s\n' "${run_times[@]}" | median)
  BOOT[$column]=$(printf '%s\n' "${boot_times[@]}" | grep . | median)
  RUNS[$column]="${run_times[*]}"
  BOOTS[$column]="${boot_times[*]:-none}"
  if [ -n "$pool" ]; then
    BARE[$column]=${BARE[$kernel]:-}; BARES[$column]="(those of $kernel)"
    BARE_OPTS[$column]="(those of $kernel)"
    return 0
  fi

  # (c) bare QEMU boot of the same kernel, with the command line the sandboxer used (else the
  # one of docs/design.md)
  if [ -z "$append" ]; then
    local khz
    khz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9]*\)\.\([0-9]*\) MHz.*/\1\2/p' | tail -1)
    append="console=ttyS0 quiet panic=-1 cryptomgr.notests${khz:+ tsc_early_khz=$khz}"
  fi
  local bare_times=() seen start line console
  for ((i = 1; i <= N; i++)); do
    # The console goes to a pipe that is read without polling (polling would steal CPU from
    # the emulated guest).
    t0=$(now_ms)
    coproc BARE_QEMU { exec "$QEMU_BIN" -name "kuasar-bench-bare-$i" -machine "$machine" \
      -accel "$accel" -cpu "$cpu" -m "$memory" -smp "$smp" -nodefaults -no-user-config \
      -nographic -no-reboot -kernel "$IMAGE_DIR/$kernel" -initrd "$WORK/bare.cpio" \
      -append "$append" -serial stdio </dev/null 2>"$WORK/qemu-$column-$i.log"; }
    QEMU_BARE=$BARE_QEMU_PID
    exec {console}<&"${BARE_QEMU[0]}"
    seen=0 start=$SECONDS
    while [ $((SECONDS - start)) -lt 60 ] && IFS= read -r -t 60 line <&"$console"; do
      echo "$line" >> "$WORK/console-$column-$i.log"
      if [[ $line == *"$MARKER"* ]]; then seen=1; break; fi
    done
    t1=$(now_ms)
    for ((j = 0; j < 200; j++)); do alive "$QEMU_BARE" || break; sleep 0.01; done
    kill -KILL "$QEMU_BARE" 2>/dev/null || true
    wait "$QEMU_BARE" 2>/dev/null || true
    exec {console}<&-
    QEMU_BARE=""
    [ "$seen" = 1 ] \
      || die "bare boot #$i of $kernel: no marker on the console (see $WORK/console-$kernel-$i.log)"
    bare_times+=($((t1 - t0)))
    log "bare boot #$i: $((t1 - t0)) ms"
  done

  BARE[$column]=$(printf '%s\n' "${bare_times[@]}" | median)
  BARES[$column]="${bare_times[*]}"
  BARE_OPTS[$column]="-machine $machine -accel $accel -cpu $cpu -m $memory -smp $smp -append '$append'"
}

# The first kernel once more with QEMU unconfined: what confinement costs; and with 9p.
COLUMNS=("${KERNELS[@]}" "${KERNELS[0]}+unconfined" "${KERNELS[0]}+9p" "${KERNELS[0]}+pool")
for k in "${COLUMNS[@]}"; do
  measure "$k"
done
# The CRI benchmark below starts its own environment.
"$REPO_ROOT/scripts/sandboxer.sh" stop "$DIR" >&2

# --- report: one column per kernel, and the first kernel unconfined ---------------------------
# row LABEL VALUE...
row() {
  printf '%-44s' "$1"
  shift
  local v
  for v in "$@"; do printf ' %18s' "$v"; done
  echo
}
# per ARRAY [mb|ms]: the array's value for each kernel, as one row's cells.
cells=()
per() {
  local -n arr=$1
  local k
  cells=()
  for k in "${COLUMNS[@]}"; do
    case ${2:-} in
      mb) cells+=("$(kb_to_mb "${arr[$k]}") MB") ;;
      ms) cells+=("${arr[$k]} ms") ;;
      *) cells+=("${arr[$k]}") ;;
    esac
  done
}
echo
echo "kuasar-vmm benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $N runs, medians)"
row "measure" "${COLUMNS[@]}"
per RELEASE; row "  uname -r in the guest" "${cells[@]}"
cells=(); for k in "${COLUMNS[@]}"; do cells+=("------------------"); done
row "--------------------------------------------" "${cells[@]}"
per RUN ms; row "(a) ctr run --rm ... echo hello (wall)" "${cells[@]}"
per BOOT ms; row "(b) guest boot to agent ready" "${cells[@]}"
per BARE ms; row "(c) bare QEMU boot to a busybox /init" "${cells[@]}"
cells=(); for k in "${COLUMNS[@]}"; do cells+=("$(ratio "${RUN[$k]}" "${BARE[$k]}")"); done
row "ratio (a) / (c) (target <= 1.3)" "${cells[@]}"
per CREATE_START ms; row "container create + start in the guest" "${cells[@]}"
per QEMU_RSS mb; row "one QEMU (idle, one container) RSS" "${cells[@]}"
per QEMU_PSS mb; row "one QEMU (idle, one container) PSS" "${cells[@]}"
per VFSD_PSS mb; row "its virtiofsd (2 processes) PSS" "${cells[@]}"
per HOST_PSS mb; row "one VM on the host: QEMU + virtiofsd PSS" "${cells[@]}"
per SHIM_RSS mb; row "one shim RSS" "${cells[@]}"
per SHIM_PSS mb; row "one shim PSS" "${cells[@]}"
per VMM_RSS mb; row "kuasar-vmm with 3 VMs running RSS" "${cells[@]}"
per VMM_PSS mb; row "kuasar-vmm with 3 VMs running PSS" "${cells[@]}"
if [ ${#KERNELS[@]} -ge 2 ]; then
  new=${KERNELS[0]} old=${KERNELS[${#KERNELS[@]} - 1]}
  echo
  r=$(ratio "${BOOT[$new]}" "${BOOT[$old]}")
  printf '%-44s %8s   %s\n' "(b) boot to agent ready, $new / $old" "$r" "$(verdict "$r" 0.5)"
  r=$(ratio "${HOST_PSS[$new]}" "${HOST_PSS[$old]}")
  printf '%-44s %8s   %s\n' "QEMU + virtiofsd PSS, $new / $old" "$r" "$(verdict "$r" 0.6)"
  r=$(ratio "${RUN[$new]}" "${RUN[$old]}")
  printf '%-44s %8s\n' "(a) ctr run, $new / $old" "$r"
fi
first=${KERNELS[0]} un="${KERNELS[0]}+unconfined"
r=$(ratio "${BOOT[$first]}" "${BOOT[$un]}")
printf '%-44s %8s\n' "(b) boot, QEMU confined / unconfined" "$r"
r=$(ratio "${RUN[$first]}" "${RUN[$un]}")
printf '%-44s %8s\n' "(a) ctr run, QEMU confined / unconfined" "$r"
r=$(ratio "${HOST_PSS[$first]}" "${HOST_PSS[$un]}")
printf '%-44s %8s\n' "QEMU + virtiofsd PSS, confined / unconfined" "$r"
nine="${KERNELS[0]}+9p"
r=$(ratio "${RUN[$first]}" "${RUN[$nine]}")
printf '%-44s %8s\n' "(a) ctr run, virtio-fs / 9p" "$r"
r=$(ratio "${HOST_PSS[$first]}" "${HOST_PSS[$nine]}")
printf '%-44s %8s\n' "QEMU + virtiofsd PSS, virtio-fs / 9p" "$r"
# The targets of a cold start and of a warm one (a pooled VM), side by side.
for k in "$first" "${KERNELS[0]}+pool"; do
  r=$(ratio "${RUN[$k]}" "${BARE[$k]}")
  printf '%-44s %8s   %s\n' "(a) / (c), $k" "$r" "$(verdict "$r" 1.3)"
  r=$(awk -v v="${CREATE_START[$k]}" 'BEGIN {if (v == "" || v == "-") print "-"; else printf "%.2f", v / 1000}')
  printf '%-44s %8s   %s\n' "create + start in the guest (s), $k" "$r" "$(verdict "$r" 0.1)"
done
echo
for k in "${COLUMNS[@]}"; do
  echo "$k: runs (a) ${RUNS[$k]}; (b) ${BOOTS[$k]}; (c) ${BARES[$k]}; create + start ${CREATE_STARTS[$k]}"
  echo "$k: bare boot ${BARE_OPTS[$k]}"
done

# --- (e) CRI: runc against kuasar-vmm -----------------------------------------------------------
if [ "${KUASAR_BENCH_CRI:-1}" != 0 ]; then
  if ! command -v cargo >/dev/null; then
    for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
      [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
    done
  fi
  log "building the CRI benchmark (tests/src/bin/cri-bench.rs)"
  (cd "$REPO_ROOT" && cargo build --quiet -p kuasar-e2e --bin cri-bench) >&2 \
    || die "building cri-bench failed"
  log "CRI benchmark"
  KUASAR_BENCH_RUNS=$N KUASAR_BIN_DIR=$KUASAR_BIN_DIR KUASAR_IMAGE_DIR=$IMAGE_DIR \
    "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/cri-bench" || die "the CRI benchmark failed"
fi
