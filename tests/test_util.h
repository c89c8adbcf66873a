// Shared helpers for tests: where the committed data and the default model are.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>
#include <string>

namespace kvlm::test {

inline std::string data_path(const std::string& name) {
  return std::string(KVLM_TEST_DATA) + "/" + name;
}

// The default model, as scripts/fetch-model.sh places it. `make test` fetches it first, so a
// missing model is a set-up error and the tests that need it fail (they do not skip).
// `file` in the models directory (KVLM_MODELS, else ~/.cache/kvlm/models).
inline std::string models_file(const std::string& file) {
  std::string dir;
  if (const char* d = std::getenv("KVLM_MODELS"); d && *d) {
    dir = d;
  } else {
    const char* home = std::getenv("HOME");
    dir = std::string(home ? home : ".") + "/.cache/kvlm/models";
  }
  return dir + "/" + file;
}

inline std::string model_path() {
  if (const char* m = std::getenv("KVLM_MODEL"); m && *m) return m;
  return models_file("SmolLM2-135M-Instruct.Q4_1.gguf");
}

// The second real model (scripts/fetch-model.sh gemma3-270m; `make test` fetches it too).
inline std::string gemma3_270m_path() { return models_file("gemma-3-270m-q4_k_m.gguf"); }

// llama.cpp's own reference data (vocab-only GGUFs with .inp/.out pairs, templates/*.jinja), as
// scripts/fetch-refdata.sh places it; `make test` fetches it first, so missing data is a set-up
// error and the tests that need it fail.
inline std::string refdata_dir() {
  std::string dir;
  if (const char* d = std::getenv("KVLM_REFDATA"); d && *d) {
    dir = d;
  } else {
    const char* home = std::getenv("HOME");
    dir = std::string(home ? home : ".") + "/.cache/kvlm/refdata";
  }
  return dir + "/llama.cpp-0.3.36";
}

// Generated models too large to commit (tools/make_family_ggufs.py writes them; `make test` runs
// it first through `make synthetic`), checked by sha256 against their goldens.
inline std::string synthetic_dir() {
  if (const char* d = std::getenv("KVLM_SYNTHETIC"); d && *d) return d;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/kvlm/synthetic";
}

// n token ids in [0, n_vocab), the same for the same seed.
inline std::vector<int32_t> random_tokens(int n, int32_t n_vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % n_vocab);
  return t;
}

// kB in field `field` ("Rss", "AnonHugePages", ...) of the mapping of this process that holds
// addr, from /proc/self/smaps; -1 if no mapping holds it or the field is absent.
inline long smaps_kb(const void* addr, const std::string& field) {
  std::ifstream in("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(addr);
  const std::string fmt = field + ": %ld kB";
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find('-') < 17) {
      inside = lo <= a && a < hi;
      continue;
    }
    long kb = 0;
    if (inside && std::sscanf(line.c_str(), fmt.c_str(), &kb) == 1) return kb;
  }
  return -1;
}

}  // namespace kvlm::test
