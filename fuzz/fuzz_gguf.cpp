// A GGUF image from the fuzzer: parsed and validated in memory, then its tokenizer metadata.
#include <cstddef>
#include <cstdint>
#include <exception>

#include "base/error.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto file = kvlm::GgufFile::from_memory(data, size, "fuzz");
    (void)kvlm::Tokenizer::from_gguf(*file);
  } catch (const kvlm::Error&) {
    // refused with a message: the expected answer to a bad file
  }
  return 0;
}
