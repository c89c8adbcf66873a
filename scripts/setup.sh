#!/usr/bin/env bash
# Installs the Debian packages kvlm builds and tests with, only those that are missing.
# `setup.sh fuzz` also installs clang and its libFuzzer runtime (make fuzz, .ci/run).
# Needs root or sudo when something is missing; prints what it installs.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libfmt-dev libcli11-dev nlohmann-json3-dev libboost1.81-dev libxxhash-dev libpcre2-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libutf8proc-dev
  libssl-dev  # SHA-256 of the generated test models (tests/model/test_families.cpp)
  zlib1g-dev  # the tests read the gzipped Jargon File
  python3 python3-pip python3-venv curl
  chromium chromium-driver  # tests/server/test_web.py: the web page in a real (headless) browser
  jargon-text  # the shared text for kvlm perplexity: /usr/share/doc/jargon-text/jargon.txt.gz
)
if [ "${1:-}" = fuzz ]; then
  PACKAGES+=(clang libclang-rt-14-dev)  # clang++ and libclang_rt.fuzzer (fuzz/CMakeLists.txt)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all Debian packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "setup: missing packages (${missing[*]}) and not root; install them as root" >&2
    exit 1
  fi
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
