// The OpenAI API layer without HTTP (src/server/api.h): request validation as a table of bodies
// and the status/param each must get, stop strings split across pieces, and the response shapes.
// The tokenizer is the tiny synthetic model's (tests/data/tiny-llama.gguf, no chat template, so
// chat renders as plain ChatML).

#include <gtest/gtest.h>

#include <functional>
#include <memory>

#include "gguf/gguf.h"
#include "server/api.h"
#include "test_util.h"

namespace kvlm::server {
namespace {

class Api : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    file_ = GgufFile::open(test::data_path("tiny-llama.gguf")).release();
    tok_ = Tokenizer::from_gguf(*file_).release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete file_;
  }
  ServedModel model() const {
    ServedModel m;
    m.id = "tiny-llama";
    m.n_ctx = 128;
    m.capacity_tokens = 2048;
    m.chat_template = served_chat_template(*tok_);
    return m;
  }
  GenerationRequest chat(const json& body) const {
    return parse_chat_request(body, *tok_, model(), 7);
  }
  GenerationRequest complete(const json& body) const {
    return parse_completion_request(body, *tok_, model(), 7);
  }
  static GgufFile* file_;
  static Tokenizer* tok_;
};
GgufFile* Api::file_ = nullptr;
Tokenizer* Api::tok_ = nullptr;

const json kMsgs = json::array({{{"role", "user"}, {"content", "hi"}}});

// A template's raise_exception refuses the client's conversation (400 naming messages); a
// template kvlm cannot render is the server's problem (500).
TEST_F(Api, ChatTemplateErrors) {
  ServedModel m = model();
  m.chat_template = served_chat_template(
      *tok_,
      "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
      "{% endif %}{{ messages[0].content }}{{ messages[0].content | frobnicate if "
      "messages[0].content == 'boom' }}");
  const json sys = json::array({{{"role", "system"}, {"content", "s"}}, {{"role", "user"}, {"content", "x"}}});
  try {
    parse_chat_request({{"messages", sys}}, *tok_, m, 7);
    FAIL();
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.param, "messages");
    EXPECT_NE(std::string(e.what()).find("System role not supported"), std::string::npos);
  }
  const json boom = json::array({{{"role", "user"}, {"content", "boom"}}});
  try {
    parse_chat_request({{"messages", boom}}, *tok_, m, 7);
    FAIL();
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status, 500);
    EXPECT_NE(std::string(e.what()).find("unknown filter 'frobnicate'"), std::string::npos);
  }
  EXPECT_FALSE(parse_chat_request({{"messages", kMsgs}}, *tok_, m, 7).req.prompt.empty());
}

TEST_F(Api, ChatDefaults) {
  const GenerationRequest g = chat({{"messages", kMsgs}});
  const std::string text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(g.req.prompt, tok_->encode(text, tok_->add_bos_default(), true));
  // No max_tokens: the rest of the context.
  EXPECT_EQ(g.req.max_tokens, 128 - static_cast<int32_t>(g.req.prompt.size()));
  EXPECT_EQ(g.req.sampling.seed, 7u);  // the server's draw when the request has no seed
  EXPECT_FLOAT_EQ(g.req.sampling.temperature, SamplingParams{}.temperature);
  EXPECT_FALSE(g.stream);
  EXPECT_TRUE(g.stop.empty());
}

