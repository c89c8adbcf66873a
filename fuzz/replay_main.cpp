// Replays fuzz inputs without libFuzzer: every file given (or inside a folder given) through the
// target's LLVMFuzzerTestOneInput once. The ctest fuzz_replay_* tests run the committed corpora
// (fuzz/corpus/TARGET: seeds and every crash the fuzzers found) and the shared seeds this way in
// the ordinary and the sanitizer builds, so a fixed crash stays fixed without clang.
// An argument starting with "@refdata/" is under llama.cpp's reference data (test_util.h).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "test_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace fs = std::filesystem;

namespace {
std::vector<fs::path> inputs(const std::string& arg) {
  const std::string prefix = "@refdata/";
  const fs::path p = arg.starts_with(prefix)
                         ? fs::path(kvlm::test::refdata_dir()) / arg.substr(prefix.size())
                         : fs::path(arg);
  std::vector<fs::path> out;
  if (fs::is_directory(p)) {
    for (const auto& e : fs::directory_iterator(p))
      if (e.is_regular_file()) out.push_back(e.path());
  } else if (fs::is_regular_file(p)) {
    out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  size_t n = 0;
  for (int i = 1; i < argc; ++i) {
    const auto files = inputs(argv[i]);
    // A missing corpus would make the test pass on nothing.
    if (files.empty()) {
      std::fprintf(stderr, "replay: no input files at %s\n", argv[i]);
      return 1;
    }
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::fprintf(stderr, "replay: %s (%zu bytes)\n", f.c_str(), bytes.size());
      LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
      ++n;
    }
  }
  std::fprintf(stderr, "replay: %zu inputs, no crash\n", n);
  return 0;
}
