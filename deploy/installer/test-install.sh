#!/usr/bin/env bash
# Tests kuasar-install.sh against scratch roots: no service is restarted, no VM started, the
# node's own files are never touched. Needs python3 (3.11+); the checks of the merged
# configuration need the containerd binary (containerd config dump reads it as the daemon
# would), and are skipped with a message without it.
#
# Cases: Debian's version 2 config.toml with user settings (they survive, in containerd's own
# reading too), a second install (changes nothing), uninstall (config.toml restored byte for
# byte, every installed file and directory gone); a version 3 config.toml with imports of its
# own and an admin's edit after install (uninstall keeps the edit, removes only the import);
# no config.toml at all; an upgrade; the refusals (version 1 config, a file in the way, running
# sandboxes, --restart on a root that is not PID 1's); the drop-in against
# `kuasar-vmm --print-containerd-config` when a built kuasar-vmm runs here.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SCRATCH=$(mktemp -d /tmp/kuasar-install-test.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
PAYLOAD=$SCRATCH/payload
LOG=$SCRATCH/log
IMPORT_LINE='imports = ["conf.d/kuasar-vmm.toml"]'

fail() { echo "test-install: FAIL: $*" >&2; exit 1; }
ok() { echo "test-install: ok: $*" >&2; }

# kuasar_install ROOT ACTION [ARGS]: the installer, its log in $LOG (shown when a test fails).
kuasar_install() {
  local root=$1 action=$2
  shift 2
  env -u NODE_NAME -u KUASAR_RESTART -u KUASAR_PREFIX "$HERE/kuasar-install.sh" "$action" --root "$root" --source "$PAYLOAD" "$@" >"$LOG" 2>&1
}
must_install() { kuasar_install "$@" || { cat "$LOG" >&2; fail "kuasar-install.sh $2 in $1"; }; }
# must_refuse ROOT ACTION PATTERN [ARGS]: fails, saying PATTERN.
must_refuse() {
  if kuasar_install "$1" "$2" "${@:4}"; then cat "$LOG" >&2; fail "$2 in $1 succeeded; expected: $3"; fi
  grep -qF -- "$3" "$LOG" || { cat "$LOG" >&2; fail "$2 in $1 did not say: $3"; }
}

# snapshot ROOT: every path with its type and mode, and every file's checksum.
snapshot() {
  (cd "$1" && find . -printf '%y %m %p\n' | sort && find . -type f -exec sha256sum {} + | sort)
}
same_tree() { diff -r "$1" "$2" >&2 && diff <(snapshot "$1") <(snapshot "$2") >&2; }

# A payload of stand-ins (the installer only copies them), laid out by payload.sh itself.
make_payload() {
  local f
  mkdir -p "$SCRATCH/bin" "$SCRATCH/image"
  for f in kuasar-vmm containerd-shim-kuasar-vmm-v2 kuasarctl; do
    printf '#!/bin/sh\necho %s 1\n' "$f" > "$SCRATCH/bin/$f"
    chmod 0755 "$SCRATCH/bin/$f"
  done
  for f in vmlinux initramfs.cpio kernel-release vmlinux-debian vmlinux-debian.release; do
    echo "stand-in $f" > "$SCRATCH/image/$f"
  done
  printf '#!/bin/sh\necho virtiofsd 1\n' > "$SCRATCH/image/virtiofsd"
  chmod 0755 "$SCRATCH/image/virtiofsd"
  KUASAR_BIN_DIR=$SCRATCH/bin KUASAR_IMAGE_DIR=$SCRATCH/image "$HERE/payload.sh" "$PAYLOAD" >/dev/null
}

# new_root NAME: an empty node root and its pristine twin NAME.orig, filled by the caller.
new_root() { mkdir -p "$SCRATCH/$1/etc" "$SCRATCH/$1/usr/local/bin" "$SCRATCH/$1/var/lib"; }
freeze() { cp -a "$SCRATCH/$1" "$SCRATCH/$1.orig"; }

