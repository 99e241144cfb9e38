#!/usr/bin/env bash
# Lays out the installer's payload in DIR, as the image kuasar/kuasar-deploy carries it in
# /opt/kuasar-deploy (docs/operations.md) and as kuasar-install.sh --source reads it:
#   DIR/kuasar-install.sh, toml-edit.py     the installer
#   DIR/bin/kuasar-vmm, containerd-shim-kuasar-vmm-v2, kuasarctl
#   DIR/guest/vmlinux, initramfs.cpio, kernel-release, vmlinux-debian, vmlinux-debian.release
#   DIR/kuasar-vmm.service, kuasar-vmm.toml (the default configuration)
#
# Usage: deploy/installer/payload.sh DIR    (after `make build guest`)
# Env: KUASAR_BIN_DIR (default <repo>/target/release), KUASAR_IMAGE_DIR (default /var/lib/kuasar).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:?usage: $0 DIR}
BIN_DIR=${KUASAR_BIN_DIR:-$REPO/target/release}
IMAGE_DIR=${KUASAR_IMAGE_DIR:-/var/lib/kuasar}

die() { echo "payload.sh: $*" >&2; exit 1; }

mkdir -p "$OUT/bin" "$OUT/guest"
for f in kuasar-vmm containerd-shim-kuasar-vmm-v2 kuasarctl; do
  [ -x "$BIN_DIR/$f" ] || die "$BIN_DIR/$f is missing (make build)"
  install -m 0755 "$BIN_DIR/$f" "$OUT/bin/$f"
done
# The build's cache stamps (*.source) and the test images stay behind.
for f in vmlinux initramfs.cpio kernel-release vmlinux-debian vmlinux-debian.release; do
  [ -f "$IMAGE_DIR/$f" ] || die "$IMAGE_DIR/$f is missing (make guest)"
  install -m 0644 "$IMAGE_DIR/$f" "$OUT/guest/$f"
done
# virtiofsd serves each VM's share on the node (scripts/build-virtiofsd.sh).
[ -x "$IMAGE_DIR/virtiofsd" ] || die "$IMAGE_DIR/virtiofsd is missing (make guest)"
install -m 0755 "$IMAGE_DIR/virtiofsd" "$OUT/guest/virtiofsd"
install -m 0755 "$HERE/kuasar-install.sh" "$HERE/toml-edit.py" "$OUT/"
install -m 0644 "$HERE/../kuasar-vmm.service" "$HERE/kuasar-vmm.toml" "$OUT/"
echo "payload.sh: payload in $OUT"
