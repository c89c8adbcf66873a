#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS on its corpus (make fuzz; .ci/run). Corpora start from
# the committed fuzz/corpus/TARGET (seeds and every input that once crashed) and the repository's
# other inputs: GGUF files of tests/data, llama.cpp's chat templates and vocab test texts
# (scripts/fetch-refdata.sh). A crash, sanitizer report or timeout stops with the target's
# reproducer file (crash-*, timeout-*) in BUILD/corpus/; fix it, then copy the file into
# fuzz/corpus/TARGET so its fuzz_replay_* ctest (fuzz_session: fuzz_replay_session) keeps replaying it.
set -euo pipefail
BUILD=$1 SECONDS_EACH=$2
shift 2
REF=${KVLM_REFDATA:-$HOME/.cache/kvlm/refdata}/llama.cpp-0.3.36
for t in "$@"; do
  dir="$BUILD/corpus/$t"
  mkdir -p "$dir"
  if [ -d "fuzz/corpus/$t" ]; then cp -n fuzz/corpus/"$t"/* "$dir/" || true; fi
  case $t in
    fuzz_gguf) cp -n tests/data/*.gguf "$dir/" 2>/dev/null || true ;;
    fuzz_template) cp -n "$REF"/templates/*.jinja "$dir/" 2>/dev/null || true ;;
    fuzz_tokenize) cp -n "$REF"/*.inp "$dir/" 2>/dev/null || true ;;
  esac
  echo "fuzz: $t for ${SECONDS_EACH}s ($(ls "$dir" | wc -l) corpus files)"
  bin=$(realpath "$BUILD")/bin/$t
  [ -x "$bin" ] || bin=$(realpath "$BUILD")/fuzz/$t
  (cd "$dir/.." && "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=4096 \
    -max_len=1048576 -print_final_stats=1 "$t" 2>&1 | tail -n 12)
done
