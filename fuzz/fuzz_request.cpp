// An HTTP request body from the fuzzer through the server's parsing: JSON (depth and number
// limits), then the chat, the completion and the POST /kv/attention request rules with the tiny
// test model's tokenizer and plain ChatML. Every refusal is an HttpError (a 4xx with a message).
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string_view>

#include "base/error.h"
#include "gguf/gguf.h"
#include "model/config.h"
#include "server/api.h"
#include "server/kv_api.h"
#include "tokenizer/tokenizer.h"

namespace {
struct Fixture {
  std::unique_ptr<kvlm::GgufFile> file = kvlm::GgufFile::open(KVLM_TEST_DATA "/tiny-llama.gguf");
  std::unique_ptr<kvlm::Tokenizer> tok = kvlm::Tokenizer::from_gguf(*file);
  kvlm::server::ServedModel model;
  kvlm::ModelConfig config;  // only the layer and head counts bound /kv/attention's fields
  Fixture() {
    config.n_layer = 2;
    config.n_head = 4;
    model.id = "tiny";
    model.n_ctx = 128;
    model.capacity_tokens = 1024;
    model.chat_template = kvlm::server::served_chat_template(*tok);
  }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture f;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  try {
    const auto json = kvlm::server::parse_json_body(body);
    try {
      (void)kvlm::server::parse_chat_request(json, *f.tok, f.model, 1);
    } catch (const kvlm::server::HttpError&) {
    }
    try {
      (void)kvlm::server::parse_attention_request(json, *f.tok, f.model, f.config);
    } catch (const kvlm::server::HttpError&) {
    }
    (void)kvlm::server::parse_completion_request(json, *f.tok, f.model, 1);
  } catch (const kvlm::server::HttpError&) {
  }
  return 0;
}