TEST_F(Api, ChatParameters) {
  const GenerationRequest g = chat({{"messages", kMsgs},
                                    {"model", "tiny-llama"},
                                    {"max_tokens", 10},
                                    {"max_completion_tokens", 5},
                                    {"temperature", 0},
                                    {"top_p", 0.5},
                                    {"top_k", 3},
                                    {"min_p", 0.1},
                                    {"repeat_penalty", 1.1},
                                    {"seed", -1},
                                    {"stop", "x"},
                                    {"stream", true},
                                    {"stream_options", {{"include_usage", true}}},
                                    {"presence_penalty", 0},
                                    {"n", 1},
                                    {"logprobs", false}});
  EXPECT_EQ(g.req.max_tokens, 5);  // max_completion_tokens wins
  EXPECT_FLOAT_EQ(g.req.sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(g.req.sampling.top_p, 0.5f);
  EXPECT_EQ(g.req.sampling.top_k, 3);
  EXPECT_EQ(g.req.sampling.seed, ~uint64_t{0});
  EXPECT_EQ(g.stop, std::vector<std::string>{"x"});
  EXPECT_TRUE(g.stream);
  EXPECT_TRUE(g.include_usage);
  EXPECT_EQ(g.req.sampling.n_logprobs, -1);  // logprobs: false
}

TEST_F(Api, LogprobsParameters) {
  const json m = json::array({{{"role", "user"}, {"content", "hi"}}});
  EXPECT_EQ(chat({{"messages", m}}).req.sampling.n_logprobs, -1);
  EXPECT_EQ(chat({{"messages", m}, {"logprobs", true}}).req.sampling.n_logprobs, 0);
  const json top20 = {{"messages", m}, {"logprobs", true}, {"top_logprobs", 20}};
  EXPECT_EQ(chat(top20).req.sampling.n_logprobs, 20);
  EXPECT_EQ(complete({{"prompt", "a"}, {"logprobs", 5}}).req.sampling.n_logprobs, 5);
  EXPECT_EQ(complete({{"prompt", "a"}, {"logprobs", 0}}).req.sampling.n_logprobs, 0);
  EXPECT_EQ(complete({{"prompt", "a"}, {"logprobs", false}}).req.sampling.n_logprobs, -1);
  EXPECT_EQ(complete({{"prompt", "a"}, {"logprobs", nullptr}}).req.sampling.n_logprobs, -1);
}

// OpenAI's shapes: chat's content entries, completions' parallel arrays; -inf as -9999.
TEST_F(Api, LogprobsShapes) {
  StepLogprobs lp;
  lp.chosen = {65, -0.25f};                          // 'A' (the tiny vocabulary's bytes first)
  lp.top = {{65, -0.25f}, {66, -2.0f}, {67, -INFINITY}};
  LogprobsBuilder chat_lp(*tok_, Endpoint::Chat);
  EXPECT_TRUE(chat_lp.empty());
  chat_lp.add(lp, 0);
  EXPECT_FALSE(chat_lp.empty());
  const json c = chat_lp.take();
  EXPECT_TRUE(chat_lp.empty());
  ASSERT_EQ(c["content"].size(), 1u);
  const json& e = c["content"][0];
  EXPECT_EQ(e["token"], tok_->token_bytes(65));
  EXPECT_EQ(e["bytes"], json::array({static_cast<unsigned char>(tok_->token_bytes(65)[0])}));
  EXPECT_DOUBLE_EQ(e["logprob"].get<double>(), -0.25);
  ASSERT_EQ(e["top_logprobs"].size(), 3u);
  EXPECT_DOUBLE_EQ(e["top_logprobs"][1]["logprob"].get<double>(), -2.0);
  EXPECT_DOUBLE_EQ(e["top_logprobs"][2]["logprob"].get<double>(), -9999.0);
  EXPECT_EQ(chat_lp.take(), json({{"content", json::array()}}));

  LogprobsBuilder comp_lp(*tok_, Endpoint::Completion);
  // Two tokens that are pieces of characters (bytes 0xC3, 0xA9) share the text U+FFFD: one key.
  lp.top.push_back({0xC3, -5.0f});
  lp.top.push_back({0xA9, -6.0f});
  comp_lp.add(lp, 0);
  comp_lp.add(lp, 1);
  const json k = comp_lp.take();
  EXPECT_EQ(k["tokens"], json::array({tok_->token_bytes(65), tok_->token_bytes(65)}));
  EXPECT_EQ(k["token_logprobs"], json::array({-0.25, -0.25}));
  EXPECT_EQ(k["text_offset"], json::array({0, 1}));
  EXPECT_EQ(k["top_logprobs"][0].size(), 4u);
  EXPECT_DOUBLE_EQ(k["top_logprobs"][0]["\xEF\xBF\xBD"].get<double>(), -5.0);
  EXPECT_DOUBLE_EQ(k["top_logprobs"][0][tok_->token_bytes(66)].get<double>(), -2.0);
  const ResponseMeta meta{Endpoint::Completion, "cmpl-1", 100, "m"};
  EXPECT_EQ(render_response(meta, "AA", "length", Usage{}, k)["choices"][0]["logprobs"], k);
  EXPECT_EQ(render_chunk(meta, "A", "", false, false, k)["choices"][0]["logprobs"], k);
}

// n: parsed into the request, bounded by max_choices (-np), and the choices' blocks must fit the
// pool together: a max_tokens given that does not fit is refused naming n, the default (the rest
// of the context) shrinks to the largest that fits.
TEST_F(Api, ChoicesParameters) {
  ServedModel m = model();
  m.capacity_tokens = 512;  // 32 blocks of 16
  m.max_choices = 8;
  auto complete = [&](json body) {
    body["prompt"] = {1, 2, 3};
    return parse_completion_request(body, *tok_, m, 7);
  };
  EXPECT_EQ(complete({}).req.n, 1);
  const GenerationRequest g = complete({{"n", 8}, {"max_tokens", 8}});
  EXPECT_EQ(g.req.n, 8);
  EXPECT_EQ(g.req.max_tokens, 8);
  for (int n : {9, 0}) {
    try {
      complete({{"n", n}});
      ADD_FAILURE() << n;
    } catch (const HttpError& e) {
      EXPECT_EQ(e.status, 400);
      EXPECT_EQ(e.param, "n");
    }
  }
  // 3 prompt tokens: nothing shared; 64 positions (4 blocks) a choice fit 8 choices in 32
  // blocks, 65 do not.
  EXPECT_EQ(complete({{"n", 8}, {"max_tokens", 61}}).req.max_tokens, 61);
  try {
    complete({{"n", 8}, {"max_tokens", 62}});
    ADD_FAILURE();
  } catch (const HttpError& e) {
    EXPECT_EQ(e.param, "n");
    EXPECT_NE(std::string(e.what()).find("512"), std::string::npos) << e.what();
  }
  // Chat's default max_tokens (the rest of the context) shrinks to what fits: the prompt's full
  // blocks once, then (32 - shared) / 8 blocks a choice.
  const GenerationRequest c = parse_chat_request({{"messages", kMsgs}, {"n", 8}}, *tok_, m, 7);
  const auto n_prompt = static_cast<int64_t>(c.req.prompt.size());
  const int64_t shared = n_prompt / 16, own = (32 - shared) / 8;
  ASSERT_GT((shared + own) * 16, n_prompt);
  EXPECT_EQ(c.req.max_tokens, (shared + own) * 16 - n_prompt);
  EXPECT_EQ(parse_chat_request({{"messages", kMsgs}, {"n", 2}}, *tok_, m, 7).req.max_tokens,
            m.n_ctx - n_prompt);
}

TEST_F(Api, ContentPartsJoinWithNewlines) {
  const json parts =
      json::array({{{"type", "text"}, {"text", "a"}}, {{"type", "text"}, {"text", "b"}}});
  const GenerationRequest g =
      chat({{"messages", json::array({{{"role", "user"}, {"content", parts}}})}});
  const GenerationRequest s =
      chat({{"messages", json::array({{{"role", "user"}, {"content", "a\nb"}}})}});
  EXPECT_EQ(g.req.prompt, s.req.prompt);
}

TEST_F(Api, CompletionPromptForms) {
  const std::vector<int32_t> ids = tok_->encode("hello", tok_->add_bos_default(), true);
  EXPECT_EQ(complete({{"prompt", "hello"}}).req.prompt, ids);
  EXPECT_EQ(complete({{"prompt", json::array({"hello"})}}).req.prompt, ids);
  EXPECT_EQ(complete({{"prompt", ids}}).req.prompt, ids);
  EXPECT_EQ(complete({{"prompt", json::array({ids})}}).req.prompt, ids);
  EXPECT_EQ(complete({{"prompt", "hello"}}).req.max_tokens, 16);  // OpenAI's default
  EXPECT_EQ(complete({{"prompt", "hello"}, {"max_tokens", 100}}).req.max_tokens, 100);
}

// The HttpError f throws; status 0 when it throws none.
template <class F>
HttpError error_of(const F& f) {
  try {
    f();
  } catch (const HttpError& e) {
    return e;
  }
  return HttpError(0, "no error");
}

std::string nested(const std::string& key, int levels) {
  return "{\"" + key + "\": " + std::string(levels, '[') + std::string(levels, ']') + "}";
}

struct BadCase {
  const char* name;
  bool chat;
  json body;
  int status;
  const char* param;  // "" for null
};

TEST_F(Api, BadRequestsTable) {
  const json m = kMsgs;
  const std::vector<BadCase> cases = {
      {"messages missing", true, json::object(), 400, "messages"},
      {"messages a string", true, {{"messages", "hi"}}, 400, "messages"},
      {"messages empty", true, {{"messages", json::array()}}, 400, "messages"},
      {"message not an object", true, {{"messages", json::array({1})}}, 400, "messages[0]"},
      {"role missing",
       true,
       {{"messages", json::array({{{"content", "x"}}})}},
       400,
       "messages[0].role"},
      {"role function",
       true,
       {{"messages", json::array({{{"role", "function"}, {"content", "x"}}})}},
       400,
       "messages[0].role"},
      {"tool without tool_call_id",
       true,
       {{"messages", json::array({{{"role", "tool"}, {"content", "x"}}})}},
       400,
       "messages[0].tool_call_id"},
      {"tool content missing",
       true,
       {{"messages", json::array({{{"role", "tool"}, {"tool_call_id", "c"}}})}},
       400,
       "messages[0].content"},
      {"tool_calls not an array",
       true,
       {{"messages", json::array({{{"role", "assistant"}, {"tool_calls", 1}}})}},
       400,
       "messages[0].tool_calls"},
      {"tool call without a function",
       true,
       {{"messages", json::array({{{"role", "assistant"},
                                   {"tool_calls", json::array({{{"id", "c"}}})}}})}},
       400,
       "messages[0].tool_calls[0].function"},
      {"tool call arguments a number",
       true,
       {{"messages",
         json::array({{{"role", "assistant"},
                       {"tool_calls", json::array({{{"id", "c"},
                                                    {"type", "function"},
                                                    {"function", {{"name", "f"}, {"arguments", 3}}}}})}}})}},
       400,
       "messages[0].tool_calls[0].function.arguments"},
      {"tool call type", true,
       {{"messages",
         json::array({{{"role", "assistant"},
                       {"tool_calls", json::array({{{"type", "code"}, {"function", {{"name", "f"}}}}})}}})}},
       400, "messages[0].tool_calls[0].type"},
      {"content a number",
       true,
       {{"messages", json::array({{{"role", "user"}, {"content", 3}}})}},
       400,
       "messages[0].content"},
      {"user content null",
       true,
       {{"messages", json::array({{{"role", "user"}, {"content", nullptr}}})}},
       400,
       "messages[0].content"},
      {"image part",
       true,
       {{"messages",
         json::array({{{"role", "user"}, {"content", json::array({{{"type", "image_url"}}})}}})}},
       400,
       "messages[0].content[0]"},
      {"max_tokens string", true, {{"messages", m}, {"max_tokens", "ten"}}, 400, "max_tokens"},
      {"max_tokens float", true, {{"messages", m}, {"max_tokens", 2.5}}, 400, "max_tokens"},
      {"max_tokens 0", true, {{"messages", m}, {"max_tokens", 0}}, 400, "max_tokens"},
      {"max_tokens -1", true, {{"messages", m}, {"max_tokens", -1}}, 400, "max_tokens"},
      {"max_tokens > context", true, {{"messages", m}, {"max_tokens", 129}}, 400, "max_tokens"},
      {"max_tokens > uint64",
       true,
       {{"messages", m}, {"max_tokens", json::parse("1e30")}},
       400,
       "max_tokens"},
      {"max_tokens huge unsigned",
       true,
       {{"messages", m}, {"max_tokens", ~uint64_t{0}}},
       400,
       "max_tokens"},
      {"prompt + max_tokens > context",
       true,
       {{"messages", m}, {"max_tokens", 120}},
       400,
       "max_tokens"},
      {"max_completion_tokens 0",
       true,
       {{"messages", m}, {"max_completion_tokens", 0}},
       400,
       "max_completion_tokens"},
      {"temperature string", true, {{"messages", m}, {"temperature", "hot"}}, 400, "temperature"},
      {"temperature 3", true, {{"messages", m}, {"temperature", 3}}, 400, "temperature"},
      {"top_p 2", true, {{"messages", m}, {"top_p", 2}}, 400, "top_p"},
      {"top_k -1", true, {{"messages", m}, {"top_k", -1}}, 400, "top_k"},
      {"min_p bool", true, {{"messages", m}, {"min_p", true}}, 400, "min_p"},
      {"repeat_penalty 0", true, {{"messages", m}, {"repeat_penalty", 0}}, 400, "repeat_penalty"},
      {"seed float", true, {{"messages", m}, {"seed", 1.5}}, 400, "seed"},
      {"stream string", true, {{"messages", m}, {"stream", "yes"}}, 400, "stream"},
      {"stream_options list",
       true,
       {{"messages", m}, {"stream_options", json::array()}},
       400,
       "stream_options"},
      {"n 17", true, {{"messages", m}, {"n", 17}}, 400, "n"},
      {"n 0", true, {{"messages", m}, {"n", 0}}, 400, "n"},
      {"n -1", false, {{"prompt", "a"}, {"n", -1}}, 400, "n"},
      {"n float", true, {{"messages", m}, {"n", 1.5}}, 400, "n"},
      {"n string", false, {{"prompt", "a"}, {"n", "2"}}, 400, "n"},
      {"logprobs string", true, {{"messages", m}, {"logprobs", "yes"}}, 400, "logprobs"},
      {"top_logprobs without logprobs",
       true,
       {{"messages", m}, {"top_logprobs", 2}},
       400,
       "top_logprobs"},
      {"top_logprobs 21",
       true,
       {{"messages", m}, {"logprobs", true}, {"top_logprobs", 21}},
       400,
       "top_logprobs"},
      {"top_logprobs -1",
       true,
       {{"messages", m}, {"logprobs", true}, {"top_logprobs", -1}},
       400,
       "top_logprobs"},
      {"top_logprobs 2.5",
       true,
       {{"messages", m}, {"logprobs", true}, {"top_logprobs", 2.5}},
       400,
       "top_logprobs"},
      {"presence_penalty 3",
       true,
       {{"messages", m}, {"presence_penalty", 3}},
       400,
       "presence_penalty"},
      {"frequency_penalty -2.5",
       true,
       {{"messages", m}, {"frequency_penalty", -2.5}},
       400,
       "frequency_penalty"},
      {"logit_bias list", true, {{"messages", m}, {"logit_bias", {1, 5}}}, 400, "logit_bias"},
      {"logit_bias id past the vocabulary",
       true,
       {{"messages", m}, {"logit_bias", {{"307", 5}}}},
       400,
       "logit_bias"},
      {"logit_bias id not a number",
       true,
       {{"messages", m}, {"logit_bias", {{"x1", 5}}}},
       400,
       "logit_bias"},
      {"logit_bias 101", true, {{"messages", m}, {"logit_bias", {{"1", 101}}}}, 400, "logit_bias"},
      {"logit_bias string value",
       true,
       {{"messages", m}, {"logit_bias", {{"1", "5"}}}},
       400,
       "logit_bias"},
      {"tools an object", true, {{"messages", m}, {"tools", json::object()}}, 400, "tools"},
      {"tool without a type", true, {{"messages", m}, {"tools", json::array({json::object()})}},
       400, "tools[0].type"},
      {"tool without a function", true,
       {{"messages", m}, {"tools", json::array({{{"type", "function"}}})}}, 400,
       "tools[0].function"},
      {"tool name with a space", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"}, {"function", {{"name", "a b"}}}}})}},
       400, "tools[0].function.name"},
      {"tool names twice", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"}, {"function", {{"name", "f"}}}},
                               {{"type", "function"}, {"function", {{"name", "f"}}}}})}},
       400, "tools[1].function.name"},
      {"tool parameters a string", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"},
                                {"function", {{"name", "f"}, {"parameters", "x"}}}}})}},
       400, "tools[0].function.parameters"},
      {"tool description a number", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"},
                                {"function", {{"name", "f"}, {"description", 1}}}}})}},
       400, "tools[0].function.description"},
      {"tool_choice unknown", true, {{"messages", m}, {"tool_choice", "always"}}, 400,
       "tool_choice"},
      {"tool_choice a number", true, {{"messages", m}, {"tool_choice", 1}}, 400, "tool_choice"},
      {"tool_choice required without tools", true, {{"messages", m}, {"tool_choice", "required"}},
       400, "tool_choice"},
      {"tool_choice names no tool", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"}, {"function", {{"name", "f"}}}}})},
        {"tool_choice", {{"type", "function"}, {"function", {{"name", "g"}}}}}},
       400, "tool_choice"},
      {"tool_choice object without function", true,
       {{"messages", m}, {"tool_choice", {{"type", "function"}}}}, 400, "tool_choice"},
      {"tool_choice required with response_format", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"}, {"function", {{"name", "f"}}}}})},
        {"tool_choice", "required"},
        {"response_format", {{"type", "json_object"}}}},
       400, "tool_choice"},
      {"required tool with an unsupported keyword", true,
       {{"messages", m},
        {"tools", json::array({{{"type", "function"},
                                {"function", {{"name", "f"},
                                              {"parameters", {{"type", "object"},
                                                              {"properties", {{"n", {{"type", "integer"}, {"minimum", 0}}}}}}}}}}})},
        {"tool_choice", "required"}},
       400, "tools"},
      {"parallel_tool_calls a string", true, {{"messages", m}, {"parallel_tool_calls", "yes"}},
       400, "parallel_tool_calls"},
      {"functions", true, {{"messages", m}, {"functions", json::array({json::object()})}}, 400,
       "functions"},
      {"response_format a string", true, {{"messages", m}, {"response_format", "json"}}, 400,
       "response_format"},
      {"response_format type unknown",
       true,
       {{"messages", m}, {"response_format", {{"type", "xml"}}}},
       400,
       "response_format"},
      {"json_schema missing",
       true,
       {{"messages", m}, {"response_format", {{"type", "json_schema"}}}},
       400,
       "response_format"},
      {"json_schema without a name",
       true,
       {{"messages", m},
        {"response_format", {{"type", "json_schema"}, {"json_schema", {{"schema", json::object()}}}}}},
       400,
       "response_format"},
      {"json_schema unsupported keyword",
       true,
       {{"messages", m},
        {"response_format",
         {{"type", "json_schema"},
          {"json_schema", {{"name", "x"}, {"schema", {{"type", "string"}, {"pattern", "^a"}}}}}}}},
       400,
       "response_format"},
      {"completion json_schema bad type",
       false,
       {{"prompt", "a"},
        {"response_format",
         {{"type", "json_schema"}, {"json_schema", {{"name", "x"}, {"schema", {{"type", "date"}}}}}}}},
       400,
       "response_format"},
      {"stop a number", true, {{"messages", m}, {"stop", 5}}, 400, "stop"},
      {"five stops", true, {{"messages", m}, {"stop", {"a", "b", "c", "d", "e"}}}, 400, "stop"},
      {"model a number", true, {{"messages", m}, {"model", 1}}, 400, "model"},
      {"unknown model", true, {{"messages", m}, {"model", "gpt-4"}}, 404, "model"},
      {"prompt missing", false, json::object(), 400, "prompt"},
      {"prompt empty", false, {{"prompt", ""}}, 400, "prompt"},
      {"prompt empty ids", false, {{"prompt", json::array()}}, 400, "prompt"},
      {"prompt id too big", false, {{"prompt", {1, 307}}}, 400, "prompt"},
      {"prompt id negative", false, {{"prompt", {-1}}}, 400, "prompt"},
      {"prompt id float", false, {{"prompt", {1.5}}}, 400, "prompt"},
      {"prompt batch", false, {{"prompt", {"a", "b"}}}, 400, "prompt"},
      {"prompt object", false, {{"prompt", json::object()}}, 400, "prompt"},
      {"prompt too long", false, {{"prompt", std::string(600, 'z')}}, 400, "prompt"},
      {"chat too long",
       true,
       {{"messages", json::array({{{"role", "user"}, {"content", std::string(600, 'z')}}})}},
       400,
       "messages"},
      {"echo", false, {{"prompt", "a"}, {"echo", true}}, 400, "echo"},
      {"suffix", false, {{"prompt", "a"}, {"suffix", "b"}}, 400, "suffix"},
      {"best_of", false, {{"prompt", "a"}, {"best_of", 2}}, 400, "best_of"},
      {"completion logprobs 6", false, {{"prompt", "a"}, {"logprobs", 6}}, 400, "logprobs"},
      {"completion logprobs -1", false, {{"prompt", "a"}, {"logprobs", -1}}, 400, "logprobs"},
      {"completion logprobs true", false, {{"prompt", "a"}, {"logprobs", true}}, 400, "logprobs"},
      {"completion logprobs 1.5", false, {{"prompt", "a"}, {"logprobs", 1.5}}, 400, "logprobs"},
      {"completion unknown model", false, {{"prompt", "a"}, {"model", "x"}}, 404, "model"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    try {
      if (c.chat)
        chat(c.body);
      else
        complete(c.body);
      ADD_FAILURE() << "accepted: " << c.body.dump();
    } catch (const HttpError& e) {
      EXPECT_EQ(e.status, c.status) << e.what();
      EXPECT_EQ(e.param, c.param) << e.what();
      const json err = error_body(e)["error"];
      EXPECT_FALSE(err["message"].get<std::string>().empty());
      EXPECT_EQ(err["type"], "invalid_request_error");
      EXPECT_TRUE(std::string(e.what()).find('\n') == std::string::npos) << "one line";
    }
  }
}

