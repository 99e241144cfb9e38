#!/usr/bin/env bash
# Start-up time and memory of kuasar-vmm containers, through a private containerd and a private
# kuasar-vmm (stopped at the end, also on failure):
#   (a) wall time of `ctr run --rm --runtime io.containerd.kuasar-vmm.v2 busybox echo hello`
#   (b) guest boot to agent-ready, from the sandboxer's log (`agent ready ... boot_ms=N`)
#   (c) a bare QEMU boot of the same vmlinux, same machine options, with an initramfs whose
#       /init (busybox) writes a marker to the serial console: spawn to marker
#   (d) RSS and PSS (/proc/PID/smaps_rollup) of one shim, of kuasar-vmm with 3 VMs, of one QEMU
#   (e) through CRI, runc against kuasar-vmm (tests/src/bin/cri-bench.rs, its own private
#       environment): RunPodSandbox to ready, pod start to a container's first log line, and
#       the memory of the shims and of kuasar-vmm with 5 pods of each running
#       (skip with KUASAR_BENCH_CRI=0)
# Medians of N runs (KUASAR_BENCH_RUNS, default 5); ratio (a)/(c), target <= 1.3.
# Needs `make build guest images`. Env: KUASAR_BENCH_DIR (default /run/kuasar-bench),
# KUASAR_BIN_DIR, KUASAR_IMAGE_DIR.
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

[ -x "$KUASAR_BIN_DIR/kuasar-vmm" ] || die "$KUASAR_BIN_DIR/kuasar-vmm missing (run: make build)"
[ -x "$KUASAR_BIN_DIR/containerd-shim-kuasar-vmm-v2" ] \
  || die "$KUASAR_BIN_DIR/containerd-shim-kuasar-vmm-v2 missing (run: make build)"
[ -f "$IMAGE_DIR/vmlinux" ] || die "$IMAGE_DIR/vmlinux missing (run: make guest)"
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

# --- environment -----------------------------------------------------------------------------
"$REPO_ROOT/scripts/containerd.sh" start "$DIR" >&2
"$REPO_ROOT/scripts/sandboxer.sh" start "$DIR" >&2
VMM_LOG=$DIR/kuasar-vmm.log

log "warm-up run"
"${C[@]}" run --rm --runtime "$RUNTIME" "$IMAGE" "bench-warm-$$" echo hello >/dev/null \
  || die "the warm-up ctr run failed; see $VMM_LOG"

# --- (a) ctr run wall time, (b) boot_ms ----------------------------------------------------------
offset=$(stat -c %s "$VMM_LOG")
run_times=()
for ((i = 1; i <= N; i++)); do
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

# --- (d) memory with 3 VMs; the QEMU options for (c) ---------------------------------------------
ids=()
for i in 1 2 3; do
  id="bench-mem-$$-$i"
  "${C[@]}" run -d --runtime "$RUNTIME" "$IMAGE" "$id" sleep 300 >/dev/null || die "ctr run -d $id failed"
  ids+=("$id")
done
for ((i = 0; i < 300; i++)); do
  [ "$("${C[@]}" tasks ls | grep -c ' RUNNING')" -ge 3 ] && break
  sleep 0.1
done
sleep 1
mapfile -t shims < <(pids_in_dir "$DIR" containerd-shim-kuasar-vmm-v2)
mapfile -t qemus < <(pids_in_dir "$DIR" qemu-system-x86_64)
vmm=$(pid_from_file "$DIR/kuasar-vmm.pid") || die "kuasar-vmm is not running"
[ -n "${qemus[0]:-}" ] || die "no QEMU process found for $DIR"
[ -n "${shims[0]:-}" ] || die "no shim process found for $DIR"
shim_rss=$(mem "${shims[0]}" Rss); shim_pss=$(mem "${shims[0]}" Pss)
vmm_rss=$(mem "$vmm" Rss); vmm_pss=$(mem "$vmm" Pss)
qemu_rss=$(mem "${qemus[0]}" Rss); qemu_pss=$(mem "${qemus[0]}" Pss)

# The machine options the sandboxer used, for the bare boot.
machine="microvm,acpi=on" accel="tcg,tb-size=16" cpu="max" memory=256 smp=1 append=""
mapfile -d '' qargs < "/proc/${qemus[0]}/cmdline"
for ((i = 0; i < ${#qargs[@]} - 1; i++)); do
  case ${qargs[i]} in
    -machine) machine=${qargs[i + 1]} ;;
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

# --- (c) bare QEMU boot ------------------------------------------------------------------------
# The guest kernel command line the sandboxer used (else the one of docs/design.md).
if [ -z "$append" ]; then
  khz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9]*\)\.\([0-9]*\) MHz.*/\1\2/p' | tail -1)
  append="console=ttyS0 quiet panic=-1 cryptomgr.notests${khz:+ tsc_early_khz=$khz}"
