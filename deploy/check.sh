#!/usr/bin/env bash
# Checks the Kubernetes manifests of deploy/k8s (or of DIR):
#  - against the JSON schemas of the Kubernetes API, strictly (an unknown field is an error), for
#    the oldest version they support (1.30: admissionregistration.k8s.io/v1 policies) and the
#    newest the validator knows; a kind without a schema is an error too (the validator only
#    warns about it);
#  - against each other, the installer, and the admission policy's CEL run on sample pods
#    (deploy/check-manifests.py).
#
# Usage: deploy/check.sh [DIR]
# The validator (PyPI: kubernetes-validate, which bundles the API's schemas, and cel-python,
# pinned in deploy/check-requirements.txt) goes into a private venv, $KUASAR_CHECK_VENV
# (default /var/cache/kuasar/deploy-check-venv), on the first run only.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-$HERE/k8s}
VENV=${KUASAR_CHECK_VENV:-/var/cache/kuasar/deploy-check-venv}
REQUIREMENTS=$HERE/check-requirements.txt
KUBE_VERSIONS="1.30.0 1.37.0"

die() { echo "check.sh: $*" >&2; exit 1; }

# The venv is reused while it was made from the same requirements.
ensure_venv() {
  if cmp -s "$REQUIREMENTS" "$VENV/requirements.txt"; then return 0; fi
  echo "check.sh: installing the validator into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "cannot create a venv in $VENV (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" \
    || die "installing $REQUIREMENTS from PyPI into $VENV failed"
  cp "$REQUIREMENTS" "$VENV/requirements.txt"
}

ensure_venv
mapfile -t files < <(find "$DIR" -maxdepth 1 -name '*.yaml' | sort)
[ "${#files[@]}" -gt 0 ] || die "no *.yaml in $DIR"
failed=0
for version in $KUBE_VERSIONS; do
  if ! out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${files[@]}" 2>&1) \
    || grep -q . <<<"$out"; then
    echo "check.sh: Kubernetes $version:" >&2
    echo "$out" >&2
    failed=1
  fi
done
"$VENV/bin/python" "$HERE/check-manifests.py" "$DIR" "$HERE/installer/kuasar-install.sh" || failed=1
[ "$failed" = 0 ] || die "invalid manifests in $DIR"
echo "check.sh: ${#files[@]} manifest files valid for Kubernetes ${KUBE_VERSIONS// /, }" >&2
