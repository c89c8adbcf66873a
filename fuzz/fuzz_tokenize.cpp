// Text from the fuzzer through two tokenizers, byte-level BPE (the tiny test model's SmolLM-style
// vocabulary) and SentencePiece (llama.cpp's llama-spm test vocabulary when
// scripts/fetch-refdata.sh has fetched it), with and without special tokens, and decoded back
// (streamed too): invalid UTF-8 becomes U+FFFD, nothing crashes. The same text, less its first
// byte, also goes through the pre-tokenizer that byte picks (every kind, including those whose
// vocabularies only test_pretok_names makes): its words must cover the text exactly.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"
#include "gguf/gguf.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace {
struct Vocab {
  std::unique_ptr<kvlm::GgufFile> file;
  std::unique_ptr<kvlm::Tokenizer> tok;
};

std::vector<Vocab> load() {
  std::vector<std::string> paths = {KVLM_TEST_DATA "/tiny-llama.gguf"};
  const char* home = std::getenv("HOME");
  paths.push_back(std::string(home ? home : ".") +
                  "/.cache/kvlm/refdata/llama.cpp-0.3.36/ggml-vocab-llama-spm.gguf");
  std::vector<Vocab> out;
  for (const std::string& p : paths) {
    try {
      Vocab v{kvlm::GgufFile::open(p), nullptr};
      v.tok = kvlm::Tokenizer::from_gguf(*v.file);
      out.push_back(std::move(v));
    } catch (const kvlm::Error&) {
      // the SentencePiece vocabulary is optional (fetched by scripts/fetch-refdata.sh)
    }
  }
  return out;
}
// Words of no codepoints, or lengths that do not sum to the text's, would make the BPE merge
// across words or drop text: abort so that libFuzzer reports the input.
void check_pretokenize(const uint8_t* data, size_t size) {
  if (size == 0) return;
  constexpr int kKinds = static_cast<int>(kvlm::tok::PreKind::Sarvam) + 1;
  const auto kind = static_cast<kvlm::tok::PreKind>(data[0] % kKinds);
  std::vector<uint32_t> cpts, lens, scratch;
  kvlm::tok::decode_utf8_lenient(
      std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1), &cpts);
  std::vector<uint8_t> flags(cpts.size());
  for (size_t i = 0; i < cpts.size(); ++i) flags[i] = kvlm::tok::cpt_flags(cpts[i]);
  kvlm::tok::pretokenize(kind, cpts.data(), flags.data(), cpts.size(), &lens, &scratch);
  size_t sum = 0;
  for (uint32_t len : lens) {
    if (len == 0) std::abort();
    sum += len;
  }
  if (sum != cpts.size()) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<Vocab> vocabs = load();
  check_pretokenize(data, size);
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (const Vocab& v : vocabs) {
    for (const bool special : {false, true}) {
      const std::vector<int32_t> ids = v.tok->encode(text, special, special);
      (void)v.tok->decode(ids, special);
      kvlm::StreamDecoder stream(*v.tok, special);
      for (int32_t id : ids) (void)stream.push(id);
      (void)stream.flush();
    }
  }
  return 0;
}
