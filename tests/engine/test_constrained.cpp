// Constrained sampling through the scheduler with the real SmolLM2 model: greedy and seeded
// draws under several JSON schemas give text that parses and that the schema's grammar takes,
// ending with Stop; max_tokens reached first ends with Length. Also prints what a mask costs per
// token over the real 49,152-token vocabulary (docs/SERVER.md quotes it).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <mutex>
#include <nlohmann/json.hpp>

#include "engine/scheduler.h"
#include "engine/session.h"
#include "grammar/json_schema.h"
#include "grammar/matcher.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

using json = nlohmann::json;

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

struct Smol {
  std::unique_ptr<Model> model = Model::load(test::model_path());
  std::unique_ptr<Tokenizer> tok = Tokenizer::from_gguf(model->gguf());
};
Smol& smol() {
  static Smol s;
  return s;
}

// SmolLM2's ChatML turn asking for `what`.
std::vector<int32_t> chat_prompt(const Tokenizer& tok, const std::string& what) {
  const std::string text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n" + what + "<|im_end|>\n<|im_start|>assistant\n";
  return tok.encode(text, false, /*parse_special=*/true);
}

struct Case {
  const char* ask;
  const char* schema;  // nullptr: json_object
};

const Case kCases[] = {
    {"Describe a cat as JSON.", nullptr},
    {"Give a person's name and age.",
     R"({"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},
        "required":["name","age"],"additionalProperties":false})"},
    {"List three colours.",
     R"({"type":"object","properties":{"colours":{"type":"array","items":{"enum":["red","green","blue","yellow"]},
        "minItems":3,"maxItems":3}},"required":["colours"]})"},
    {"Is the sky blue? Answer with a verdict and a confidence.",
     R"({"type":"object","properties":{"verdict":{"type":"boolean"},"confidence":{"type":"number"},
        "note":{"anyOf":[{"type":"string"},{"type":"null"}]}},"required":["verdict","confidence","note"]})"},
    {"Describe a small family tree.",
     R"({"$ref":"#/$defs/p","$defs":{"p":{"type":"object","properties":{"name":{"type":"string"},
        "children":{"type":"array","items":{"$ref":"#/$defs/p"},"maxItems":2}},"required":["name","children"]}}})"},
};

struct Result {
  std::mutex mu;
  std::vector<int32_t> tokens;
  RequestEvent last;
};

std::shared_ptr<const Grammar> grammar_of(const Case& c) {
  return c.schema ? compile_json_schema(json::parse(c.schema)) : json_object_grammar();
}

// The generated text, ends of generation left out.
std::string text_of(const Tokenizer& tok, const std::vector<int32_t>& tokens) {
  std::vector<int32_t> text_ids;
  for (int32_t t : tokens)
    if (!tok.is_eog(t)) text_ids.push_back(t);
  return tok.decode(text_ids, false);
}

// A whole output of case i: it parses, the case's grammar takes all of it, and its fields have
// the schema's types.
void check_output(size_t i, const std::string& text) {
  json parsed;
  ASSERT_NO_THROW(parsed = json::parse(text)) << "case " << i << ": " << text;
  EXPECT_TRUE(parsed.is_object()) << text;
  GrammarMatcher m(grammar_of(kCases[i]), TokenTrie::single_bytes());
  EXPECT_TRUE(m.accept_bytes(text) && m.complete()) << text;
  std::printf("  [%zu] %s\n", i, text.c_str());
  if (i == 1) {
    EXPECT_TRUE(parsed["name"].is_string());
    EXPECT_TRUE(parsed["age"].is_number_integer());
    EXPECT_EQ(parsed.size(), 2u);
  }
  if (i == 2) {
    ASSERT_TRUE(parsed["colours"].is_array());
    EXPECT_EQ(parsed["colours"].size(), 3u);
  }
  if (i == 3) {
    EXPECT_TRUE(parsed["verdict"].is_boolean());
    EXPECT_TRUE(parsed["confidence"].is_number());
    EXPECT_TRUE(parsed["note"].is_string() || parsed["note"].is_null());
  }
}

// Every case at once through one scheduler (batched), greedy or at temperature 1.
void run_cases(float temperature, uint64_t seed, int32_t max_tokens) {
  Smol& s = smol();
  SchedulerConfig cfg;
  cfg.n_parallel = 8;
  cfg.n_ctx = 1024;
  cfg.kv_budget_tokens = 8 * 1024;
  Scheduler sch(*s.model, *s.tok, cfg, pool());
  std::vector<std::unique_ptr<Result>> results;
  for (const Case& c : kCases) {
    Request r;
    r.prompt = chat_prompt(*s.tok, c.ask);
    r.max_tokens = max_tokens;
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    r.grammar = grammar_of(c);
    results.push_back(std::make_unique<Result>());
    Result* out = results.back().get();
    sch.submit(std::move(r), [out](const RequestEvent& e) {
      std::lock_guard lk(out->mu);
      if (e.done) out->last = e;
      else out->tokens.push_back(e.token);
    });
  }
  sch.wait_idle();
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = *results[i];
    const std::string text = text_of(*s.tok, r.tokens);
    if (r.last.finish == FinishReason::Length) {
      EXPECT_EQ(r.last.n_generated, max_tokens) << text;
      continue;
    }
    ASSERT_EQ(r.last.finish, FinishReason::Stop) << "case " << i << ": " << r.last.error;
    check_output(i, text);
  }
}

