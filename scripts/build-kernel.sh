#!/usr/bin/env bash
# Builds the kuasar guest kernel (an ELF vmlinux with the PVH entry that QEMU's microvm boots)
# from Debian's kernel source package and guest/kernel/microvm.config, or finds it built.
#
#   scripts/build-kernel.sh            prints the directory holding the result on stdout:
#                                      vmlinux, kernel-release, config
#
# The configuration is `make allnoconfig` with the fragment's values (merge_config.sh -n):
# every option the fragment does not ask for, or that none of its options selects, is off.
# The result is cached under $KUASAR_KERNEL_CACHE (default /var/cache/kuasar/kernel) in
# <hash>/, the hash covering the source package's version, the fragment and the recipe
# below: a second run with the same inputs builds nothing. The source is unpacked once per
# package version into src/, and built out of tree in build/ (kept, so a changed fragment
# rebuilds only what it changes). Progress goes to stderr; the full build log to
# <cache>/build.log. Needs the packages of scripts/install-deps.sh (linux-source-6.1,
# build-essential, bc, bison, flex, libelf-dev, libssl-dev). Run as root.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${KUASAR_KERNEL_CACHE:-/var/cache/kuasar/kernel}
FRAGMENT=${KUASAR_KERNEL_FRAGMENT:-$ROOT/guest/kernel/microvm.config}
SRC_PKG=linux-source-6.1
TARBALL=/usr/src/$SRC_PKG.tar.xz
JOBS=$(nproc)
# Everything besides the source and the fragment that changes what gets built: part of
# the cache key. Bump the first word when the steps below change their output.
RECIPE="v2 merge_config.sh-n(allnoconfig+fragment) olddefconfig target=vmlinux arch=x86_64"
export ARCH=x86_64
export KBUILD_BUILD_USER=kuasar KBUILD_BUILD_HOST=kuasar

