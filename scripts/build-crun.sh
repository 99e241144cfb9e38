#!/usr/bin/env bash
# Builds the guest's OCI runtime: crun, static, from the Debian source package of the crun
# installed on this machine (the same version and patches), or finds it built.
#
#   scripts/build-crun.sh      prints the path of the static binary on stdout
#
# Why static: the agent runs crun for every container operation (create, start, exec, kill,
# delete). Under emulation the dynamic loader's work (Debian's crun links ten libraries,
# libsystemd and libgcrypt among them) costs ~35 ms of every call; a static build without
# systemd, CRIU and dlopen support (none of which the guest has) skips it, and the initramfs
# loses the libraries.
# The result is cached under $KUASAR_CRUN_CACHE (default /var/cache/kuasar/crun) in <hash>/,
# the hash covering the source version and the recipe below. The source is fetched with a
# private apt state (deb-src copies of this machine's Debian sources; the system's apt
# configuration is not changed). Progress goes to stderr, the build log to <cache>/build.log.
# Needs the packages of scripts/install-deps.sh. Run as root.
set -euo pipefail

CACHE=${KUASAR_CRUN_CACHE:-/var/cache/kuasar/crun}
# Everything besides the source that changes what gets built: part of the cache key.
# Bump the first word when the steps below change their output.
RECIPE="v1 --disable-systemd --disable-criu --disable-dl -all-static yajl_s gpg-error strip"
LIBDIR=/usr/lib/x86_64-linux-gnu

log() { echo "build-crun: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get dpkg-source make gcc strip sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
for lib in libyajl_s.a libseccomp.a libcap.a libgcrypt.a libgpg-error.a; do
  [ -f "$LIBDIR/$lib" ] || die "$LIBDIR/$lib missing (run scripts/install-deps.sh)"
done
version=$(dpkg-query -W -f='${Version}' crun 2>/dev/null) || die "crun is not installed"
hash=$( { echo "crun $version"; echo "$RECIPE"; } | sha256sum | cut -c1-16)
OUT=$CACHE/$hash

if [ -x "$OUT/crun" ]; then
  log "cached: $OUT/crun (crun $version)"
  echo "$OUT/crun"
  exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -x "$OUT/crun" ]; then
  echo "$OUT/crun"
  exit 0
fi

WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- the source: apt with a private state and deb-src copies of the system's sources ------
apt_dir=$WORK/apt
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  sed -n '/^Types:.*\bdeb\b/,/^$/p' "$f" | sed 's/^Types:.*/Types: deb-src/' \
    > "$apt_dir/sources.list.d/$(basename "$f")"
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  sed -n 's/^deb \(.*\)/deb-src \1/p' "$f" > "$apt_dir/sources.list.d/$(basename "$f")"
done
APT=(apt-get -q -o "Dir::Etc::SourceList=/dev/null"
     -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives")
log "fetching the source of crun $version (private apt state in $apt_dir)"
"${APT[@]}" update >"$WORK/apt.log" 2>&1 || die "apt-get update (deb-src) failed: $(tail -3 "$WORK/apt.log")"
(cd "$WORK" && "${APT[@]}" source --download-only "crun=$version") >>"$WORK/apt.log" 2>&1 \
  || die "apt-get source crun=$version failed: $(tail -3 "$WORK/apt.log")"
dsc=$(ls "$WORK"/crun_*.dsc 2>/dev/null | head -1)
[ -n "$dsc" ] || die "no .dsc for crun $version was fetched"
dpkg-source -x "$dsc" "$WORK/src" >>"$WORK/apt.log" 2>&1 || die "dpkg-source -x $dsc failed"

# --- the build ----------------------------------------------------------------------------
# libtool's -all-static links -lyajl as libyajl.a; Debian ships the archive as libyajl_s.a.
mkdir -p "$WORK/lib"
ln -s "$LIBDIR/libyajl_s.a" "$WORK/lib/libyajl.a"
log "building a static crun $version (log: $CACHE/build.log)"
(
  cd "$WORK/src"
  ./configure --disable-systemd --disable-criu --disable-dl
  # libgcrypt's static archive needs libgpg-error's, which configure does not add.
  make git-version.h
  make -j"$(nproc)" crun YAJL_LIBS="$LIBDIR/libyajl_s.a" LIBS=-lgpg-error \
    LDFLAGS="-all-static -L$WORK/lib"
) >"$CACHE/build.log" 2>&1 || die "the build failed; see $CACHE/build.log"
bin=$WORK/src/crun
if ldd "$bin" >/dev/null 2>&1; then
  die "$bin is not static: $(ldd "$bin" 2>&1 | head -3)"
fi
"$bin" --version >/dev/null || die "the built crun does not run"
strip "$bin"
mkdir -p "$OUT.tmp"
install -m 0755 "$bin" "$OUT.tmp/crun"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built: $OUT/crun ($(du -h --apparent-size "$OUT/crun" | cut -f1), crun $version)"
echo "$OUT/crun"