TEST_F(Api, ToolsRequests) {
  const json tools = json::array({{{"type", "function"},
                                   {"function", {{"name", "f"},
                                                 {"parameters", {{"type", "object"},
                                                                 {"properties", {{"x", {{"type", "integer"}}}}},
                                                                 {"required", {"x"}}}}}}}});
  ServedModel m = model();
  m.n_ctx = m.capacity_tokens = 4096;  // room for the tools' system prompt
  auto chat = [&](const json& body) { return parse_chat_request(body, *tok_, m, 7); };
  const size_t plain = chat({{"messages", kMsgs}}).req.prompt.size();
  const GenerationRequest a = chat({{"messages", kMsgs}, {"tools", tools}});
  ASSERT_NE(a.tool_format, nullptr);
  EXPECT_EQ(a.tool_names, std::vector<std::string>{"f"});
  EXPECT_EQ(a.req.grammar, nullptr);
  EXPECT_GT(a.req.prompt.size(), plain + 20);  // ChatML: kvlm's system prompt lists the tools
  const GenerationRequest none = chat({{"messages", kMsgs}, {"tools", tools}, {"tool_choice", "none"}});
  EXPECT_EQ(none.tool_format, nullptr);
  EXPECT_EQ(none.req.prompt.size(), plain);
  EXPECT_NE(chat({{"messages", kMsgs}, {"tools", tools}, {"tool_choice", "required"}}).req.grammar,
            nullptr);
  const json named = {{"type", "function"}, {"function", {{"name", "f"}}}};
  EXPECT_NE(chat({{"messages", kMsgs}, {"tools", tools}, {"tool_choice", named}}).req.grammar,
            nullptr);
  // A conversation with a call and its result renders (ChatML: in Hermes's form).
  const json convo = json::array(
      {{{"role", "user"}, {"content", "hi"}},
       {{"role", "assistant"},
        {"content", nullptr},
        {"tool_calls", json::array({{{"id", "call_1"},
                                     {"type", "function"},
                                     {"function", {{"name", "f"}, {"arguments", "{\"x\": 1}"}}}}})}},
       {{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "2"}}});
  EXPECT_GT(chat({{"messages", convo}, {"tools", tools}}).req.prompt.size(), a.req.prompt.size());
}

