#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS on its corpus (make fuzz). Corpora start from the
# repository's own inputs: GGUF files of tests/data, llama.cpp's chat templates and vocab test
# texts (scripts/fetch-refdata.sh), request bodies written here. A crash, sanitizer report or
# timeout stops with the target's reproducer file (crash-*, timeout-*) in BUILD/corpus/TARGET/..
set -euo pipefail
BUILD=$1 SECONDS_EACH=$2
shift 2
REF=${KVLM_REFDATA:-$HOME/.cache/kvlm/refdata}/llama.cpp-0.3.36
for t in "$@"; do
  dir="$BUILD/corpus/$t"
  mkdir -p "$dir"
  case $t in
    fuzz_gguf) cp -n tests/data/*.gguf "$dir/" 2>/dev/null || true ;;
    fuzz_template) cp -n "$REF"/templates/*.jinja "$dir/" 2>/dev/null || true ;;
    fuzz_tokenize) cp -n "$REF"/*.inp "$dir/" 2>/dev/null || true ;;
    fuzz_request)
      printf '%s' '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}' >"$dir/chat.json"
      printf '%s' '{"prompt":"hi","max_tokens":4,"logit_bias":{"1":5},"stop":["x"]}' >"$dir/completion.json" ;;
  esac
  echo "fuzz: $t for ${SECONDS_EACH}s ($(ls "$dir" | wc -l) corpus files)"
  bin=$(realpath "$BUILD")/bin/$t
  [ -x "$bin" ] || bin=$(realpath "$BUILD")/fuzz/$t
  (cd "$dir/.." && "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=4096 \
    -max_len=1048576 -print_final_stats=1 "$t" 2>&1 | tail -n 12)
done