TEST(Constrained, GreedySmolLm2GivesJsonThatParses) { run_cases(0.0f, 0, 200); }

TEST(Constrained, SeededDrawsGiveJsonThatParses) {
  for (uint64_t seed = 1; seed <= 3; ++seed) run_cases(1.0f, seed, 200);
}

TEST(Constrained, MaxTokensFirstEndsWithLength) { run_cases(0.0f, 0, 3); }

// kvlm generate's path (Session + generate() with GenerateOptions::grammar): every case greedy
// and at temperature 1 ends with the grammar complete (or an end of generation once it is), and
// its text passes the same checks; a max_tokens reached first ends with Length.
TEST(Constrained, GenerateFollowsTheGrammar) {
  Smol& s = smol();
  for (size_t i = 0; i < std::size(kCases); ++i) {
    for (const float temperature : {0.0f, 1.0f}) {
      GenerateOptions opts;
      opts.n_predict = 200;
      opts.sampling.temperature = temperature;
      opts.sampling.seed = 5;
      opts.grammar = grammar_of(kCases[i]);
      Session session(*s.model, DType::F16, DType::F16, 1024, pool());
      std::vector<int32_t> out;
      const GenerateStats st = generate(session, *s.tok, chat_prompt(*s.tok, kCases[i].ask), opts,
                                        [&](int32_t id) { out.push_back(id); return true; });
      if (st.stop == StopReason::Length) continue;
      EXPECT_TRUE(st.stop == StopReason::GrammarDone || st.stop == StopReason::Eog)
          << stop_reason_name(st.stop);
      check_output(i, text_of(*s.tok, out));
    }
  }
  GenerateOptions opts;
  opts.n_predict = 3;
  opts.grammar = grammar_of(kCases[1]);
  Session session(*s.model, DType::F16, DType::F16, 1024, pool());
  const GenerateStats st = generate(session, *s.tok, chat_prompt(*s.tok, kCases[1].ask), opts,
                                    [](int32_t) { return true; });
  EXPECT_EQ(st.stop, StopReason::Length);
  EXPECT_EQ(st.n_generated, 3);
}

// Feeds text one token at a time as the tokenizer splits it, timing each step's mask.
void time_masks(const char* what, const std::shared_ptr<const Grammar>& g, const TokenTrie& trie,
                const Tokenizer& tok, const std::string& text) {
  GrammarMatcher m(g, trie);
  std::vector<uint32_t> mask((static_cast<size_t>(trie.n_vocab()) + 31) / 32);
  std::vector<double> times_us;
  for (int32_t id : tok.encode(text, false, false)) {
    const auto a = std::chrono::steady_clock::now();
    m.fill_mask(mask);
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
    times_us.push_back(us);
    if (getenv("KVLM_MASK_TRACE")) std::printf("    %6.0f us before '%s'\n", us, tok.token_bytes(id).c_str());
    ASSERT_TRUE((mask[static_cast<size_t>(id) / 32] >> (id % 32)) & 1) << tok.token_bytes(id);
    ASSERT_TRUE(m.accept_token(id));
  }
  EXPECT_TRUE(m.finished());
  // The median and the 90th percentile: on a loaded machine a few steps lose the CPU for ms.
  std::sort(times_us.begin(), times_us.end());
  const size_t n = times_us.size();
  std::printf("  mask, %s: %zu steps, median %.0f us, p90 %.0f us, max %.0f us per token\n", what,
              n, times_us[n / 2], times_us[n * 9 / 10], times_us.back());
}

// The mask's cost over the real vocabulary in the states a JSON output passes through (keys,
// strings, numbers), fed as the tokenizer splits a text; KVLM_MASK_TRACE=1 prints every step.
TEST(Constrained, MaskCostPerToken) {
  Smol& s = smol();
  std::vector<std::string> bytes(static_cast<size_t>(s.tok->n_vocab()));
  std::vector<int32_t> ends;
  for (int32_t id = 0; id < s.tok->n_vocab(); ++id) {
    if (s.tok->is_eog(id)) ends.push_back(id);
    if (s.tok->token_type(id) == TokenType::Normal) bytes[static_cast<size_t>(id)] = s.tok->token_bytes(id, false);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const TokenTrie trie(bytes, ends);
  const double build_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  trie: %zu nodes, built in %.1f ms\n", trie.n_nodes(), build_ms);
  const std::string text =
      R"({"name": "Ada Lovelace, the first programmer \"ever\"", "age": 36, "colours": ["red", "green", "blue"], "verdict": true, "confidence": 0.93, "note": null, "children": []})";
  time_masks("json_object", json_object_grammar(), trie, *s.tok, text);
  // The costly shape: an object of many optional properties, where every comma may be followed
  // by any of the remaining keys (one stack each).
  json props = json::object();
  for (int i = 0; i < 64; ++i) props[fmt::format("field_{:02}", i)] = {{"type", "integer"}};
  time_masks("64 optional properties",
             compile_json_schema({{"type", "object"}, {"properties", props}}), trie, *s.tok,
             R"({"field_03": 1, "field_20": 22, "field_21": 3, "field_63": 4})");
}

}  // namespace
}  // namespace kvlm
