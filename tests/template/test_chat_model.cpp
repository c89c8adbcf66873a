// The default model's chat template (SmolLM2's ChatML with a default system prompt) rendered
// through kvlm's interpreter against the jinja2 renderings in tokenizer_goldens.json
// (tools/gen_tokenizer_goldens.py): the model's template and two other ChatML variants.

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "gguf/gguf.h"
#include "template/chat_template.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

using nlohmann::json;

const json& chat_goldens() {
  static const json g = [] {
    std::ifstream f(test::data_path("tokenizer_goldens.json"));
    std::stringstream ss;
    ss << f.rdbuf();
    return json::parse(ss.str())["chat"];
  }();
  return g;
}

std::string model_template() {
  static const std::string t = [] {
    auto file = GgufFile::open(test::model_path());
    return Tokenizer::from_gguf(*file)->chat_template();
  }();
  return t;
}

TEST(ChatModel, MatchesJinja2) {
  const json& chat = chat_goldens();
  EXPECT_EQ(model_template(), chat["templates"]["model"].get<std::string>());
  size_t n = 0;
  for (const json& c : chat["cases"]) {
    std::vector<ChatMessage> messages;
    for (const json& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    const std::string tmpl = chat["templates"][c["template"].get<std::string>()];
    EXPECT_EQ(apply_chat_template(tmpl, messages, c["add_generation_prompt"]),
              c["expected"].get<std::string>())
        << c["template"] << " " << c["messages"].dump();
    ++n;
  }
  EXPECT_GE(n, 40u);
}

TEST(ChatModel, SmolLM2DefaultSystemPrompt) {
  EXPECT_EQ(apply_chat_template(model_template(), {{"user", "Hi"}}, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatModel, NoTemplateIsAnError) {
  EXPECT_THROW(apply_chat_template("", {{"user", "hi"}}, true), Error);
}

}  // namespace
}  // namespace kvlm
