// kvlm_tokenize_bench GGUF TEXT_FILE [RUNS]: encode speed of a model's (or vocab-only file's)
// tokenizer on a text, best of RUNS (default 7) encodes, with the id count and a hash of the ids
// so that two builds can be checked to agree as well as compared for speed:
//
//   zcat /usr/share/doc/jargon-text/jargon.txt.gz > /tmp/jargon.txt
//   build/bin/kvlm_tokenize_bench ~/.cache/kvlm/models/SmolLM2-135M-Instruct.Q4_1.gguf
//   /tmp/jargon.txt
//
// Long runs of one character must stay linear (a BPE that re-scans its pieces is quadratic):
// 100x the characters should take ~100x the time, never ~10,000x:
//
//   for n in 2000 200000; do printf '%*s' $n '' > /tmp/spaces-$n.txt;
//     build/bin/kvlm_tokenize_bench MODEL.gguf /tmp/spaces-$n.txt; done   (one line)
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "base/error.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr, "usage: kvlm_tokenize_bench GGUF TEXT_FILE [RUNS]\n");
    return 2;
  }
  try {
    const auto file = kvlm::GgufFile::open(argv[1]);
    const auto tok = kvlm::Tokenizer::from_gguf(*file);
    std::ifstream in(argv[2], std::ios::binary);
    if (!in) kvlm::fail("{}: cannot read", argv[2]);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    const int runs = argc > 3 ? std::max(1, std::atoi(argv[3])) : 7;
    double best_ms = 1e300;
    std::vector<int32_t> ids;
    for (int r = 0; r < runs; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      ids = tok->encode(text, /*add_bos=*/false, /*parse_special=*/false);
      const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
      best_ms = std::min(best_ms, dt.count());
    }
    uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a 64 over the ids' little-endian bytes
    for (int32_t id : ids)
      for (int k = 0; k < 4; ++k) {
        h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xFF;
        h *= 0x100000001B3ull;
      }
    fmt::print("{} bytes -> {} ids (fnv {:016x}); best of {}: {:.1f} ms, {:.2f} MB/s\n",
               text.size(), ids.size(), h, runs, best_ms, text.size() / best_ms / 1e3);
  } catch (const kvlm::Error& e) {
    fmt::print(stderr, "kvlm_tokenize_bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
