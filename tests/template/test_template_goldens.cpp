// Every chat template of llama.cpp's reference data rendered through kvlm's interpreter must
// match jinja2's rendering (tests/data/template_goldens.json, tools/gen_template_goldens.py)
// byte for byte, including the conversations the template refuses (kvlm must refuse them too).

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "base/error.h"
#include "template/chat_template.h"
#include "test_util.h"

namespace kvlm {
namespace {

using nlohmann::json;

// Templates whose renderings of the golden conversations kvlm matches byte for byte.
const std::set<std::string> kChecked = {
    "Apertus-8B-Instruct.jinja",
    "Apriel-1.6-15b-Thinker-fixed.jinja",
    "Bielik-11B-v3.0-Instruct.jinja",
    "ByteDance-Seed-OSS.jinja",
    "Cohere2MoE.jinja",
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
    "GLM-4.6.jinja",
    "GLM-4.7-Flash.jinja",
    "GigaChat3-10B-A1.8B.jinja",
    "GigaChat3.1-10B-A1.8B.jinja",
    "HuggingFaceTB-SmolLM3-3B.jinja",
    "Kimi-K2-Instruct.jinja",
    "Kimi-K2-Thinking.jinja",
    "Kimi-K3.jinja",
    "LFM2-8B-A1B.jinja",
    "LFM2.5-8B-A1B.jinja",
    "LFM2.5-Instruct.jinja",
    "MiMo-VL.jinja",
    "MiniMax-M1.jinja",
    "MiniMax-M2.jinja",
    "MiniMax-M3.jinja",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja",
    "NVIDIA-Nemotron-Nano-v2.jinja",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "Qwen-QwQ-32B.jinja",
    "Qwen-Qwen2.5-7B-Instruct.jinja",
    "Qwen-Qwen3-0.6B.jinja",
    "Qwen3-Coder.jinja",
    "Qwen3.5-4B.jinja",
    "Reka-Edge.jinja",
    "Spark2.5.jinja",
    "StepFun3.5-Flash.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "deepseek-ai-DeepSeek-V3.1.jinja",
    "deepseek-ai-DeepSeek-V3.2.jinja",
    "deepseek-ai-DeepSeek-V4-Flash-0731.jinja",
    "deepseek-ai-DeepSeek-V4.jinja",
    "fireworks-ai-llama-3-firefunction-v2.jinja",
    "google-gemma-2-2b-it.jinja",
    "google-gemma-4-31B-it-interleaved.jinja",
    "google-gemma-4-31B-it.jinja",
    "ibm-granite-granite-3.3-2B-Instruct.jinja",
    "ibm-granite-granite-4.0.jinja",
    "ibm-granite-granite-4.1.jinja",
    "inclusionai-ling-3.0-flash.jinja",
    "llama-cpp-deepseek-r1.jinja",
    "llama-cpp-rwkv-world.jinja",
    "meetkai-functionary-medium-v3.1.jinja",
    "meetkai-functionary-medium-v3.2.jinja",
    "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "meta-llama-Llama-3.3-70B-Instruct.jinja",
    "microsoft-Phi-3.5-mini-instruct.jinja",
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "moonshotai-Kimi-K2.jinja",
    "muse-glimmer.jinja",
    "openai-gpt-oss-120b.jinja",
    "openbmb-MiniCPM5-1B.jinja",
    "poolside-Laguna-S-2.1.jinja",
    "poolside-Laguna-XS-2.1.jinja",
    "poolside-Laguna-XS.2.jinja",
    "tencent-Hy3.jinja",
    "unsloth-Apriel-1.5.jinja",
    "unsloth-mistral-Devstral-Small-2507.jinja",
    "upstage-Solar-Open-100B.jinja",
};

// Templates that need what a plain conversation does not give them; each is listed with why.
const std::map<std::string, std::string> kExcluded = {};

// Checked templates whose conversations with tools or tool calls are not compared, each with why (their plain
// conversations are).
const std::map<std::string, std::string> kToolsUnchecked = {
    {"llama-cpp-deepseek-r1.jinja",
     "jinja2 itself fails on tools (tojson of a generator); kvlm renders them"},
    {"meetkai-functionary-medium-v3.1.jinja",
     "jinja2 HTML-escapes its tools' JSON (&#34;), which kvlm does not"},
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::time_t golden_date(const std::string& iso) {
  std::tm tm{};
  std::istringstream(iso) >> std::get_time(&tm, "%Y-%m-%dT%H:%M:%S");
  tm.tm_isdst = -1;
  return std::mktime(&tm);
}

const json& goldens() {
  static const json g = json::parse(read_file(test::data_path("template_goldens.json")));
  return g;
}

std::string template_dir() { return test::refdata_dir() + "/templates"; }

TEST(TemplateGoldens, EveryTemplateIsCheckedOrExcludedWithAReason) {
  ASSERT_TRUE(std::filesystem::is_directory(template_dir()))
      << template_dir() << " is missing: run scripts/fetch-refdata.sh";
  std::set<std::string> on_disk;
  for (const auto& e : std::filesystem::directory_iterator(template_dir()))
    if (e.path().extension() == ".jinja") on_disk.insert(e.path().filename().string());
  std::set<std::string> in_goldens;
  for (const auto& [name, _] : goldens()["templates"].items()) in_goldens.insert(name);
  EXPECT_EQ(on_disk, in_goldens) << "rerun tools/gen_template_goldens.py";
  for (const std::string& name : on_disk)  // a new template needs a decision
    EXPECT_EQ(kChecked.count(name) + kExcluded.count(name), 1u)
        << name << " must be in exactly one of kChecked and kExcluded";
  for (const auto& [name, reason] : kExcluded) {
    EXPECT_TRUE(on_disk.count(name)) << name << " is excluded but not a template";
    EXPECT_FALSE(reason.empty());
  }
  for (const std::string& name : kChecked)
    EXPECT_TRUE(on_disk.count(name)) << name << " is checked but not a template";
  for (const auto& [name, reason] : kToolsUnchecked)
    EXPECT_TRUE(kChecked.count(name) && !reason.empty()) << name;
}

// A golden conversation's messages in OpenAI's request shapes (tool calls' arguments as JSON
// text), as kvlm serve passes them to the template.
std::vector<ChatMessage> messages(const json& list) {
  std::vector<ChatMessage> out;
  for (const json& m : list) {
    ChatMessage msg{m["role"], m["content"].is_null() ? "" : m["content"].get<std::string>()};
    msg.content_none = m["content"].is_null();
    for (const json& call : m.value("tool_calls", json::array()))
      msg.tool_calls.push_back(
          {call["id"], call["function"]["name"], call["function"]["arguments"]});
    msg.tool_call_id = m.value("tool_call_id", "");
    msg.name = m.value("name", "");
    out.push_back(std::move(msg));
  }
  return out;
}

class Golden : public testing::TestWithParam<std::string> {};

TEST_P(Golden, MatchesJinja2) {
  const std::string name = GetParam();
  const json& g = goldens();
  ChatEnv env;
  env.bos_token = g["env"]["bos_token"];
  env.eos_token = g["env"]["eos_token"];
  env.now = golden_date(g["env"]["date"]);
  const std::string source = read_file(template_dir() + "/" + name);
  ASSERT_FALSE(source.empty()) << name;
  const ChatTemplate tmpl(source, env);
  const json& convs = g["conversations"];
  const json& expect = g["templates"][name];
  for (size_t c = 0; c < convs.size(); ++c) {
    const std::vector<ChatMessage> msgs = messages(convs[c]["messages"]);
    const std::string tools = convs[c].contains("tools") ? convs[c]["tools"].get<std::string>() : "";
    const bool gen = convs[c]["add_generation_prompt"];
    const bool calls = std::any_of(msgs.begin(), msgs.end(), [](const ChatMessage& m) {
      return !m.tool_calls.empty() || m.role == "tool";
    });
    if ((!tools.empty() || calls) && kToolsUnchecked.count(name)) continue;
    const std::string conv = convs[c]["name"];
    if (expect[c].contains("error")) {
      try {
        const std::string out = tmpl.apply(msgs, gen, tools);
        ADD_FAILURE() << name << " / " << conv << ": jinja2 raised " << expect[c]["error"] << ": "
                      << expect[c]["message"] << "\nbut kvlm rendered:\n" << out;
      } catch (const Error& e) {
        if (expect[c]["error"] == "TemplateError") {  // raise_exception: the template's words
          EXPECT_NE(std::string(e.what()).find(expect[c]["message"].get<std::string>()),
                    std::string::npos) << name << " / " << conv << ": " << e.what();
        }
      }
      continue;
    }
    std::string out;
    try {
      out = tmpl.apply(msgs, gen, tools);
    } catch (const Error& e) {
      ADD_FAILURE() << name << " / " << conv << ": " << e.what();
      continue;
    }
    EXPECT_EQ(out, expect[c]["text"].get<std::string>())
        << name << " / " << conv << ": kvlm rendered\n" << out;
  }
}


std::string test_name(const testing::TestParamInfo<std::string>& info) {
  std::string s = info.param.substr(0, info.param.size() - 6);
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(Templates, Golden, testing::ValuesIn(kChecked), test_name);

}  // namespace
}  // namespace kvlm