TEST_F(Api, ResponseFormat) {
  const json m = json::array({{{"role", "user"}, {"content", "hi"}}});
  EXPECT_EQ(chat({{"messages", m}}).req.grammar, nullptr);
  EXPECT_EQ(chat({{"messages", m}, {"response_format", {{"type", "text"}}}}).req.grammar, nullptr);
  EXPECT_NE(chat({{"messages", m}, {"response_format", {{"type", "json_object"}}}}).req.grammar,
            nullptr);
  const json schema = {{"type", "json_schema"},
                       {"json_schema",
                        {{"name", "p"},
                         {"strict", true},
                         {"schema", {{"type", "object"}, {"properties", {{"a", {{"type", "integer"}}}}}}}}}};
  EXPECT_NE(chat({{"messages", m}, {"response_format", schema}}).req.grammar, nullptr);
  EXPECT_NE(complete({{"prompt", "a"}, {"response_format", schema}}).req.grammar, nullptr);
  // The 400 names the keyword kvlm does not support.
  json bad = schema;
  bad["json_schema"]["schema"]["properties"]["a"]["minimum"] = 0;
  const HttpError e = error_of([&] { chat({{"messages", m}, {"response_format", bad}}); });
  EXPECT_EQ(e.status, 400);
  EXPECT_EQ(e.param, "response_format");
  EXPECT_NE(std::string(e.what()).find("'minimum' is not supported (at /properties/a)"),
            std::string::npos)
      << e.what();
}

