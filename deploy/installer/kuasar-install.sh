#!/usr/bin/env bash
# Installs kuasar-vmm on a node, or removes exactly what an install added.
#
# Usage: kuasar-install.sh install|uninstall [--root DIR] [--source DIR] [--prefix DIR] [--restart]
#   --root DIR    the node's / as seen here ($KUASAR_ROOT, default /host: where the DaemonSet
#                 mounts it; / when run on the node itself; a scratch directory in tests)
#   --source DIR  the payload ($KUASAR_SOURCE, default this script's directory), laid out by
#                 payload.sh: bin/, guest/, kuasar-vmm.service, kuasar-vmm.toml, toml-edit.py
#   --prefix DIR  the binaries go to <root><DIR>/bin ($KUASAR_PREFIX, default /usr/local);
#                 containerd must find the shim on its PATH there
#   --restart     act on the node's services ($KUASAR_RESTART=1), in PID 1's namespaces:
#                 enable and start kuasar-vmm, restart it when its binary or unit changed,
#                 restart containerd when its configuration changed. Otherwise (tests) the
#                 commands are only printed.
#   NODE_NAME     set (the DaemonSet sets it): kubectl labels the node kuasar.io/kuasar-vmm=true
#                 as the last step of install, and removes the label first at uninstall.
#
# install, everything under the root, idempotent (a second run changes nothing):
#   <prefix>/bin/{kuasar-vmm,containerd-shim-kuasar-vmm-v2,kuasarctl}, /var/lib/kuasar/<guest files>,
#   /etc/systemd/system/kuasar-vmm.service (ExecStart under <prefix>), and
#   /etc/kuasar/kuasar-vmm.toml only where there is none;
#   containerd: the drop-in /etc/containerd/conf.d/kuasar-vmm.toml, and its path added to
#   `imports` in /etc/containerd/config.toml (created with `version = 3` if absent). Nothing
#   else of config.toml changes; it is backed up first.
# A file in the way that this script did not install stops it (no silent overwrite).
# uninstall: refuses while sandboxes run; otherwise restores config.toml byte for byte when it
# is as install left it (else removes only the import), then removes each installed file that
# is unchanged since and each directory install created, if empty.
#
# State, for uninstall: /var/lib/kuasar-install/ (files: sha256sum lines of what install wrote;
# dirs: the directories it created; the config.toml backup and its checksum after the edit).
set -euo pipefail
shopt -s inherit_errexit

NODE_LABEL=kuasar.io/kuasar-vmm
IMPORT=conf.d/kuasar-vmm.toml
CONTAINERD_CONFIG=/etc/containerd/config.toml
DROPIN=/etc/containerd/$IMPORT
VMM_CONFIG=/etc/kuasar/kuasar-vmm.toml
UNIT=/etc/systemd/system/kuasar-vmm.service
IMAGE_DIR=/var/lib/kuasar
STATE_DIR=/var/lib/kuasar-install

die() { echo "kuasar-install: error: $*" >&2; exit 1; }
log() { echo "kuasar-install: $*" >&2; }
usage() { sed -n '2,16p' "$0" >&2; exit 2; }

ACTION=${1:-}
[ "$#" -gt 0 ] && shift
ROOT=${KUASAR_ROOT:-/host}
SOURCE=${KUASAR_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
PREFIX=${KUASAR_PREFIX:-/usr/local}
RESTART=${KUASAR_RESTART:-0}
while [ "$#" -gt 0 ]; do
  case $1 in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a directory}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --restart) RESTART=1; shift ;;
    *) usage ;;
  esac
