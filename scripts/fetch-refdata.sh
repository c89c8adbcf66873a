#!/usr/bin/env bash
# Fetches the reference data that llama.cpp itself tests with, from the pinned llama-cpp-python
# sdist (downloaded, never installed or built here): its vocab-only GGUFs with .inp/.out
# tokenization pairs (vendor/llama.cpp/models/ggml-vocab-*) and its real chat templates
# (vendor/llama.cpp/models/templates/*.jinja). Only those are unpacked, into
#
#   ${KVLM_REFDATA:-~/.cache/kvlm/refdata}/llama.cpp-0.3.36/models/
#
# The sdist itself is shared with scripts/build-llama-server.sh
# (${KVLM_BENCH_CACHE:-~/.cache/kvlm/bench}/llama.cpp-0.3.36/sdist/). Idempotent: a present,
# checked sdist is not downloaded again, a complete unpack is kept. `make test` runs this first;
# the tests that read the data find it at the path above.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PY=${PYTHON:-python3}
SDIST_DIR=${KVLM_BENCH_CACHE:-$HOME/.cache/kvlm/bench}/llama.cpp-$VERSION/sdist
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
DEST=${KVLM_REFDATA:-$HOME/.cache/kvlm/refdata}/llama.cpp-$VERSION

die() { echo "fetch-refdata: error: $*" >&2; exit 1; }
checked() { [ -f "$SDIST" ] && [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$DEST/.complete" ]; then
  echo "fetch-refdata: $DEST present"
  exit 0
fi
if ! checked; then
  mkdir -p "$SDIST_DIR"
  echo "fetch-refdata: downloading the llama-cpp-python==$VERSION sdist (about 77 MB)"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$SDIST_DIR" "llama-cpp-python==$VERSION" ||
    die "pip download of llama-cpp-python==$VERSION failed (is PyPI reachable and pip installed?)"
  checked || die "sha256 of $SDIST is not $SHA256"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$SDIST" -C "$tmp" --strip-components=3 --wildcards \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*" ||
  die "unpacking $SDIST failed"
[ -d "$tmp/models/templates" ] || die "the sdist has no vendor/llama.cpp/models/templates"
touch "$tmp/models/.complete"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$tmp/models" "$DEST"
echo "fetch-refdata: placed $(ls "$DEST" | grep -c '^ggml-vocab-.*\.gguf$') vocab files and" \
  "$(ls "$DEST/templates" | wc -l) templates in $DEST"
