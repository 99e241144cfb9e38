#!/usr/bin/env bash
# Builds virtiofsd, the host daemon that serves each VM's shared directory over virtio-fs
# (one per VM, started by kuasar-vmm), from its crates.io release, or finds it built.
#
#   scripts/build-virtiofsd.sh      prints the path of the binary on stdout
#
# Why built here: Debian has virtiofsd only in trixie and later, linked against a newer libc
# than bookworm's. The crate links libseccomp and libcap-ng (their -dev packages come from
# scripts/install-deps.sh) and is built with its own Cargo.lock (--locked).
# The result is cached under $KUASAR_VIRTIOFSD_CACHE (default /var/cache/kuasar/virtiofsd) in
# <hash>/, the hash covering the version and the recipe below. Progress goes to stderr, the
# build log to <cache>/build.log. Run as root.
set -euo pipefail

VERSION=1.14.0
CACHE=${KUASAR_VIRTIOFSD_CACHE:-/var/cache/kuasar/virtiofsd}
# Bump the first word when the steps below change their output.
RECIPE="v1 cargo-install --locked default-features strip"

log() { echo "build-virtiofsd: $*" >&2; }
die() { log "error: $*"; exit 1; }

if ! command -v cargo >/dev/null; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
  done
fi
for tool in cargo strip sha256sum flock pkg-config; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
for lib in libseccomp libcap-ng; do
  pkg-config --exists "$lib" || die "$lib's development files are missing (run scripts/install-deps.sh)"
done
hash=$( { echo "virtiofsd $VERSION"; echo "$RECIPE"; } | sha256sum | cut -c1-16)
OUT=$CACHE/$hash

if [ -x "$OUT/virtiofsd" ]; then
  log "cached: $OUT/virtiofsd (virtiofsd $VERSION)"
  echo "$OUT/virtiofsd"
  exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -x "$OUT/virtiofsd" ]; then
  echo "$OUT/virtiofsd"
  exit 0
fi

WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building virtiofsd $VERSION from crates.io (a few minutes; log: $CACHE/build.log)"
CARGO_TARGET_DIR=$WORK/target nice cargo install --locked --quiet --version "=$VERSION" \
  --root "$WORK/root" virtiofsd >"$CACHE/build.log" 2>&1 \
  || die "the build failed; see $CACHE/build.log"
bin=$WORK/root/bin/virtiofsd
strip "$bin"
"$bin" --version >/dev/null || die "the built virtiofsd does not run"
mkdir -p "$OUT.tmp"
install -m 0755 "$bin" "$OUT.tmp/virtiofsd"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built: $OUT/virtiofsd ($(du -h --apparent-size "$OUT/virtiofsd" | cut -f1), virtiofsd $VERSION)"
echo "$OUT/virtiofsd"
