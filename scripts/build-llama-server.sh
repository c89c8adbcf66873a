#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-batched-bench, the serving peer of bench/serve_bench.py
# (--engines llama-server,llama-server-best), from the llama.cpp source vendored in the pinned
# llama-cpp-python sdist (the same llama.cpp the other benchmarks load through the Python
# bindings). CPU only. Everything lives outside the repository:
#
#   ${KVLM_BENCH_CACHE:-~/.cache/kvlm/bench}/llama.cpp-0.3.36/
#     sdist/                     the downloaded llama_cpp_python-0.3.36.tar.gz
#     src/                       the unpacked sdist (vendor/llama.cpp is built)
#     build/bin/llama-server     the binaries
#     build/bin/llama-batched-bench
#
# Idempotent: the download, the unpacking and the build are each skipped when their output
# exists; CMake rebuilds only what changed. Prints where the binaries are. Never part of
# `make test`. The build takes a while on 2 cores (set JOBS to use more).
set -euo pipefail

VERSION=0.3.36
PY=${PYTHON:-python3}
CACHE=${KVLM_BENCH_CACHE:-$HOME/.cache/kvlm/bench}
ROOT=$CACHE/llama.cpp-$VERSION
JOBS=${JOBS:-2}

die() { echo "build-llama-server: $*" >&2; exit 1; }

for tool in cmake g++ make tar; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool not found; install it (Debian: apt-get install cmake g++ make tar)"
done
"$PY" -m pip --version >/dev/null 2>&1 ||
  die "$PY has no pip (needed only to download the sdist); install python3-pip or set PYTHON"

mkdir -p "$ROOT/sdist"
sdist=$(ls "$ROOT"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
  echo "build-llama-server: downloading the llama-cpp-python==$VERSION sdist into $ROOT/sdist"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$ROOT/sdist" "llama-cpp-python==$VERSION" ||
    die "pip download of llama-cpp-python==$VERSION failed"
  sdist=$(ls "$ROOT"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
  [ -n "$sdist" ] || die "pip download left no llama_cpp_python-$VERSION.tar.gz in $ROOT/sdist"
fi

SRC=$ROOT/src
LLAMA=$SRC/vendor/llama.cpp
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
  echo "build-llama-server: unpacking $sdist"
  rm -rf "$SRC.tmp"
  mkdir -p "$SRC.tmp"
  tar -xzf "$sdist" -C "$SRC.tmp" --strip-components=1
  [ -f "$SRC.tmp/vendor/llama.cpp/tools/server/CMakeLists.txt" ] ||
    die "the sdist has no vendor/llama.cpp/tools/server; not the expected llama.cpp layout"
  rm -rf "$SRC"
  mv "$SRC.tmp" "$SRC"
fi

BUILD=$ROOT/build
BIN=$BUILD/bin
if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-batched-bench" ]; then
  echo "build-llama-server: building llama-server and llama-batched-bench in $BUILD (-j$JOBS)"
  # Tools are built (LLAMA_BUILD_TOOLS) but not tests or examples; the two targets are named,
  # so nothing else compiles. GGML_NATIVE: tuned to this CPU, like kvlm's own build.
  cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >"$ROOT/cmake-configure.log" 2>&1 ||
    die "cmake configure failed; see $ROOT/cmake-configure.log"
  cmake --build "$BUILD" -j"$JOBS" --target llama-server llama-batched-bench \
    >"$ROOT/cmake-build.log" 2>&1 ||
    die "cmake build failed; see the end of $ROOT/cmake-build.log"
fi

for b in llama-server llama-batched-bench; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing after the build"
done
echo "build-llama-server: llama-server        $BIN/llama-server"
echo "build-llama-server: llama-batched-bench $BIN/llama-batched-bench"