log() { echo "build-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }
started=$(date +%s)
elapsed() { local s=$(($(date +%s) - started)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

[ -f "$FRAGMENT" ] || die "no configuration fragment at $FRAGMENT"
[ -f "$TARBALL" ] || die "$TARBALL missing (apt-get install $SRC_PKG, or run scripts/install-deps.sh)"
for tool in make gcc bc bison flex xz tar readelf sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
version=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null) || die "$SRC_PKG is not installed"
hash=$( { echo "$SRC_PKG $version"; echo "$RECIPE"; cat "$FRAGMENT"; } | sha256sum | cut -c1-16)
OUT=$CACHE/$hash

if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/kernel-release" ]; then
  log "cached: $OUT ($(cat "$OUT/kernel-release"), $SRC_PKG $version)"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
# One build at a time per cache (make guest run twice at once waits here).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another kernel build holds $CACHE/.lock; waiting"
  flock 9
fi
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/kernel-release" ]; then
  log "cached: $OUT (built meanwhile)"
  echo "$OUT"
  exit 0
fi

log "building the guest kernel: $SRC_PKG $version, $(basename "$FRAGMENT") (key $hash), $JOBS jobs"

# --- source: unpacked once per package version ---------------------------------------
SRC=$CACHE/src/$SRC_PKG-$version
if [ ! -f "$SRC/.unpacked" ]; then
  log "[1/5] unpacking $TARBALL ($(du -h "$TARBALL" | cut -f1)) into $SRC"
  rm -rf "$SRC" "$SRC.tmp"
  mkdir -p "$SRC.tmp"
  tar -xJf "$TARBALL" -C "$SRC.tmp" --strip-components=1
  touch "$SRC.tmp/.unpacked"
  mv "$SRC.tmp" "$SRC"
  # Older unpacked versions are of no further use.
  find "$CACHE/src" -mindepth 1 -maxdepth 1 ! -path "$SRC" -exec rm -rf {} +
else
  log "[1/5] source already unpacked in $SRC"
fi

# --- configuration ---------------------------------------------------------------------
BUILD=$CACHE/build
if [ "$(cat "$BUILD/.source" 2>/dev/null)" != "$SRC" ]; then
  rm -rf "$BUILD"
fi
mkdir -p "$BUILD"
echo "$SRC" > "$BUILD/.source"
LOGFILE=$CACHE/build.log
: > "$LOGFILE"
log "[2/5] configuring: allnoconfig + $(grep -c '^CONFIG_\|^# CONFIG_' "$FRAGMENT") options from the fragment"
# merge_config.sh -n: `make allnoconfig` with the fragment as KCONFIG_ALLCONFIG, so that every
# option the fragment does not name is off, also those its options make visible.
{
  (cd "$SRC" && scripts/kconfig/merge_config.sh -n -O "$BUILD" "$FRAGMENT")
  make -C "$SRC" O="$BUILD" olddefconfig
} >> "$LOGFILE" 2>&1 || { tail -n 30 "$LOGFILE" >&2; die "configuration failed (log: $LOGFILE)"; }

# Every option the fragment asks for must have survived olddefconfig (Kconfig silently
# drops a value whose dependencies are not met).
log "[3/5] checking the configuration against the fragment"
missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    opt=${BASH_REMATCH[1]}
    grep -qxF "$line" "$BUILD/.config" || missing+=("$opt (wanted ${BASH_REMATCH[2]}, got $(grep -E "^$opt=|^# $opt is not set" "$BUILD/.config" || echo unset))")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    opt=${BASH_REMATCH[1]}
    ! grep -q "^$opt=" "$BUILD/.config" || missing+=("$opt (wanted off, got $(grep "^$opt=" "$BUILD/.config"))")
  fi
done < "$FRAGMENT"
if [ ${#missing[@]} -gt 0 ]; then
  log "the configuration lacks ${#missing[@]} option(s) of $FRAGMENT (unmet dependencies or unknown names):"
  printf '  %s\n' "${missing[@]}" >&2
  die "fix the fragment"
fi

# --- build ---------------------------------------------------------------------------
log "[4/5] compiling vmlinux with $JOBS jobs (a few minutes; full output in $LOGFILE)"
count=0
set +e
make -C "$SRC" O="$BUILD" -j"$JOBS" vmlinux 2>&1 | tee -a "$LOGFILE" | while IFS= read -r line; do
  case $line in
    *' CC '*|*' AS '*|*' LD '*|*' AR '*) count=$((count + 1))
      if [ $((count % 250)) = 0 ]; then log "  $count objects built ($(elapsed)): ${line##* }"; fi ;;
    *error:*|*Error\ *) echo "$line" >&2 ;;
  esac
done
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { tail -n 40 "$LOGFILE" >&2; die "kernel build failed (log: $LOGFILE)"; }

# --- result ------------------------------------------------------------------------------
log "[5/5] checking and caching the result"
release=$(make -s -C "$SRC" O="$BUILD" kernelrelease)
vmlinux=$BUILD/vmlinux
[ "$(head -c 4 "$vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] || die "$vmlinux is not an ELF file"
# QEMU boots an ELF kernel through its PVH entry note (Xen's PHYS32_ENTRY).
readelf -n "$vmlinux" | grep -q 'Xen' || die "$vmlinux has no PVH entry note (CONFIG_PVH)"
TMP=$(mktemp -d "$CACHE/.out.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# The symbols are of no use to QEMU, which loads the program segments only.
strip --strip-debug -o "$TMP/vmlinux" "$vmlinux"
echo "$release" > "$TMP/kernel-release"
cp "$BUILD/.config" "$TMP/config"
chmod 0644 "$TMP"/*
chmod 0755 "$TMP"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
log "built $release in $(elapsed): $OUT/vmlinux ($(du -h --apparent-size "$OUT/vmlinux" | cut -f1))"
echo "$OUT"
