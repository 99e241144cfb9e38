#!/usr/bin/env bash
# Builds the OCI image archives the tests and the demo import with `ctr images import`
# (no image registry is reachable here):
#   busybox.tar  docker.io/library/busybox:latest  busybox-static + applet symlinks in /bin
#   pause.tar    registry.k8s.io/pause:3.10         a tiny static pause (C, gcc -static)
# Usage: scripts/build-test-images.sh [OUTDIR]   (default /var/lib/kuasar/images)
# Reproducible: fixed mtimes, owners and order, `gzip -n`; an unchanged archive is left
# untouched, so re-runs keep both the digests and the files.
set -euo pipefail

OUTDIR=${1:-${KUASAR_TEST_IMAGES:-/var/lib/kuasar/images}}
# Fixed timestamp for every file and the image configs (2024-01-01T00:00:00Z).
EPOCH=1704067200
CREATED=2024-01-01T00:00:00Z
umask 022

die() { echo "build-test-images: $*" >&2; exit 1; }

for tool in tar gzip sha256sum gcc ldd; do
  command -v "$tool" >/dev/null || die "missing '$tool' (run: make deps)"
done
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || die "busybox not found (run: make deps, it installs busybox-static)"
ldd_out=$(ldd "$BUSYBOX" 2>&1 || true)
if [[ $ldd_out != *"not a dynamic executable"* ]]; then
  die "$BUSYBOX is dynamically linked: install busybox-static (make deps)"
fi

WORK=$(mktemp -d /tmp/kuasar-images.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# tar_dir SRC OUT: a deterministic tar of SRC's contents (entries without a leading ./).
tar_dir() {
  local src=$1 out=$2
  local entries=()
  mapfile -t entries < <(cd "$src" && LC_ALL=C ls -A)
  (cd "$src" && LC_ALL=C tar --create --file="$out" --format=gnu --sort=name \
    --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
    --no-acls --no-xattrs --no-selinux -- "${entries[@]}")
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# add_blob LAYOUT FILE: stores FILE as a blob, prints its digest hex.
add_blob() {
  local layout=$1 file=$2 d
  d=$(sha "$file")
  mkdir -p "$layout/blobs/sha256"
  cp "$file" "$layout/blobs/sha256/$d"
  echo "$d"
}

# build_image NAME REF ROOTFS CONFIG_FRAGMENT OUTFILE
# CONFIG_FRAGMENT is the JSON body of the image config's "config" object.
build_image() {
  local name=$1 ref=$2 rootfs=$3 cfg=$4 out=$5
  local layout="$WORK/$name-layout"
  mkdir -p "$layout"
  tar_dir "$rootfs" "$WORK/$name-layer.tar"
  local diff_id
  diff_id=$(sha "$WORK/$name-layer.tar")
  gzip -n -9 -c "$WORK/$name-layer.tar" > "$WORK/$name-layer.tar.gz"
  local layer layer_size
  layer=$(add_blob "$layout" "$WORK/$name-layer.tar.gz")
  layer_size=$(size "$WORK/$name-layer.tar.gz")

  printf '{"architecture":"amd64","os":"linux","created":"%s","config":{%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"kuasar scripts/build-test-images.sh"}]}' \
    "$CREATED" "$cfg" "$diff_id" "$CREATED" > "$WORK/$name-config.json"
  local config config_size
  config=$(add_blob "$layout" "$WORK/$name-config.json")
  config_size=$(size "$WORK/$name-config.json")

  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" > "$WORK/$name-manifest.json"
  local manifest manifest_size
  manifest=$(add_blob "$layout" "$WORK/$name-manifest.json")
  manifest_size=$(size "$WORK/$name-manifest.json")

  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$ref" "$ref" > "$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"

  tar_dir "$layout" "$WORK/$name.tar"
  mkdir -p "$OUTDIR"
  if [ -f "$out" ] && cmp -s "$WORK/$name.tar" "$out"; then
    echo "build-test-images: $out unchanged ($ref, manifest sha256:$manifest)"
  else
    cp "$WORK/$name.tar" "$out.tmp"
    mv -f "$out.tmp" "$out"
    echo "build-test-images: wrote $out ($ref, manifest sha256:$manifest)"
  fi
}

# --- busybox -------------------------------------------------------------------------------
bb="$WORK/busybox-rootfs"
mkdir -p "$bb/bin" "$bb/etc" "$bb/root" "$bb/tmp" "$bb/home" \
  "$bb/proc" "$bb/sys" "$bb/dev" "$bb/var"
cp "$BUSYBOX" "$bb/bin/busybox"
chmod 0755 "$bb/bin/busybox"
while read -r applet; do
  case $applet in ''|busybox|*/*) continue ;; esac
  ln -sf busybox "$bb/bin/$applet"
done < <("$BUSYBOX" --list)
chmod 1777 "$bb/tmp"
chmod 0700 "$bb/root"
cat > "$bb/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
cat > "$bb/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
EOF
chmod 0644 "$bb/etc/passwd" "$bb/etc/group"
build_image busybox docker.io/library/busybox:latest "$bb" \
  '"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]' \
  "$OUTDIR/busybox.tar"

# --- pause ---------------------------------------------------------------------------------
cat > "$WORK/pause.c" <<'EOF'
/* A minimal pause: sleeps until SIGINT/SIGTERM, reaps children (it may be PID 1). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) { (void)sig; _exit(0); }
static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {}
}

int main(void) {
  struct sigaction stop = {0}, child = {0};
  stop.sa_handler = on_stop;
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGINT, &stop, NULL) < 0 || sigaction(SIGTERM, &stop, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0)
    return 1;
  for (;;) pause();
}
EOF
pr="$WORK/pause-rootfs"
mkdir -p "$pr"
gcc -static -Os -s -o "$pr/pause" "$WORK/pause.c" \
  || die "gcc -static failed (needs libc6-dev: make deps)"
chmod 0755 "$pr/pause"
build_image pause registry.k8s.io/pause:3.10 "$pr" \
  '"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/pause"],"WorkingDir":"/","User":"65535:65535"' \
  "$OUTDIR/pause.tar"