# expect_dump ROOT WHAT PYTHON_EXPR...: each expression holds of containerd's reading of ROOT's
# config (d, the dump as TOML; rt, its CRI runtimes); says ok WHAT, or that it was skipped.
expect_dump() {
  local root=$1 what=$2
  shift 2
  if ! command -v containerd >/dev/null; then
    echo "test-install: SKIPPED: $what (no containerd binary here)" >&2
    return 0
  fi
  containerd --config "$root/etc/containerd/config.toml" config dump >"$SCRATCH/dump.toml" 2>"$LOG" \
    || { cat "$LOG" >&2; fail "containerd config dump of $root"; }
  python3 - "$SCRATCH/dump.toml" "$@" <<'EOF' || fail "in containerd's reading of $root/etc/containerd/config.toml"
import sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
rt = d["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
bad = [e for e in sys.argv[2:] if not eval(e)]
for e in bad:
    print(f"test-install: does not hold: {e}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
  ok "$what"
}

# Our handlers in containerd's reading, each with its mode: those the RuntimeClasses name.
HANDLERS=$(sed -n 's/^handler: //p' "$REPO/deploy/k8s/runtimeclasses.yaml" | sort | tr '\n' ' ')
[ "$HANDLERS" = "kuasar-vmm kuasar-vmm-shim kuasar-vmm-zero " ] || fail "RuntimeClass handlers: $HANDLERS"
OUR_RUNTIMES=(
  'rt["kuasar-vmm"]["sandboxer"] == "podsandbox"'
  'rt["kuasar-vmm-shim"]["sandboxer"] == "shim"'
  'rt["kuasar-vmm-zero"]["sandboxer"] == "kuasar-vmm"'
  'all(rt[h]["runtime_type"] == "io.containerd.kuasar-vmm.v2" for h in ("kuasar-vmm", "kuasar-vmm-shim", "kuasar-vmm-zero"))'
  'd["proxy_plugins"]["kuasar-vmm"] == {"type": "sandbox", "address": "/run/kuasar/vmm-grpc.sock", "platform": "", "capabilities": []}'
)

test_debian_v2() {
  new_root debian
  local root=$SCRATCH/debian f
  mkdir -p "$root/etc/containerd" "$root/var/lib/kuasar/images"
  # Debian's containerd 2.1 package's config.toml, and a setting an admin added.
  cat > "$root/etc/containerd/config.toml" <<'EOF'
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.example/pause:3.10"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
EOF
  echo other > "$root/var/lib/kuasar/images/busybox.tar"
  echo tool > "$root/usr/local/bin/other-tool"
  freeze debian

  must_install "$root" install
  for f in /usr/local/bin/kuasar-vmm /usr/local/bin/containerd-shim-kuasar-vmm-v2 /usr/local/bin/kuasarctl; do
    if [ ! -x "$root$f" ] || ! cmp -s "$root$f" "$PAYLOAD/bin/${f##*/}"; then fail "$f not installed as an executable"; fi
  done
  for f in "$PAYLOAD"/guest/*; do cmp -s "$f" "$root/var/lib/kuasar/${f##*/}" || fail "guest file ${f##*/} not installed"; done
  [ -x "$root/var/lib/kuasar/virtiofsd" ] || fail "virtiofsd not installed as an executable"
  cmp -s "$root/etc/systemd/system/kuasar-vmm.service" "$REPO/deploy/kuasar-vmm.service" || fail "unit not installed"
  cmp -s "$root/etc/kuasar/kuasar-vmm.toml" "$HERE/kuasar-vmm.toml" || fail "default kuasar-vmm.toml not installed"
  grep -qx 'version = 2' "$root/etc/containerd/conf.d/kuasar-vmm.toml" \
    || fail "the drop-in's version is not config.toml's (2)"
  [ "$(diff "$root.orig/etc/containerd/config.toml" "$root/etc/containerd/config.toml" || true)" = "1a2
> $IMPORT_LINE" ] || fail "config.toml changed otherwise than by the imports line after version"
  cmp -s "$root.orig/etc/containerd/config.toml" "$root/var/lib/kuasar-install/config.toml.orig" \
    || fail "no backup of config.toml"
  ok "install into a root with Debian's version 2 config.toml"

  snapshot "$root" > "$SCRATCH/first"
  must_install "$root" install
  diff "$SCRATCH/first" <(snapshot "$root") >&2 || fail "a second install changed the root"
  ! grep -E 'installed /|added ' "$LOG" || fail "a second install says it wrote something"
  ok "a second install changes nothing"

  # Debian's CNI directory and the admin's sandbox image survive containerd's v2 -> v3
  # migration: a version 3 drop-in would lose both (bin_dirs would be the default).
  expect_dump "$root" "containerd reads the merged config: the three handlers, the proxy plugin, the admin's settings" \
    "${OUR_RUNTIMES[@]}" \
    'd["plugins"]["io.containerd.cri.v1.runtime"]["cni"]["bin_dirs"] == ["/usr/lib/cni"]' \
    'd["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "registry.example/pause:3.10"'

  must_install "$root" uninstall
  cmp "$root.orig/etc/containerd/config.toml" "$root/etc/containerd/config.toml" || fail "config.toml not restored"
  same_tree "$root.orig" "$root" || fail "uninstall left the root otherwise than before install"
  must_install "$root" uninstall
  grep -q 'nothing installed' "$LOG" || fail "a second uninstall did not say there is nothing to do"
  ok "uninstall restores config.toml byte for byte and removes every file and directory install made"
}

test_v3_with_imports_and_edit() {
  new_root v3
  local root=$SCRATCH/v3
  mkdir -p "$root/etc/containerd"
  cat > "$root/etc/containerd/config.toml" <<'EOF'
# An admin's containerd 2.x configuration.
version = 3
root = '/var/lib/containerd'
imports = ['local.toml']

[plugins.'io.containerd.cri.v1.runtime'.cni]
  conf_dir = '/etc/cni/custom.d'
EOF
  cat > "$root/etc/containerd/local.toml" <<'EOF'
version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.gvisor]
  runtime_type = 'io.containerd.runsc.v1'
EOF
  freeze v3
  must_install "$root" install
  grep -qx "imports = \[\"conf.d/kuasar-vmm.toml\", 'local.toml'\]" "$root/etc/containerd/config.toml" \
    || fail "the import is not put first on the existing imports line"
  grep -qx 'version = 3' "$root/etc/containerd/conf.d/kuasar-vmm.toml" || fail "the drop-in's version is not 3"
  expect_dump "$root" "version 3 config.toml with its own imports: ours added first, the admin's kept" \
    "${OUR_RUNTIMES[@]}" \
    'rt["gvisor"]["runtime_type"] == "io.containerd.runsc.v1"' \
    'd["plugins"]["io.containerd.cri.v1.runtime"]["cni"]["conf_dir"] == "/etc/cni/custom.d"'

  # An admin edits config.toml after install: uninstall takes out the import only.
  printf "\n[plugins.'io.containerd.gc.v1.scheduler']\n  deletion_threshold = 7\n" \
    | tee -a "$root/etc/containerd/config.toml" >> "$root.orig/etc/containerd/config.toml"
  must_install "$root" uninstall
  grep -q 'removed only' "$LOG" || fail "uninstall did not say it removed only the import"
  same_tree "$root.orig" "$root" || fail "uninstall after an admin's edit: not the original plus the edit"
  ok "uninstall after an admin's edit keeps the edit and removes only the import"
}

test_no_config() {
  new_root bare
  local root=$SCRATCH/bare
  freeze bare
  must_install "$root" install
  [ "$(grep -v '^#' "$root/etc/containerd/config.toml")" = "version = 3
$IMPORT_LINE" ] || fail "config.toml created otherwise than version 3 and the import"
  expect_dump "$root" "no config.toml: one created with version 3 and the import, which containerd reads" \
    "${OUR_RUNTIMES[@]}"
  must_install "$root" uninstall
  same_tree "$root.orig" "$root" || fail "uninstall did not remove the config.toml install created"
  ok "uninstall removes the config.toml install created"
}

test_upgrade() {
  new_root up
  local root=$SCRATCH/up
  must_install "$root" install
  echo 'echo kuasar-vmm 2' >> "$PAYLOAD/bin/kuasar-vmm"
  mv "$PAYLOAD/guest/vmlinux-debian.release" "$SCRATCH/"
  must_install "$root" install
  cmp -s "$PAYLOAD/bin/kuasar-vmm" "$root/usr/local/bin/kuasar-vmm" || fail "upgrade did not replace kuasar-vmm"
  grep -q 'restart kuasar-vmm' "$LOG" || fail "upgrade of kuasar-vmm does not restart it"
  ! grep -q 'restart containerd' "$LOG" || fail "upgrade restarts containerd though its config did not change"
  [ ! -e "$root/var/lib/kuasar/vmlinux-debian.release" ] || fail "a file the new payload lacks was kept"
  ! grep -q vmlinux-debian.release "$root/var/lib/kuasar-install/files" || fail "the state still lists a removed file"
  mv "$SCRATCH/vmlinux-debian.release" "$PAYLOAD/guest/"
  ok "upgrade replaces what changed, removes what the payload lacks, restarts kuasar-vmm only"
}

test_refusals() {
  new_root v1
  printf '[plugins.cri]\n  sandbox_image = "pause"\n' > "$SCRATCH/v1/etc/config.toml"
  mkdir -p "$SCRATCH/v1/etc/containerd" && mv "$SCRATCH/v1/etc/config.toml" "$SCRATCH/v1/etc/containerd/"
  freeze v1
  must_refuse "$SCRATCH/v1" install "has no \`version\`"
  same_tree "$SCRATCH/v1.orig" "$SCRATCH/v1" || fail "a refused install changed the root"

  new_root foreign
  echo 'an older kuasar-vmm' > "$SCRATCH/foreign/usr/local/bin/kuasar-vmm"
  freeze foreign
  must_refuse "$SCRATCH/foreign" install '/usr/local/bin/kuasar-vmm exists and was not installed by this script'
  same_tree "$SCRATCH/foreign.orig" "$SCRATCH/foreign" || fail "a refused install changed the root"

  new_root busy
  must_install "$SCRATCH/busy" install
  mkdir -p "$SCRATCH/busy/run/kuasar/vmm/pod-1"
  must_refuse "$SCRATCH/busy" uninstall 'sandboxes still run under /run/kuasar/vmm (pod-1'
  [ -x "$SCRATCH/busy/usr/local/bin/kuasar-vmm" ] || fail "a refused uninstall removed files"
  rm -r "$SCRATCH/busy/run"
  must_install "$SCRATCH/busy" uninstall

  # Stand-ins for nsenter and systemctl, in case the guard ever let a test reach the node's.
  mkdir -p "$SCRATCH/stubs"
  cat > "$SCRATCH/stubs/nsenter" <<EOF
#!/bin/sh
echo "\$0 \$*" >> $SCRATCH/stubs/called
exit 1
EOF
  cp "$SCRATCH/stubs/nsenter" "$SCRATCH/stubs/systemctl"
  chmod +x "$SCRATCH/stubs/nsenter" "$SCRATCH/stubs/systemctl"
  PATH=$SCRATCH/stubs:$PATH must_refuse "$SCRATCH/busy" install 'is not the root of PID 1' --restart
  [ ! -e "$SCRATCH/stubs/called" ] || fail "install --restart on a scratch root ran: $(cat "$SCRATCH/stubs/called")"
  ok "refused: a version 1 config.toml, a file in the way, uninstall under running sandboxes, --restart off PID 1's root"
}

# The drop-in and kuasar-vmm's own rendering of its containerd configuration agree.
test_matches_kuasar_vmm() {
  local vmm=$REPO/target/release/kuasar-vmm root=$SCRATCH/bare
  if [ ! -x "$vmm" ]; then echo "test-install: SKIPPED: drop-in vs $vmm (not built: make build)" >&2; return 0; fi
  if ! "$vmm" --print-containerd-config > "$SCRATCH/rendered.toml" 2>"$LOG"; then
    echo "test-install: SKIPPED: drop-in vs kuasar-vmm (it needs the guest image and QEMU: $(cat "$LOG"))" >&2
    return 0
  fi
  must_install "$root" install
  python3 - "$SCRATCH/rendered.toml" "$root/etc/containerd/conf.d/kuasar-vmm.toml" <<'EOF' \
    || fail "the drop-in differs from kuasar-vmm --print-containerd-config"
import sys, tomllib
rendered, dropin = (tomllib.load(open(p, "rb")) for p in sys.argv[1:])
dropin.pop("version")
sys.exit(0 if rendered == dropin else 1)
EOF
  must_install "$root" uninstall
  ok "the drop-in holds what kuasar-vmm --print-containerd-config renders"
}

command -v python3 >/dev/null || fail "python3 is needed"
make_payload
test_debian_v2
test_v3_with_imports_and_edit
test_no_config
test_upgrade
test_refusals
test_matches_kuasar_vmm
echo "test-install: all passed" >&2