TEST_F(Api, ParseJsonBody) {
  EXPECT_EQ(parse_json_body(R"({"a": 1})")["a"], 1);
  for (const char* bad : {"", "{", "[1]", "\"x\"", "nul"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW(parse_json_body(bad), HttpError);
  }
  // A syntax error inside a field's value names the field; between fields, none.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"temperature": 1.2e})", "temperature"},
      {R"({"temperature": 1.2.3})", ""},  // 1.2 is whole: the error is after it
      {R"({"max_tokens": 1e})", "max_tokens"},
      {R"({"messages": [{"role": "user", "content": "hi"})", "messages"},
      {R"({"prompt": "a", "stop": ["x", ]})", "stop"},
      {R"({"prompt": "a" "stop": 1})", ""},
      {R"({"prompt": [1, 2], "stop)", ""},
      {R"({"a": {"b": 1}, "c": tru})", "c"},
  };
  for (const auto& [body, param] : cases) {
    SCOPED_TRACE(body);
    const HttpError e = error_of([&] { parse_json_body(body); });
    EXPECT_EQ(e.status, 400) << e.what();
    EXPECT_EQ(e.code, "invalid_json");
    EXPECT_EQ(e.param, param) << e.what();
  }
}

TEST_F(Api, ParseJsonBodyLimitsNesting) {
  // The body object is one level: kMaxJsonDepth - 1 arrays inside it are the most allowed.
  EXPECT_NO_THROW(parse_json_body(nested("tokens", kMaxJsonDepth - 1)));
  for (const std::string& body :
       {nested("tokens", kMaxJsonDepth), nested("prompt", 200'000),
        "{\"tokens\": " + std::string(100'000, '[')}) {  // never closed: refused before the end
    SCOPED_TRACE(body.size());
    const HttpError e = error_of([&] { parse_json_body(body); });
    EXPECT_EQ(e.status, 400) << e.what();
    EXPECT_EQ(e.code, "json_too_deep");
    EXPECT_EQ(e.param, body.find("prompt") != std::string::npos ? "prompt" : "tokens");
    EXPECT_NE(std::string(e.what()).find("deeper than 64 levels"), std::string::npos) << e.what();
  }
  const HttpError e = error_of([] { parse_json_body(std::string(100'000, '{')); });
  EXPECT_EQ(e.status, 400);
  EXPECT_EQ(e.param, "");
}

TEST_F(Api, ParseJsonBodyNumbersOutOfRange) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"messages": [], "temperature": 1e309})", "temperature"},
      {R"({"top_p": -1e400})", "top_p"},
      {R"({"max_tokens": 1e99999})", "max_tokens"},
      {R"({"seed": 1)" + std::string(400, '0') + "}", "seed"},
      {R"({"tokens": [1, 2, 1e309]})", "tokens"},
      {R"({"prompt": [[1, 1e309]]})", "prompt"},
      {"[1e309]", ""},
  };
  for (const auto& [body, param] : cases) {
    SCOPED_TRACE(body.substr(0, 60));
    const HttpError e = error_of([&] { parse_json_body(body); });
    EXPECT_EQ(e.status, 400) << e.what();
    EXPECT_EQ(e.param, param);
    EXPECT_EQ(e.code, "number_out_of_range");
    EXPECT_EQ(std::string(e.what()).find("000000"), std::string::npos) << "quotes the literal";
  }
  // Underflow is not an error: 1e-400 reads as 0, as any JSON parser reads it.
  EXPECT_EQ(parse_json_body(R"({"temperature": 1e-400})")["temperature"], 0.0);
}

TEST_F(Api, ErrorMessagesQuoteClientTextBounded) {
  const std::string big(100'000, 'x');
  const std::vector<std::function<void()>> calls = {
      [&] { chat({{"messages", kMsgs}, {"model", big}}); },
      [&] { chat({{"messages", json::array({{{"role", big}, {"content", "x"}}})}}); },
      [&] {
        chat({{"messages", json::array({{{"role", "user"},
                                         {"content", json::array({{{"type", big}}})}}})}});
      },
      [&] { detokenize_response({{"tokens", {1, big}}}, *tok_); },
      [&] { detokenize_response({{"tokens", {1, json::parse(nested("x", 60))["x"]}}}, *tok_); },
      [&] { complete({{"prompt", {1, json::parse(nested("x", 60))["x"]}}}); },
      [&] { parse_json_body("{\"a\": \"" + big + "\u0001\"}"); },  // nlohmann quotes the token
      [&] { parse_json_body("{\"" + big + "\": 1e309}"); },
  };
  for (size_t i = 0; i < calls.size(); ++i) {
    SCOPED_TRACE(i);
    const HttpError e = error_of(calls[i]);
    EXPECT_EQ(e.status / 100, 4) << e.what();
    EXPECT_LT(std::string(e.what()).size(), 400u) << std::string(e.what()).substr(0, 400);
    EXPECT_LT(e.param.size(), 100u);
    EXPECT_EQ(std::string(e.what()).find("[["), std::string::npos) << e.what();
  }
}

TEST(Clip, CutsAtACharacterAndSaysTheSize) {
  EXPECT_EQ(clip("short"), "short");
  EXPECT_EQ(clip(std::string(64, 'a')), std::string(64, 'a'));
  EXPECT_EQ(clip(std::string(65, 'a')), std::string(64, 'a') + "... (65 bytes)");
  std::string accents = "a";
  for (int i = 0; i < 50; ++i) accents += "\xc3\xa9";  // 2 bytes each: byte 64 is mid-character
  EXPECT_EQ(clip(accents), accents.substr(0, 63) + "... (101 bytes)");
}

TEST_F(Api, StopStringsEmptyAreIgnored) {
  EXPECT_TRUE(chat({{"messages", kMsgs}, {"stop", ""}}).stop.empty());
  EXPECT_EQ(chat({{"messages", kMsgs}, {"stop", {"", "ab"}}}).stop, std::vector<std::string>{"ab"});
}

TEST(StopMatcher, HoldsBackAPossibleStart) {
  StopMatcher s({"STOP", "end"});
  EXPECT_EQ(s.push("hello S"), "hello ");  // "S" might begin "STOP"
  EXPECT_EQ(s.push("T"), "");
  EXPECT_EQ(s.push("x"), "STx");  // it did not
  EXPECT_EQ(s.push("e"), "");     // might begin "end"
  EXPECT_EQ(s.push("nSTO"), "en");
  EXPECT_FALSE(s.stopped());
  EXPECT_EQ(s.push("P tail"), "");
  EXPECT_TRUE(s.stopped());
}

TEST(StopMatcher, SplitAcrossPieces) {
  StopMatcher s({"</s>"});
  std::string out;
  for (const char* piece : {"abc<", "/", "s", "> more"}) out += s.push(piece);
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(out, "abc");
  EXPECT_EQ(s.push("later"), "");
  EXPECT_EQ(s.flush(), "");
}

TEST(StopMatcher, EarliestOfSeveralAndFlush) {
  StopMatcher s({"cd", "b"});
  EXPECT_EQ(s.push("abcd"), "a");
  StopMatcher t({"xyz"});
  EXPECT_EQ(t.push("abx"), "ab");
  EXPECT_EQ(t.flush(), "x");  // generation ended: the held text is shown
  StopMatcher none({});
  EXPECT_EQ(none.push("anything"), "anything");
}

TEST_F(Api, TextStreamDropsEndOfGeneration) {
  const int32_t eos = tok_->eos_id();
  ASSERT_TRUE(tok_->is_eog(eos));
  const std::vector<int32_t> ids = tok_->encode("hello", false, false);
  TextStream t(*tok_, {}, false);
  std::string out;
  for (int32_t id : ids) out += t.push(id);
  out += t.push(eos);
  out += t.finish();
  EXPECT_EQ(out, "hello");
  TextStream stop(*tok_, {"ll"}, false);
  out.clear();
  for (int32_t id : ids) out += stop.push(id);
  EXPECT_TRUE(stop.stopped());
  EXPECT_EQ(out + stop.finish(), "he");
}

TEST(Render, ShapesAsOpenAI) {
  const ResponseMeta chat{Endpoint::Chat, "chatcmpl-1", 100, "m"};
  const ResponseMeta comp{Endpoint::Completion, "cmpl-1", 100, "m"};
  const Usage u{5, 3, 2};
  const json r = render_response(chat, "hi", "stop", u);
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"], json({{"role", "assistant"}, {"content", "hi"}}));
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r["usage"]["total_tokens"], 8);
  EXPECT_EQ(r["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
  EXPECT_EQ(render_response(comp, "hi", "length", u)["choices"][0]["text"], "hi");
  const json first = render_chunk(chat, "", "", true, true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"], json({{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  const json last = render_chunk(chat, "", "length", false, false);
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_FALSE(last.contains("usage"));
  const json usage = render_usage_chunk(comp, u);
  EXPECT_EQ(usage["choices"], json::array());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 3);
  EXPECT_EQ(sse_event(json{{"a", 1}}), "data: {\"a\":1}\n\n");
}

TEST(Render, ErrorsAndInvalidUtf8) {
  const json e = error_body(HttpError(503, "queue full", "", "queue_full"));
  EXPECT_EQ(e["error"]["type"], "server_error");
  EXPECT_TRUE(e["error"]["param"].is_null());
  EXPECT_EQ(e["error"]["code"], "queue_full");
  EXPECT_EQ(error_body(HttpError(401, "no"))["error"]["type"], "authentication_error");
  EXPECT_EQ(dump(json{{"t", std::string("a\xff")}}), "{\"t\":\"a\xef\xbf\xbd\"}");
}

TEST_F(Api, TokenizeDetokenize) {
  const json t = tokenize_response({{"content", "hello world"}}, *tok_);
  const json d = detokenize_response({{"tokens", t["tokens"]}}, *tok_);
  EXPECT_EQ(d["content"], "hello world");
  const json p = tokenize_response({{"content", "hi"}, {"with_pieces", true}}, *tok_);
  std::string joined;
  for (const json& x : p["tokens"]) joined += x["piece"].get<std::string>();
  EXPECT_EQ(joined, "hi");
  EXPECT_THROW(detokenize_response({{"tokens", {307}}}, *tok_), HttpError);
  EXPECT_THROW(detokenize_response({{"tokens", "1"}}, *tok_), HttpError);
  EXPECT_THROW(tokenize_response(json::object(), *tok_), HttpError);
}

TEST(Auth, BearerSchemeInAnyCase) {
  for (const char* ok : {"Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR   s3cret"})
    EXPECT_TRUE(bearer_matches(ok, "s3cret")) << ok;
  for (const char* no : {"", "Bearer", "Bearer ", "s3cret", "Bearers3cret", "Basic s3cret",
                         "Bearer s3cre", "Bearer s3cretx", "Bearer S3CRET", "Bearer s3cret ",
                         "Bearerx s3cret", "Bearer\ts3cret", "Bear s3cret"})
    EXPECT_FALSE(bearer_matches(no, "s3cret")) << no;
}

TEST(Models, Objects) {
  ServedModel m;
  m.id = "x";
  m.created = 5;
  EXPECT_EQ(models_list(m)["data"][0],
            json({{"id", "x"}, {"object", "model"}, {"created", 5}, {"owned_by", "kvlm"}}));
  EXPECT_TRUE(serves(m, "x"));
  EXPECT_FALSE(serves(m, "y"));
}

// --alias: every name is listed and accepted, the file's stem no longer is; the first names the
// responses.
TEST(Models, Aliases) {
  ServedModel m;
  m.id = "file-stem";
  m.aliases = {"smol", "gpt-4o-mini"};
  const json list = models_list(m);
  ASSERT_EQ(list["data"].size(), 2u);
  EXPECT_EQ(list["data"][0]["id"], "smol");
  EXPECT_EQ(list["data"][1]["id"], "gpt-4o-mini");
  EXPECT_EQ(m.name(), "smol");
  EXPECT_TRUE(serves(m, "gpt-4o-mini"));
  EXPECT_TRUE(serves(m, "smol"));
  EXPECT_FALSE(serves(m, "file-stem"));  // the stem is not served under aliases
}

}  // namespace
}  // namespace kvlm::server
