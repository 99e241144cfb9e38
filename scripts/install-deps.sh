#!/usr/bin/env bash
# Installs the host packages kuasar needs, from Debian only. Idempotent.
# containerd 2.x comes from sid, that package alone (pinned low, never -t sid).
# linux-source-6.1 and the tools after it build the project's own guest kernel
# (scripts/build-kernel.sh). iptables: kuasar-vmm's port-forward redirect in each pod's netns.
# dpkg-dev and the -dev packages after it build the guest's static crun (scripts/build-crun.sh).
# libseccomp-dev and libcap-ng-dev also build virtiofsd (scripts/build-virtiofsd.sh).
# python3-venv: deploy/check.sh validates the Kubernetes manifests with a validator from PyPI.
# systemd-container (systemd-nspawn) and debootstrap: deploy/test-unit.sh boots a Debian
# container with systemd to run kuasar-vmm.service under it.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps.sh: must run as root" >&2; exit 1; }

# Building needs a Rust toolchain at least as new as the workspace's rust-version; Debian 12's
# own (1.63) is too old, and no newer one comes from Debian. Checked first, before any install.
# (Installing kuasar on a node needs no toolchain: deploy/installer.)
check_rust() {
  local root want have
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  want=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$root/Cargo.toml")
  if ! have=$(cargo --version 2>/dev/null); then
    echo "install-deps.sh: no cargo on PATH. Building kuasar needs Rust >= $want:" \
      "install it with rustup (https://rustup.rs), then run this again" >&2
    exit 1
  fi
  have=$(awk '{print $2}' <<<"$have")
  if [ "$(printf '%s\n%s\n' "$want" "${have%%-*}" | sort -V | head -1)" != "$want" ]; then
    echo "install-deps.sh: cargo $have is too old; building kuasar needs Rust >= $want" \
      "(Debian 12's rustc is 1.63): install a newer one with rustup, then run this again" >&2
    exit 1
  fi
}
check_rust

want=(qemu-system-x86 linux-image-amd64 busybox-static runc crun
      containernetworking-plugins iproute2 iptables kmod cpio gzip xz-utils zstd
      build-essential pkg-config jq util-linux procps psmisc
      linux-source-6.1 bc bison flex libelf-dev libssl-dev
      dpkg-dev libyajl-dev libseccomp-dev libcap-dev libgcrypt20-dev libgpg-error-dev
      libcap-ng-dev
      python3 python3-venv systemd-container debootstrap)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

need_containerd=1
if command -v containerd >/dev/null && containerd --version | grep -Eq ' v?2\.'; then
  need_containerd=0
fi

if [ ${#missing[@]} -gt 0 ] || [ $need_containerd = 1 ]; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ ! -f /etc/apt/sources.list.d/kuasar-sid.sources ]; then
    uris=$(awk '/^URIs:/ {print $2; exit}' "$src" 2>/dev/null || true)
    [ -n "$uris" ] || uris=http://deb.debian.org/debian
    cat > /etc/apt/sources.list.d/kuasar-sid.sources <<SRC
Types: deb
URIs: $uris
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat > /etc/apt/preferences.d/kuasar-sid <<PIN
Package: *
Pin: release n=sid
Pin-Priority: 50
PIN
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  if [ $need_containerd = 1 ]; then
    echo "installing containerd from sid"
    apt-get install -y -qq --no-install-recommends containerd/sid
  fi
fi
# The packaged service must not run: tests and the demo start private instances.
if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
  systemctl disable --now containerd >/dev/null 2>&1 || true
fi
echo "install-deps: ok ($(containerd --version | awk '{print $3}'), $(qemu-system-x86_64 --version | head -1))"
