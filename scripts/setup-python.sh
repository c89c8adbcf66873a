#!/usr/bin/env bash
# Installs the pinned PyPI packages the end-to-end tests use (tests/server: the official `openai`
# client) into the `python3` on PATH, only those missing or at another version. Prints what it
# installs. The C++ build needs none of them.
set -euo pipefail

PY=${PYTHON:-python3}
PINS=(
  openai==3.51.0
)

missing=()
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  want=${pin#*==}
  have=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
    2>/dev/null || true)
  if [ "$have" != "$want" ]; then
    missing+=("$pin")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-python: all Python test packages present ($("$PY" --version 2>&1))"
  exit 0
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "setup-python: $PY has no pip; install python3-pip (scripts/setup.sh) or set PYTHON" >&2
  exit 1
fi
echo "setup-python: installing ${missing[*]} for $("$PY" --version 2>&1) ($(command -v "$PY"))"
"$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
