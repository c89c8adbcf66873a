// A session file from the fuzzer (kvlm chat's /load): Session::load on the tiny test model, then
// one more token fed over what was loaded. The last 8 bytes of the input are replaced by the
// checksum of the rest (session_file.cpp's layout), else almost every mutation would stop at the
// checksum; the seeds are files kvlm chat /save wrote (tools/make_session_seeds.sh). A refused
// load must leave the session exactly as it was: the target checks its tokens and logits.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "engine/session.h"
#include "model/model.h"

namespace {
struct Fixture {
  std::unique_ptr<kvlm::Model> model = kvlm::Model::load(KVLM_TEST_DATA "/tiny-llama.gguf");
  kvlm::ThreadPool pool{1};
  // Where each input is written: load reads a path (and refuses what is not a regular file).
  std::string path = (std::filesystem::temp_directory_path() /
                      ("kvlm-fuzz-session-" + std::to_string(getpid()) + ".bin"))
                         .string();
  ~Fixture() { std::remove(path.c_str()); }
};

void write_with_checksum(const std::string& path, const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  if (bytes.size() >= 8) {
    const uint64_t h = XXH64(bytes.data(), bytes.size() - 8, 0);
    std::memcpy(bytes.data() + bytes.size() - 8, &h, 8);
  }
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(),
                                                                static_cast<std::streamsize>(bytes.size()));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture f;
  write_with_checksum(f.path, data, size);
  kvlm::KvOptions kv;
  kv.n_ctx = 64;  // the seeds' cache shape (tools/make_session_seeds.sh: -c 64, f16 cache)
  kvlm::Session session(*f.model, kv, f.pool);
  const std::vector<int32_t> before = {1, 2, 3};
  session.feed(before);
  try {
    (void)session.load(f.path);
  } catch (const kvlm::Error&) {
    // Refused with a message: nothing may have changed.
    if (session.tokens() != before || session.n_cached() != 3) std::abort();
    return 0;
  }
  if (session.n_cached() < session.n_ctx()) {
    const int32_t next = 1;
    (void)session.feed({&next, 1});
  }
  return 0;
}
