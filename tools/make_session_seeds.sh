#!/usr/bin/env bash
# Writes the seed corpus of fuzz/fuzz_session.cpp: session files that `kvlm chat` /save wrote on
# the tiny test model with an f16 cache (the shape the fuzz target loads into), one after a turn
# one after two and one after /clear. Usage: tools/make_session_seeds.sh [KVLM] (default build/bin/kvlm).
set -euo pipefail
cd "$(dirname "$0")/.."
KVLM=${1:-build/bin/kvlm}
OUT=fuzz/corpus/fuzz_session
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The tiny model has no chat template of its own: a minimal one.
printf '%s' '{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}' >"$tmp/t.jinja"
chat() { "$KVLM" chat -m tests/data/tiny-llama.gguf --chat-template "$tmp/t.jinja" -c 64 \
  --temp 0 -n 4 -t 1 >/dev/null 2>&1; }
printf 'Hello!\n/save %s\n/quit\n' "$OUT/one-turn.kvs" | chat
printf 'Hi\n/clear\n/save %s\n/quit\n' "$OUT/empty-after-clear.kvs" | chat
printf 'Hi\nAgain\n/save %s\n/quit\n' "$OUT/two-turns.kvs" | chat
ls -l "$OUT"
