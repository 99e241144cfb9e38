#!/usr/bin/env bash
# Builds the guest image into OUTDIR (default /var/lib/kuasar), idempotently:
#   vmlinux          the project's own guest kernel (the default): built by
#                    scripts/build-kernel.sh from Debian's linux-source-6.1 and
#                    guest/kernel/microvm.config, everything built in (cached by hash)
#   kernel-release   vmlinux's release string (uname -r in its guests)
#   vmlinux-debian   the ELF kernel extracted from Debian's /boot/vmlinuz-<release> (cached):
#                    the fallback, chosen with `kernel = "vmlinux-debian"` in kuasar-vmm's config
#   vmlinux-debian.release  its release string
#   initramfs.cpio   uncompressed newc: /init (static kuasar-agent), /usr/bin/crun (the
#                    guest's OCI runtime, static: scripts/build-crun.sh), /bin/busybox (static,
#                    busybox-static) with its applets linked in /bin (the tools of `kuasarctl exec`,
#                    a debug command in the guest), Debian's kernel's modules (for the fallback; the
#                    agent loads only the running kernel's), and /etc/kuasar/modules (load order)
#   virtiofsd        the host daemon serving each VM's shared directory over virtio-fs
#                    (scripts/build-virtiofsd.sh, cached); kuasar-vmm runs it from here
# Debian's kernel is the newest installed one that has /lib/modules/<release>.
# Needs the packages of scripts/install-deps.sh, and cargo. Run as root.
# Every file lands in OUTDIR by rename(2) of a finished temporary file in OUTDIR, so a VM
# booting meanwhile reads either the old or the new file, never a partial one.
set -euo pipefail

OUTDIR=${1:-/var/lib/kuasar}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=x86_64-unknown-linux-gnu
# The modules the guest loads, in order (dependencies are added by modprobe). The agent
# channel's come first: the agent serves as soon as its channel shows up, while the rest
# load. (The agent itself moves the vsock ones first with kuasar.channel=vsock:<port>.)
# The agent loads everything up to the shared directory's file systems (9p, virtiofs) before
# it reports the guest ready (containers and SetupSandbox wait for that), the rest at idle priority: virtio_net is in the first part,
# as the pod's NIC must exist when SetupSandbox configures it (the agent loads it there only
# when the VM has a virtio NIC, otherwise with the rest).
MODULES=(virtio_ring virtio virtio_mmio virtio_console vmw_vsock_virtio_transport
         virtio_net netfs fscache 9pnet 9pnet_virtio 9p fuse virtiofs overlay
         virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (device nodes in the initramfs)"
for tool in cpio modprobe xz zstd gzip readelf ldd; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
if ! command -v cargo >/dev/null; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
  done
fi
command -v cargo >/dev/null || die "cargo not found"

# --- kernel release: newest /boot/vmlinuz-* with a /lib/modules dir ---------------------
RELEASE=""
while read -r rel; do
  [ -d "/lib/modules/$rel" ] && RELEASE=$rel
done < <(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V)
[ -n "$RELEASE" ] || die "no /boot/vmlinuz-<release> with /lib/modules/<release> (install linux-image-amd64)"
VMLINUZ=/boot/vmlinuz-$RELEASE
log "Debian kernel $RELEASE (fallback)"
mkdir -p "$OUTDIR"

# --- the project's kernel: built or found in the cache (progress on stderr) ------------
log "guest kernel: scripts/build-kernel.sh"
KDIR=$("$ROOT/scripts/build-kernel.sh") || die "building the guest kernel failed"
OWN_RELEASE=$(cat "$KDIR/kernel-release")
OWN_STAMP="build-kernel $(basename "$KDIR")"

# --- virtiofsd: built or found in the cache ---------------------------------------------
log "virtiofsd: scripts/build-virtiofsd.sh"
VIRTIOFSD=$("$ROOT/scripts/build-virtiofsd.sh") || die "building virtiofsd failed"

# Temporary files live in OUTDIR (same file system, so mv is a rename) and go on exit.
STAGE=$(mktemp -d)
VMLINUX_TMP="" OWN_TMP="" CPIO_TMP=""
trap 'rm -rf "$STAGE"; rm -f ${VMLINUX_TMP:+"$VMLINUX_TMP"} ${OWN_TMP:+"$OWN_TMP"} ${CPIO_TMP:+"$CPIO_TMP"}' EXIT
# put NAME CONTENT: replaces the small file OUTDIR/NAME whole.
put() {
  local tmp
  tmp=$(mktemp "$OUTDIR/.$1.XXXXXX")
  printf '%s\n' "$2" > "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$OUTDIR/$1"
}

# --- agent: static ---------------------------------------------------------------------
log "building kuasar-agent (static, release)"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet -p kuasar-agent --target "$TARGET")
AGENT=$ROOT/target/$TARGET/release/kuasar-agent
[ -x "$AGENT" ] || die "agent binary missing at $AGENT"
if readelf -l "$AGENT" | grep -q 'program interpreter'; then
  die "$AGENT is dynamically linked"