done
case $ACTION in install|uninstall) ;; *) usage ;; esac
[ -d "$ROOT" ] || die "the node's root $ROOT is not a directory (--root, KUASAR_ROOT)"
ROOT=$(cd "$ROOT" && pwd)
[[ $PREFIX = /* ]] || die "--prefix must be an absolute path, not $PREFIX"
# Host paths below are absolute (/etc/...); "${ROOT%/}$path" is where they are here.
at() { echo "${ROOT%/}$1"; }

command -v python3 >/dev/null || die "python3 (3.11 or later, for tomllib) is needed to read TOML"
python3 -c 'import tomllib' 2>/dev/null || die "python3 has no tomllib: 3.11 or later is needed"
toml() { python3 "$SOURCE/toml-edit.py" "$@"; }
sum() { sha256sum "$1" | cut -d' ' -f1; }

# --- what install owns: loaded from the state, saved when install ends ------------------------
declare -A OWNED=() KEPT=()
CREATED_DIRS=()
CHANGED=()
load_state() {
  local s p
  if [ -f "$(at "$STATE_DIR/files")" ]; then
    while read -r s p; do OWNED[$p]=$s; done < "$(at "$STATE_DIR/files")"
  fi
  if [ -f "$(at "$STATE_DIR/dirs")" ]; then
    mapfile -t CREATED_DIRS < "$(at "$STATE_DIR/dirs")"
  fi
}

# write_if_changed DEST: stdin to DEST (a path here) unless it already holds exactly that.
write_if_changed() {
  local dest=$1 tmp
  tmp=$(mktemp "$dest.kuasar-new.XXXXXX")
  cat > "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
  else
    chmod 0644 "$tmp"
    mv -f "$tmp" "$dest"
  fi
}

# What install wrote (KEPT) and what an earlier install wrote that is still to be dealt with
# (OWNED): saved even when install stops half-way, so that uninstall knows every file.
save_state() {
  local p d
  make_dir "$STATE_DIR"
  for p in "${!OWNED[@]}" "${!KEPT[@]}"; do echo "${KEPT[$p]:-${OWNED[$p]:-}}  $p"; done \
    | sort -u -k2 | write_if_changed "$(at "$STATE_DIR/files")"
  for d in "${CREATED_DIRS[@]}"; do echo "$d"; done | write_if_changed "$(at "$STATE_DIR/dirs")"
}

# changed PATH: whether this run wrote the host path PATH.
changed() {
  local p
  for p in "${CHANGED[@]}"; do [ "$p" = "$1" ] && return 0; done
  return 1
}

# make_dir DIR: creates DIR (a host path) and its missing parents, recording each one created.
make_dir() {
  local dir=$1
  [ -d "$(at "$dir")" ] && return 0
  make_dir "$(dirname "$dir")"
  mkdir -m 0755 "$(at "$dir")"
  local d
  for d in "${CREATED_DIRS[@]}"; do [ "$d" = "$dir" ] && return 0; done
  CREATED_DIRS+=("$dir")
}

# in_the_way SRC DEST: DEST (a host path) exists, this script did not write it, and it is not SRC.
in_the_way() {
  local here
  here=$(at "$2")
  [ -e "$here" ] && [ -z "${OWNED[$2]:-}" ] && ! cmp -s "$1" "$here"
}

# put SRC DEST MODE: installs SRC as the host path DEST (replacing what an earlier install
# wrote there), unless it already is exactly that.
put() {
  local src=$1 dest=$2 mode=$3 here
  here=$(at "$dest")
  if [ -e "$here" ] && [ -z "${OWNED[$dest]:-}" ]; then
    log "$dest: already there, not installed by this script: left alone"
    return 0
  fi
  make_dir "$(dirname "$dest")"
  KEPT[$dest]=$(sum "$src")
  if [ -f "$here" ] && cmp -s "$src" "$here" && [ "$(stat -c %a "$here")" = "${mode#0}" ]; then
    return 0
  fi
  install -m "$mode" "$src" "$here.kuasar-new"
  mv -f "$here.kuasar-new" "$here"
  CHANGED+=("$dest")
  log "installed $dest"
}

# put_once SRC DEST: installs DEST only where there is none (a configuration the admin owns).
put_once() {
  local src=$1 dest=$2
  if [ -n "${OWNED[$dest]:-}" ]; then
    KEPT[$dest]=${OWNED[$dest]}
  elif [ -e "$(at "$dest")" ]; then
    log "$dest: kept as it is"
  else
    put "$src" "$dest" 0644
  fi
}

# remove_owned PATH: removes an installed file unless it changed since.
remove_owned() {
  local p=$1 here
  here=$(at "$p")
  [ -f "$here" ] || return 0
  if [ "$(sum "$here")" = "${OWNED[$p]}" ]; then
    rm -f "$here"; log "removed $p"
  else
    log "left $p: changed since it was installed"
  fi
}

# host_systemctl ARGS: systemctl of the node (in PID 1's namespaces unless the root is /).
host_systemctl() {
  if [ "$RESTART" != 1 ]; then log "not restarting (no --restart): systemctl $*"; return 0; fi
  log "systemctl $*"
  if [ "$ROOT" = / ]; then systemctl "$@"; else nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl "$@"; fi
}

# --restart acts on PID 1's services: only when the root given is PID 1's own (hostPID).
check_restart_root() {
  [ "$RESTART" = 1 ] || return 0
  [ "$(stat -L -c %d:%i "$ROOT")" = "$(stat -L -c %d:%i /proc/1/root)" ] \
    || die "--restart: $ROOT is not the root of PID 1 (a DaemonSet pod needs hostPID: true)"
}

label_node() {
  [ -n "${NODE_NAME:-}" ] || return 0
  command -v kubectl >/dev/null || die "NODE_NAME is set but kubectl is not on PATH to label the node"
  kubectl label node "$NODE_NAME" "$@" >&2 || die "could not label node $NODE_NAME ($*)"
}

# The runtimes of the three modes (and zero-shim with streaming I/O), in the table names of the
# config version of config.toml: a drop-in of a newer version than config.toml keeps containerd
# from migrating config.toml's own settings (or is refused by newer containerd).
dropin() {
  local version=$1 grpc=$2 runtimes
  case $version in
    2) runtimes='plugins."io.containerd.grpc.v1.cri".containerd.runtimes' ;;
    3) runtimes="plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes" ;;
  esac
  cat <<EOF
# kuasar-vmm's runtime handlers, imported by config.toml: written by kuasar-install.sh at every
# install and removed by its uninstall. To change them, import a file of your own after this one.
version = $version

# zero-shim mode: kuasar-vmm is containerd's sandbox controller.
[proxy_plugins.kuasar-vmm]
  type = "sandbox"
  address = "$grpc"

[$runtimes.kuasar-vmm-zero]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "kuasar-vmm"

[$runtimes.kuasar-vmm-zero-streaming]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "kuasar-vmm"
  io_type = "streaming"

# shim mode: the shim serves containerd's sandbox API; no pause container.
[$runtimes.kuasar-vmm-shim]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "shim"

# podsandbox mode: the pod's pause container boots the VM.
[$runtimes.kuasar-vmm]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "podsandbox"
EOF
}

# containerd_version: the config version the drop-in must have (config.toml's, 3 if none).
containerd_version() {
  local config version
  config=$(at "$CONTAINERD_CONFIG")
  [ -f "$config" ] || { echo 3; return 0; }
  version=$(toml get "$config" version 1) || die "cannot read $CONTAINERD_CONFIG"
  case $version in
    2|3) echo "$version" ;;
    1) die "$CONTAINERD_CONFIG has no \`version\` (version 1): convert it first" \
         "(containerd config migrate > new.toml, check, move into place) and run install again" ;;
    *) die "$CONTAINERD_CONFIG has version $version; this installer writes versions 2 and 3" ;;
  esac
}

# Adds the import to config.toml (backed up first); sets CONTAINERD_CHANGED.
import_dropin() {
  local config backup what
  config=$(at "$CONTAINERD_CONFIG")
  backup=$(at "$STATE_DIR/config.toml.orig")
  if [ -f "$config" ] && toml has-import "$config" "$IMPORT"; then return 0; fi
  make_dir "$STATE_DIR"
  rm -f "$backup" "$(at "$STATE_DIR/config.toml.absent")" "$(at "$STATE_DIR/imports-line-added")"
  if [ -f "$config" ]; then
    cp -p "$config" "$backup"
  else
    make_dir "$(dirname "$CONTAINERD_CONFIG")"
    touch "$(at "$STATE_DIR/config.toml.absent")"
    printf '# Written by kuasar-install.sh: containerd'"'"'s defaults and the imports below.\nversion = 3\n' > "$config"
  fi
  what=$(toml add-import "$config" "$IMPORT") || die "could not add $IMPORT to imports in $CONTAINERD_CONFIG"
  [ "$what" = line ] && echo 1 > "$(at "$STATE_DIR/imports-line-added")"
  sum "$config" > "$(at "$STATE_DIR/config.toml.sum")"
  log "added $IMPORT to imports in $CONTAINERD_CONFIG (backup: $STATE_DIR/config.toml.orig)"
  CONTAINERD_CHANGED=1
}

# Undoes import_dropin: the backup when config.toml is as install left it, else the import only.
unimport_dropin() {
  local config state line_added=0
  config=$(at "$CONTAINERD_CONFIG")
  state=$(at "$STATE_DIR")
  [ -f "$state/config.toml.sum" ] || return 0
  [ -f "$state/imports-line-added" ] && line_added=1
  if [ -f "$config" ] && [ "$(sum "$config")" = "$(cat "$state/config.toml.sum")" ]; then
    if [ -f "$state/config.toml.absent" ]; then rm -f "$config"; else cp -p "$state/config.toml.orig" "$config"; fi
    log "restored $CONTAINERD_CONFIG as it was before install"
  elif [ -f "$config" ]; then
    toml remove-import "$config" "$IMPORT" "$line_added" \
      || die "could not remove $IMPORT from imports in $CONTAINERD_CONFIG; nothing was removed"
    log "$CONTAINERD_CONFIG changed since install: removed only $IMPORT from its imports"
  fi
  rm -f "$state/config.toml.sum" "$state/config.toml.orig" "$state/config.toml.absent" "$state/imports-line-added"
}

install_node() {
  local version grpc socket qemu p i
  local -a files=()
  CONTAINERD_CHANGED=0
  version=$(containerd_version)
  for p in bin/kuasar-vmm bin/containerd-shim-kuasar-vmm-v2 bin/kuasarctl guest/vmlinux \
    guest/initramfs.cpio guest/virtiofsd kuasar-vmm.service kuasar-vmm.toml; do
    [ -f "$SOURCE/$p" ] || die "$p is missing from the payload $SOURCE (--source, KUASAR_SOURCE)"
  done
  case $PREFIX in
    /usr/local|/usr) ;;
    *) log "warning: containerd finds the shim on its PATH: make sure it has $PREFIX/bin" ;;
  esac

  # SRC DEST MODE for every file install owns; the unit and the drop-in are made here.
  files+=("$SOURCE/bin/kuasar-vmm" "$PREFIX/bin/kuasar-vmm" 0755)
  files+=("$SOURCE/bin/containerd-shim-kuasar-vmm-v2" "$PREFIX/bin/containerd-shim-kuasar-vmm-v2" 0755)
  files+=("$SOURCE/bin/kuasarctl" "$PREFIX/bin/kuasarctl" 0755)
  # The guest's files, and virtiofsd (run on the node, one per VM).
  for p in "$SOURCE"/guest/*; do
    if [ "$(basename "$p")" = virtiofsd ]; then
      files+=("$p" "$IMAGE_DIR/virtiofsd" 0755)
    else
      files+=("$p" "$IMAGE_DIR/$(basename "$p")" 0644)
    fi
  done
  sed "s#/usr/local/bin/kuasar-vmm#$PREFIX/bin/kuasar-vmm#" "$SOURCE/kuasar-vmm.service" > "$WORK/unit"
  files+=("$WORK/unit" "$UNIT" 0644)
  # The sockets come from kuasar-vmm's configuration: the admin's where there is one.
  p=$(at "$VMM_CONFIG")
  [ -f "$p" ] || p=$SOURCE/kuasar-vmm.toml
  grpc=$(toml get "$p" grpc_socket /run/kuasar/vmm-grpc.sock)
  socket=$(toml get "$p" socket /run/kuasar/vmm.sock)
  qemu=$(toml get "$p" qemu.binary /usr/bin/qemu-system-x86_64)
  dropin "$version" "$grpc" > "$WORK/dropin"
  files+=("$WORK/dropin" "$DROPIN" 0644)

  # Nothing is written unless every file can be.
  for ((i = 0; i < ${#files[@]}; i += 3)); do
    if in_the_way "${files[i]}" "${files[i + 1]}"; then
      die "${files[i + 1]} exists and was not installed by this script; move it away and run install again"
    fi
  done
  INSTALLING=1
  for ((i = 0; i < ${#files[@]}; i += 3)); do put "${files[@]:i:3}"; done
  put_once "$SOURCE/kuasar-vmm.toml" "$VMM_CONFIG"
  import_dropin
  if changed "$DROPIN"; then CONTAINERD_CHANGED=1; fi
  # What an earlier install wrote that this payload has no more.
  for p in "${!OWNED[@]}"; do
    if [ -z "${KEPT[$p]:-}" ]; then remove_owned "$p"; unset 'OWNED[$p]'; fi
  done
  save_state

  [ "$socket" = /run/kuasar/vmm.sock ] \
    || log "warning: socket = $socket: containerd's environment needs KUASAR_VMM_SOCKET=$socket for the shims"
  [ -x "$(at "$qemu")" ] || log "warning: $qemu is missing: kuasar-vmm will not start (apt-get install qemu-system-x86)"
  if changed "$UNIT"; then host_systemctl daemon-reload; fi
  host_systemctl enable kuasar-vmm.service
  # A restart keeps the VMs (KillMode=process); kuasar-vmm takes them back.
  if changed "$PREFIX/bin/kuasar-vmm" || changed "$UNIT"; then
    host_systemctl restart kuasar-vmm.service
  else
    host_systemctl start kuasar-vmm.service
  fi
  if [ "$CONTAINERD_CHANGED" = 1 ]; then host_systemctl restart containerd.service; fi
  label_node "$NODE_LABEL=true" --overwrite
  log "installed into $ROOT"
}

uninstall_node() {
  local state_dir running p i
  if [ ! -d "$(at "$STATE_DIR")" ]; then log "nothing installed by this script under $ROOT"; return 0; fi
  label_node "$NODE_LABEL-"
  state_dir=$(toml get "$(at "$VMM_CONFIG")" state_dir /run/kuasar/vmm 2>/dev/null || echo /run/kuasar/vmm)
  running=$(find "$(at "$state_dir")" -mindepth 1 -maxdepth 1 -type d -printf '%f ' 2>/dev/null || true)
  [ -z "$running" ] || die "sandboxes still run under $state_dir ($running): delete the pods" \
    "of the kuasar-vmm RuntimeClasses on this node first"

  unimport_dropin
  host_systemctl restart containerd.service
  host_systemctl disable --now kuasar-vmm.service
  for p in $(printf '%s\n' "${!OWNED[@]}" | sort); do remove_owned "$p"; done
  rm -f "$(at "$STATE_DIR/files")" "$(at "$STATE_DIR/dirs")"
  # Deepest first; a directory something else put files into stays.
  for ((i = ${#CREATED_DIRS[@]} - 1; i >= 0; i--)); do
    rmdir "$(at "${CREATED_DIRS[i]}")" 2>/dev/null || log "left ${CREATED_DIRS[i]}: not empty"
  done
  host_systemctl daemon-reload
  log "uninstalled from $ROOT"
}

# Install saves what it wrote even when it stops half-way (uninstall then removes it).
INSTALLING=0
on_exit() {
  local rc=$?
  if [ "$INSTALLING" = 1 ] && [ "$rc" != 0 ]; then save_state; fi
  rm -rf "$WORK"
}
WORK=$(mktemp -d)
trap on_exit EXIT
check_restart_root
load_state
case $ACTION in
  install) install_node ;;
  uninstall) uninstall_node ;;
esac
