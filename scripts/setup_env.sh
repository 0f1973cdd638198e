#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv/ and install fiber_d2 with its dependencies.
# Re-running on a ready machine installs nothing: a stamp file records the hash of every input.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FIBER_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.fiber_d2_installed"
D2_VERSION=0.7.2
inputs_hash=$(cat requirements.txt setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

fail() { echo "setup_env: FAILED at step '$1'. $2" >&2; exit 1; }

echo "setup_env: creating environment in $VENV (one time; a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || fail "create venv" "Is python3-venv installed?"
# pip; the machine-wide find-links notices ("Location ... is ignored") are filtered out.
pip_q() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

pip_q install -r requirements.txt || fail "pip install -r requirements.txt" "See the pip output above."

# detectron2: keep an importable one (e.g. built from source by the user); otherwise install the
# pure-Python re-distribution of detectron2 main (sal-detectron2) whose wheel is mis-tagged cp310.
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "setup_env: installing detectron2 $D2_VERSION (pure-Python wheel)"
  tmp=$(mktemp -d)
  pip_q download --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" \
    "sal-detectron2==$D2_VERSION" || fail "download detectron2" \
    "No detectron2 wheel reachable; build detectron2 from source into $VENV and re-run."
  whl=$(ls "$tmp"/*.whl | head -n1)
  fixed="$tmp/$(basename "$whl" | sed -E 's/-cp3[0-9]+-[^-]+-[^-]+\.whl$/-py3-none-any.whl/')"
  [ "$whl" = "$fixed" ] || cp "$whl" "$fixed"
  pip_q install --no-deps "$fixed" || fail "install detectron2" "See the pip output above."
  rm -rf "$tmp"
fi
"$VENV/bin/python" -W ignore -c "import detectron2, detectron2.engine" || fail "import detectron2" \
  "detectron2 is installed but does not import."

pip_q install --no-deps --no-build-isolation -e . || fail "pip install -e ." "See the pip output above."
"$VENV/bin/python" -W ignore -c "import fiber_d2" 2>/dev/null || fail "import fiber_d2" "The package does not import."
echo "$inputs_hash" > "$STAMP"
echo "setup_env: environment ready in $VENV"