fi

# --- vmlinux: the project's kernel, copied next to OUTDIR's files first ----------------
if [ -s "$OUTDIR/vmlinux" ] && [ "$(cat "$OUTDIR/vmlinux.source" 2>/dev/null)" = "$OWN_STAMP" ]; then
  log "vmlinux up to date ($OWN_RELEASE)"
else
  OWN_TMP=$(mktemp "$OUTDIR/.vmlinux.XXXXXX")
  cp "$KDIR/vmlinux" "$OWN_TMP"
  chmod 0644 "$OWN_TMP"
fi

# --- vmlinux-debian: decompress the payload of Debian's bzImage (cached) ---------------
stamp="$RELEASE $(stat -c '%s %Y' "$VMLINUZ")"
if [ -s "$OUTDIR/vmlinux-debian" ] &&
   [ "$(cat "$OUTDIR/vmlinux-debian.source" 2>/dev/null)" = "$stamp" ]; then
  log "vmlinux-debian up to date"
else
  log "extracting vmlinux from $VMLINUZ"
  VMLINUX_TMP=$(mktemp "$OUTDIR/.vmlinux-debian.XXXXXX")
  tmp=$VMLINUX_TMP
  found=0
  # magic (grep -P) : decompressor
  for entry in '\x1f\x8b\x08:gzip -dc' '\xfd\x37\x7a\x58\x5a\x00:xz -dc' \
               '\x28\xb5\x2f\xfd:zstd -dcq' '\x02\x21\x4c\x18:lz4 -dc' 'BZh:bzip2 -dc' \
               '\x5d\x00\x00:unlzma -c'; do
    magic=${entry%%:*} cmd=${entry#*:}
    command -v "${cmd%% *}" >/dev/null || continue
    for off in $(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1); do
      # Trailing data after the stream makes the decompressor complain: keep its output.
      tail -c +"$((off + 1))" "$VMLINUZ" | $cmd > "$tmp" 2>/dev/null || true
      if [ "$(head -c 4 "$tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        found=1; break 2
      fi
    done
  done
  [ $found = 1 ] || die "no ELF kernel found inside $VMLINUZ"
  chmod 0644 "$VMLINUX_TMP"
fi

# --- initramfs ---------------------------------------------------------------------------
mkdir -p "$STAGE"/{dev,proc,sys,run,tmp,etc/kuasar,usr/bin}
mknod -m 600 "$STAGE/dev/console" c 5 1
mknod -m 666 "$STAGE/dev/null" c 1 3
install -m 0755 "$AGENT" "$STAGE/init"

# crun, the agent's OCI runtime: the project's static build (scripts/build-crun.sh, cached).
# Should that build fail (no deb-src reachable, say), Debian's crun with the libraries (and
# loader) it is linked against, at the paths ldd names: slower by ~35 ms a call, but working.
if CRUN=$("$ROOT/scripts/build-crun.sh"); then
  CRUN_KIND="static"
  install -m 0755 "$CRUN" "$STAGE/usr/bin/crun"
else
  log "WARNING: no static crun (see above); the guest gets Debian's dynamically linked crun"
  CRUN=$(readlink -f /usr/bin/crun)
  CRUN_KIND="Debian's, dynamic"
  [ -x "$CRUN" ] || die "crun not found (apt-get install crun)"
  install -m 0755 "$CRUN" "$STAGE/usr/bin/crun"
  ldd_out=$(ldd "$CRUN") || die "ldd $CRUN failed"
  ! grep -q 'not found' <<< "$ldd_out" || die "$CRUN has unresolved libraries: $ldd_out"
  libs=$(grep -oE '/[^ ]+' <<< "$ldd_out" | sort -u)
  [ -n "$libs" ] || die "ldd found no libraries for $CRUN"
  for lib in $libs; do
    [ -e "$lib" ] || die "$CRUN needs $lib, which is missing"
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
  done
fi

# busybox, static, its applets linked in /bin: the tools `kuasarctl exec` runs in the guest,
# outside every container (sh, ps, cat, ls, ip, ...). Nothing in the guest runs it otherwise.
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || die "busybox not found (run: make deps, it installs busybox-static)"
if readelf -l "$BUSYBOX" | grep -q 'program interpreter'; then
  die "$BUSYBOX is dynamically linked: install busybox-static (make deps)"
fi
mkdir -p "$STAGE/bin"
install -m 0755 "$BUSYBOX" "$STAGE/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  case $applet in ''|busybox|*/*) continue ;; esac
  [ -e "$STAGE/bin/$applet" ] || ln -s busybox "$STAGE/bin/$applet"
done

# Kernel modules with their dependencies, in load order, decompressed.
: > "$STAGE/etc/kuasar/modules"
declare -A seen=()
for m in "${MODULES[@]}"; do
  deps=$(modprobe -S "$RELEASE" --show-depends "$m") || die "module $m not found for $RELEASE"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue          # "builtin <name>" needs nothing
    dest=${path%.xz}; dest=${dest%.zst}; dest=${dest%.gz}
    [ -n "${seen[$dest]:-}" ] && continue
    seen[$dest]=1
    mkdir -p "$STAGE$(dirname "$dest")"
    case $path in
      *.ko.xz) xz -dc "$path" > "$STAGE$dest" ;;
      *.ko.zst) zstd -dcq "$path" > "$STAGE$dest" ;;
      *.ko.gz) gzip -dc "$path" > "$STAGE$dest" ;;
      *) cp "$path" "$STAGE$dest" ;;
    esac
    echo "$dest" >> "$STAGE/etc/kuasar/modules"
  done <<< "$deps"
