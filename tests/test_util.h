// Shared helpers for tests: where the committed data and the default model are.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace kvlm::test {

inline std::string data_path(const std::string& name) {
  return std::string(KVLM_TEST_DATA) + "/" + name;
}

// The default model, as scripts/fetch-model.sh places it. `make test` fetches it first, so a
// missing model is a set-up error and the tests that need it fail (they do not skip).
inline std::string model_path() {
  if (const char* m = std::getenv("KVLM_MODEL"); m && *m) return m;
  std::string dir;
  if (const char* d = std::getenv("KVLM_MODELS"); d && *d) {
    dir = d;
  } else {
    const char* home = std::getenv("HOME");
    dir = std::string(home ? home : ".") + "/.cache/kvlm/models";
  }
  return dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace kvlm::test
