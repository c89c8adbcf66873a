#!/usr/bin/env bash
# Creates the virtual environment the end-to-end tests use (tests/server: the official `openai`
# client) and installs the pinned PyPI packages into it, only those missing or at another
# version. Debian's Python refuses system-wide pip installs (PEP 668), so the packages never go
# into the system: the venv lives in the build folder (VENV, default build/venv) and CMake runs
# the Python tests with its interpreter. Prints what it does. The C++ build needs none of it.
set -euo pipefail

VENV=${VENV:-build/venv}
# Debian's interpreter (stock Debian 12 has only that one); PYTHON overrides it.
PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
PINS=(
  openai==3.51.0
  jsonschema==4.26.0  # tests/server/test_structured.py validates constrained output
  selenium==4.40.0  # tests/server/test_web.py drives Debian's chromium through chromium-driver
  # tools/make_family_ggufs.py (make synthetic): the generated models are byte-identical only
  # with these versions
  gguf==0.19.0
  numpy==2.4.6
)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-python: creating $VENV with $("$PY" --version 2>&1) ($PY)"
  if ! "$PY" -m venv "$VENV"; then
    echo "setup-python: $PY cannot create a venv; install python3-venv (scripts/setup.sh)" >&2
    exit 1
  fi
fi
VPY="$VENV/bin/python"

missing=()
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  want=${pin#*==}
  have=$("$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
    2>/dev/null || true)
  if [ "$have" != "$want" ]; then
    missing+=("$pin")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-python: all Python test packages present in $VENV"
  exit 0
fi
echo "setup-python: installing ${missing[*]} into $VENV"
"$VPY" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