done

# Fixed timestamps make the archive reproducible (and the update check meaningful).
find "$STAGE" -exec touch -h -d @0 {} +
CPIO_TMP=$(mktemp "$OUTDIR/.initramfs.XXXXXX")
(cd "$STAGE" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) > "$CPIO_TMP"
chmod 0644 "$CPIO_TMP"

# --- install: renames only, kernels and initramfs back to back -------------------------
if [ -n "$VMLINUX_TMP" ]; then
  mv -f "$VMLINUX_TMP" "$OUTDIR/vmlinux-debian"
  VMLINUX_TMP=""
  put vmlinux-debian.source "$stamp"
fi
put vmlinux-debian.release "$RELEASE"
if [ -n "$OWN_TMP" ]; then
  mv -f "$OWN_TMP" "$OUTDIR/vmlinux"
  OWN_TMP=""
  put vmlinux.source "$OWN_STAMP"
fi
if cmp -s "$CPIO_TMP" "$OUTDIR/initramfs.cpio"; then
  log "initramfs.cpio unchanged"
else
  mv -f "$CPIO_TMP" "$OUTDIR/initramfs.cpio"
  CPIO_TMP=""
fi
put kernel-release "$OWN_RELEASE"
if ! cmp -s "$VIRTIOFSD" "$OUTDIR/virtiofsd"; then
  tmp=$(mktemp "$OUTDIR/.virtiofsd.XXXXXX")
  install -m 0755 "$VIRTIOFSD" "$tmp"
  mv -f "$tmp" "$OUTDIR/virtiofsd"
fi

size() { du -h --apparent-size "$1" | cut -f1; }
echo "guest image in $OUTDIR:"
echo "  vmlinux         $(size "$OUTDIR/vmlinux")  $OWN_RELEASE, the default (from $KDIR)"
echo "  vmlinux-debian  $(size "$OUTDIR/vmlinux-debian")  $RELEASE, the fallback (from $VMLINUZ)"
echo "  initramfs.cpio  $(size "$OUTDIR/initramfs.cpio")  (agent $(size "$AGENT"), crun $(size "$CRUN") $CRUN_KIND, busybox $(size "$BUSYBOX"), $(wc -l < "$STAGE/etc/kuasar/modules") modules of $RELEASE)"
echo "  kernel-release  $OWN_RELEASE"
echo "  virtiofsd       $(size "$OUTDIR/virtiofsd")  (from $VIRTIOFSD)"
