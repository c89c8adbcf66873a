#!/usr/bin/env bash
# Installs the pinned PyPI packages the benchmarks in bench/ need into the `python3` on PATH (or
# $PYTHON), only those missing or at another version, and prints what it installs. Not part of
# `make test`: tests never need llama.cpp.
#
#   bench/compare_llamacpp.py, bench/kv_quality.py : llama-cpp-python==0.3.36, numpy
#   bench/serve_bench.py                           : the same llama-cpp-python plus the
#       dependencies of its [server] extra (uvicorn, fastapi, sse-starlette, starlette-context,
#       pydantic-settings), pinned to the versions the benchmark was run with.
#
# llama-cpp-python has no binary wheel here: pip compiles its bundled llama.cpp (about 25
# minutes on 2 cores). It is installed only when missing or at another version, and the server
# extras are installed as plain packages, never as `llama-cpp-python[server]`, so an existing
# 0.3.36 build is never rebuilt.
set -euo pipefail

PY=${PYTHON:-python3}
LLAMA_PIN=llama-cpp-python==0.3.36
# Exact pins ("name==version"), or "name" alone: any installed version will do.
PINS=(
  numpy
  uvicorn==0.54.0
  fastapi==0.165.0
  starlette==1.10.0
  sse-starlette==3.7.0
  starlette-context==0.3.6
  pydantic-settings==2.14.1
)

have_version() {  # prints the installed version of distribution $1, or nothing
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true
}

needs() {  # "name==ver" or "name": true when missing or at another version
  local pin=$1 name want have
  name=${pin%%==*}
  have=$(have_version "$name")
  if [ "$pin" = "$name" ]; then
    [ -z "$have" ]
  else
    want=${pin#*==}
    [ "$have" != "$want" ]
  fi
}

if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "setup-bench: $PY has no pip; install python3-pip (scripts/setup.sh) or set PYTHON" >&2
  exit 1
fi

if needs "$LLAMA_PIN"; then
  have=$(have_version llama-cpp-python)
  echo "setup-bench: installing $LLAMA_PIN (found: ${have:-none}); pip compiles llama.cpp, about" \
    "25 minutes on 2 cores"
  "$PY" -m pip install --quiet --disable-pip-version-check "$LLAMA_PIN"
fi

missing=()
for pin in "${PINS[@]}"; do
  if needs "$pin"; then
    missing+=("$pin")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-bench: all benchmark packages present ($("$PY" --version 2>&1), $LLAMA_PIN)"
else
  echo "setup-bench: installing ${missing[*]} for $("$PY" --version 2>&1) ($(command -v "$PY"))"
  "$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi

# The server must import (a missing transitive dependency shows here, not mid-benchmark).
if ! "$PY" -c "import llama_cpp.server.app, uvicorn, sse_starlette, starlette_context" 2>/dev/null
then
  echo "setup-bench: llama_cpp.server does not import; run: $PY -c 'import llama_cpp.server.app'" >&2
  exit 1
fi