fi
bare=$WORK/bare
mkdir -p "$bare/bin" "$bare/dev" "$bare/proc"
cp "$BUSYBOX" "$bare/bin/busybox"
ln -s busybox "$bare/bin/sh"
cat > "$bare/init" <<EOF
#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
echo $MARKER > /dev/ttyS0
/bin/busybox poweroff -f
EOF
chmod 0755 "$bare/init"
(cd "$bare" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$WORK/bare.cpio"

bare_times=()
for ((i = 1; i <= N; i++)); do
  # The console goes to a pipe that is read without polling (polling would steal CPU from
  # the emulated guest).
  t0=$(now_ms)
  coproc BARE { exec "$QEMU_BIN" -name "kuasar-bench-bare-$i" -machine "$machine" \
    -accel "$accel" -cpu "$cpu" -m "$memory" -smp "$smp" -nodefaults -no-user-config \
    -nographic -no-reboot -kernel "$IMAGE_DIR/vmlinux" -initrd "$WORK/bare.cpio" \
    -append "$append" -serial stdio </dev/null 2>"$WORK/qemu-$i.log"; }
  QEMU_BARE=$BARE_PID
  exec {console}<&"${BARE[0]}"
  seen=0 start=$SECONDS
  while [ $((SECONDS - start)) -lt 60 ] && IFS= read -r -t 60 line <&"$console"; do
    echo "$line" >> "$WORK/console-$i.log"
    if [[ $line == *"$MARKER"* ]]; then seen=1; break; fi
  done
  t1=$(now_ms)
  for ((j = 0; j < 200; j++)); do alive "$QEMU_BARE" || break; sleep 0.01; done
  kill -KILL "$QEMU_BARE" 2>/dev/null || true
  wait "$QEMU_BARE" 2>/dev/null || true
  exec {console}<&-
  QEMU_BARE=""
  [ "$seen" = 1 ] || die "bare boot #$i: no marker on the console (see $WORK/console-$i.log, $WORK/qemu-$i.log)"
  bare_times+=($((t1 - t0)))
  log "bare boot #$i: $((t1 - t0)) ms"
done

# --- report ------------------------------------------------------------------------------------
run_med=$(printf '%s\n' "${run_times[@]}" | median)
boot_med=$(printf '%s\n' "${boot_times[@]}" | grep . | median)
bare_med=$(printf '%s\n' "${bare_times[@]}" | median)
ratio=$(awk -v a="$run_med" -v b="$bare_med" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}')
verdict=$(awk -v r="$ratio" 'BEGIN {if (r == "-") print "n/a"; else if (r <= 1.3) print "ok (target <= 1.3)"; else print "ABOVE target 1.3"}')

echo
echo "kuasar-vmm benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, accel ${accel%%,*}, $N runs, medians)"
printf '%-52s %12s\n' "measure" "value"
printf '%-52s %12s\n' "----------------------------------------------------" "------------"
printf '%-52s %9s ms   (%s)\n' "(a) ctr run --rm ... echo hello (wall)" "$run_med" "${run_times[*]}"
printf '%-52s %9s ms   (%s)\n' "(b) guest boot to agent ready (sandboxer log)" "$boot_med" "${boot_times[*]:-none}"
printf '%-52s %9s ms   (%s)\n' "(c) bare QEMU boot, spawn to console marker" "$bare_med" "${bare_times[*]}"
printf '%-52s %12s   %s\n' "ratio (a) / (c)" "$ratio" "$verdict"
echo "bare boot: -machine $machine -accel $accel -cpu $cpu -m $memory -smp $smp -append '$append'"
echo
printf '%-34s %10s %10s\n' "memory" "RSS MB" "PSS MB"
printf '%-34s %10s %10s\n' "----------------------------------" "----------" "----------"
printf '%-34s %10s %10s\n' "one shim" "$(kb_to_mb "$shim_rss")" "$(kb_to_mb "$shim_pss")"
printf '%-34s %10s %10s\n' "kuasar-vmm with 3 VMs running" "$(kb_to_mb "$vmm_rss")" "$(kb_to_mb "$vmm_pss")"
printf '%-34s %10s %10s\n' "one QEMU (${memory} MiB guest)" "$(kb_to_mb "$qemu_rss")" "$(kb_to_mb "$qemu_pss")"

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
