// A chat template's source from the fuzzer, parsed and rendered over a fixed conversation: it
// must end in text or a kvlm::Error (syntax, undefined values, the interpreter's limits) or the
// template's own raise_exception, never a crash or a hang.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/error.h"
#include "template/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string source(reinterpret_cast<const char*>(data), size);
  static const std::vector<kvlm::ChatMessage> conversation = {
      {"system", "Be brief."}, {"user", "Hi there"}, {"assistant", "Hello!"}, {"user", "Why?"}};
  try {
    const kvlm::ChatTemplate t(source, kvlm::ChatEnv{"<s>", "</s>", 1721986200});
    (void)t.apply(conversation, true);
  } catch (const std::exception&) {
    // kvlm::Error or the template's raise_exception: both are answers
  }
  return 0;
}
