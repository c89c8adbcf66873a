// Tool calls (src/server/tools.h): the model's output parsed back into OpenAI's tool_calls in each
// format, whole and as stream deltas split anywhere; the format a template asks for; the
// conversation readied for templates with and without tools; the grammar of a forced call.

#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>

#include "grammar/matcher.h"
#include "server/tools.h"
#include "test_util.h"

namespace kvlm::server {
namespace {

const ToolCallFormat& kLlama = kToolCallFormats[0];
const ToolCallFormat& kHermes = kHermesFormat;
const std::vector<std::string> kNames = {"get_weather", "search"};

void expect_id(const std::string& id) {
  EXPECT_EQ(id.rfind("call_", 0), 0u) << id;
  EXPECT_EQ(id.size(), 29u) << id;
}

TEST(ToolParse, HermesOneCallWithTextBefore) {
  const ParsedReply r = parse_tool_calls(
      kHermes,
      "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": "
      "\"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
      kNames);
  EXPECT_EQ(r.content, "Let me check.");
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.calls[0].name, "get_weather");
  EXPECT_EQ(r.calls[0].arguments, R"({"location":"Paris","unit":"celsius"})");  // keys in order
  expect_id(r.calls[0].id);
}

TEST(ToolParse, HermesSeveralCallsAndTextAfter) {
  const ParsedReply r = parse_tool_calls(
      kHermes,
      "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"a}b\\\"{\", \"limit\": "
      "2}}\n</tool_call>\n<tool_call>{\"name\":\"get_weather\",\"arguments\":\"{\\\"location\\\":"
      "\\\"Rome\\\"}\"}</tool_call>\nDone.",
      kNames);
  EXPECT_EQ(r.content, "Done.");
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[0].name, "search");
  EXPECT_EQ(r.calls[0].arguments, R"({"query":"a}b\"{","limit":2})");
  EXPECT_EQ(r.calls[1].name, "get_weather");
  EXPECT_EQ(r.calls[1].arguments, R"({"location":"Rome"})");  // a string's text as it is
  EXPECT_NE(r.calls[0].id, r.calls[1].id);
}

TEST(ToolParse, HermesMalformedStaysContent) {
  for (const char* text : {
           "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": }}\n</tool_call>",
           "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Pa",
           "<tool_call>\n{\"name\": \"launch\", \"arguments\": {}}\n</tool_call>",  // no such tool
           "<tool_call>\n{\"name\": \"search\"}\n</tool_call>",  // no arguments
           "<tool_call>\n{\"name\": \"search\", \"arguments\": [1]}\n</tool_call>",
           "<tool_call>not json</tool_call>", "<tool_", "plain text with a { brace"}) {
    const ParsedReply r = parse_tool_calls(kHermes, text, kNames);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
  // A call whose close marker never came (the reply ended) still stands.
  const ParsedReply r =
      parse_tool_calls(kHermes, "<tool_call>{\"name\": \"search\", \"arguments\": {}}", kNames);
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.content, "");
}

TEST(ToolParse, LlamaJsonAtTheStart) {
  for (const char* text :
       {"{\"name\": \"get_weather\", \"parameters\": {\"location\": \"Paris\"}}",
        "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"location\": \"Paris\"}}",
        "\n  {\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\"}}\n"}) {
    const ParsedReply r = parse_tool_calls(kLlama, text, kNames);
    ASSERT_EQ(r.calls.size(), 1u) << text;
    EXPECT_EQ(r.calls[0].name, "get_weather");
    EXPECT_EQ(r.calls[0].arguments, R"({"location":"Paris"})");
    EXPECT_EQ(r.content, "");
  }
  // Only the reply's start opens a call: JSON inside an answer is the answer.
  for (const char* text :
       {"Here: {\"name\": \"get_weather\", \"parameters\": {}}", "{\"name\": \"Bob\", \"age\": 3}",
        "{\"name\": \"get_weather\", \"parameters\": {\"location\"", "{}", "<|python"}) {
    const ParsedReply r = parse_tool_calls(kLlama, text, kNames);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
}

// Every split of a reply into pieces gives the same content and calls as parsing it whole, and
// the deltas are OpenAI's: a call's first delta has its id, type, name and empty arguments, the
// next its arguments; with `clean` (every marker in the text opens a call), no content delta holds
// a part of one.
void check_stream(const ToolCallFormat& f, const std::string& text, uint32_t seed,
                  bool clean = true) {
  const ParsedReply whole = parse_tool_calls(f, text, kNames);
  std::mt19937 rng(seed);
  ToolCallStream s(f, kNames);
  std::vector<json> deltas;
  for (size_t i = 0; i < text.size();) {
    const size_t n = 1 + rng() % 6;
    for (json& d : s.push(std::string_view(text).substr(i, n))) deltas.push_back(std::move(d));
    i += n;
  }
  for (json& d : s.finish()) deltas.push_back(std::move(d));
  std::string content;
  std::vector<ToolCall> calls;
  for (const json& d : deltas) {
    if (d.contains("content")) {
      content += d["content"].get<std::string>();
      if (clean && !whole.calls.empty()) {
        EXPECT_EQ(d["content"].get<std::string>().find("<tool"), std::string::npos);
      }
      continue;
    }
    const json& tc = d["tool_calls"][0];
    if (tc.contains("id")) {
      EXPECT_EQ(tc["index"], calls.size());
      EXPECT_EQ(tc["type"], "function");
      EXPECT_EQ(tc["function"]["arguments"], "");
      calls.push_back({tc["id"], tc["function"]["name"], ""});
    } else {
      ASSERT_FALSE(calls.empty());
      EXPECT_EQ(tc["index"], calls.size() - 1);
      calls.back().arguments += tc["function"]["arguments"].get<std::string>();
    }
  }
  EXPECT_EQ(content, whole.content) << text;
  ASSERT_EQ(calls.size(), whole.calls.size()) << text;
  EXPECT_EQ(s.n_calls(), static_cast<int32_t>(calls.size()));
  for (size_t k = 0; k < calls.size(); ++k) {
    EXPECT_EQ(calls[k].name, whole.calls[k].name);
    EXPECT_EQ(calls[k].arguments, whole.calls[k].arguments);
    expect_id(calls[k].id);
  }
}

TEST(ToolStream, DeltasMatchTheWholeParseAtAnySplit) {
  const std::vector<std::pair<const ToolCallFormat*, std::string>> replies = {
      {&kHermes,
       "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": "
       "\"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": "
       "{\"query\": \"</tool_call>\", \"limit\": 1}}\n</tool_call>"},
      {&kHermes, "No call here, only a < and a <tool and text."},
      {&kHermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Pa"},
      {&kLlama, "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"query\": \"x\", "
                "\"limit\": 3}}"},
      {&kLlama, "  Hello {\"name\": \"search\"} there"},
  };
  for (const auto& [f, text] : replies)
    for (uint32_t seed = 1; seed <= 20; ++seed) check_stream(*f, text, seed);
}

// Replies made of pieces of calls in any order: parsing never throws, and streaming agrees with
// the whole parse whatever comes.
TEST(ToolStream, RandomPiecesNeverThrowAndAgree) {
  const std::vector<std::string> pieces = {
      "<tool_call>", "</tool_call>", "<|python_tag|>", "{", "}", "[", "]", "\"", "\\", ":", ",",
      " ", "\n", "\"name\"", "\"search\"", "\"arguments\"", "\"parameters\"", "1",
      "\"query\"", "<tool", "call>", "é", "\xff", "text"};
  std::mt19937 rng(42);
  for (int iter = 0; iter < 300; ++iter) {
    std::string text;
    const size_t n = 1 + rng() % 30;
    for (size_t k = 0; k < n; ++k) text += pieces[rng() % pieces.size()];
    if (iter % 3 == 0)  // some whole calls among the noise
      text += "<tool_call>{\"name\": \"search\", \"arguments\": {\"q\": 1}}</tool_call>";
    for (const ToolCallFormat* f : {&kHermes, &kLlama}) {
      EXPECT_NO_THROW(parse_tool_calls(*f, text, kNames)) << text;
      check_stream(*f, text, static_cast<uint32_t>(iter), /*clean=*/false);
    }
  }
}

TEST(ToolStream, ContentIsNotHeldLongerThanNeeded) {
  ToolCallStream s(kHermes, kNames);
  auto content = [](const std::vector<json>& d) {
    std::string out;
    for (const json& j : d) out += j.value("content", "");
    return out;
  };
  EXPECT_EQ(content(s.push("Hello <to")), "Hello");  // "<to" may start a call
  EXPECT_EQ(content(s.push("day> ok")), " <today> ok");
  ToolCallStream l(kLlama, kNames);
  EXPECT_EQ(content(l.push("  ")), "");  // may still open with a call
  EXPECT_EQ(content(l.push("Hi")), "  Hi");
}

TEST(ToolSplit, ChoiceGetsCallsAndFinishReason) {
  ChoiceText c{"<tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"q\", \"limit\": 1}}"
               "</tool_call>",
               "stop"};
  split_tool_calls(kHermes, kNames, c);
  EXPECT_EQ(c.finish, "tool_calls");
  EXPECT_EQ(c.text, "");
  ASSERT_TRUE(c.tool_calls.is_array());
  EXPECT_EQ(c.tool_calls[0]["type"], "function");
  EXPECT_EQ(c.tool_calls[0]["function"]["name"], "search");
  EXPECT_EQ(c.tool_calls[0]["function"]["arguments"], R"({"query":"q","limit":1})");
  const json msg = render_response({Endpoint::Chat, "id", 0, "m"}, {c}, {})["choices"][0]["message"];
  EXPECT_TRUE(msg["content"].is_null());
  EXPECT_EQ(msg["tool_calls"], c.tool_calls);
  ChoiceText plain{"just text", "length"};
  split_tool_calls(kHermes, kNames, plain);
  EXPECT_EQ(plain.finish, "length");
  EXPECT_TRUE(plain.tool_calls.is_null());
  EXPECT_FALSE(render_response({Endpoint::Chat, "id", 0, "m"}, {plain}, {})["choices"][0]["message"]
                   .contains("tool_calls"));
}

std::string read_template(const std::string& name) {
  std::ifstream f(test::refdata_dir() + "/templates/" + name);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(ToolFormat, ChosenFromTheTemplate) {
  for (const char* name : {"meta-llama-Llama-3.1-8B-Instruct.jinja",
                           "meta-llama-Llama-3.2-3B-Instruct.jinja"}) {
    const std::string src = read_template(name);
    ASSERT_FALSE(src.empty()) << name << ": run scripts/fetch-refdata.sh";
    EXPECT_EQ(tool_call_format(src).name, "llama3") << name;
    EXPECT_TRUE(template_renders_tools(src));
  }
  for (const char* name : {"Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
                           "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"}) {
    const std::string src = read_template(name);
    ASSERT_FALSE(src.empty()) << name;
    EXPECT_EQ(tool_call_format(src).name, "hermes") << name;
    EXPECT_TRUE(template_renders_tools(src));
  }
  const std::string chatml =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>\\n'}}{% endfor %}";
  EXPECT_EQ(tool_call_format(chatml).name, "hermes");
  EXPECT_FALSE(template_renders_tools(chatml));
}

json weather_tools() {
  return json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "description": "Weather in a city", "parameters": {"type": "object", "properties": {
      "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
      "required": ["location", "unit"]}}},
      {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
      "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
      "required": ["query", "limit"]}}}])");
}

TEST(ToolMessages, TemplateWithoutToolsGetsKvlmsPrompt) {
  ToolsRequest t;
  t.tools = weather_tools();
  std::vector<ChatMessage> msgs = {{"user", "Weather?"}};
  ChatMessage call{"assistant", ""};
  call.content_none = true;
  call.tool_calls = {{"call_1", "get_weather", R"({"location": "Paris", "unit": "celsius"})"}};
  msgs.push_back(call);
  ChatMessage result{"tool", "21 C"};
  result.tool_call_id = "call_1";
  msgs.push_back(result);
  const std::string chatml = "{{ messages }}";
  EXPECT_EQ(tool_messages(msgs, t, chatml), "");
  ASSERT_EQ(msgs.size(), 4u);
  EXPECT_EQ(msgs[0].role, "system");
  EXPECT_NE(msgs[0].content.find("\"name\":\"get_weather\""), std::string::npos);
  EXPECT_NE(msgs[0].content.find("<tool_call>"), std::string::npos);
  EXPECT_EQ(msgs[2].content,
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"location\":\"Paris\","
            "\"unit\":\"celsius\"}}\n</tool_call>");
  EXPECT_FALSE(msgs[2].content_none);
  EXPECT_TRUE(msgs[2].tool_calls.empty());
  EXPECT_EQ(msgs[3].role, "user");
  EXPECT_EQ(msgs[3].content, "<tool_response>\n21 C\n</tool_response>");
  // The written calls parse back as the calls they were.
  EXPECT_EQ(parse_tool_calls(kHermes, msgs[2].content, kNames).calls.size(), 1u);

  // A template that renders tools gets them, and the messages as they are.
  std::vector<ChatMessage> same = {{"system", "S"}, {"user", "Weather?"}, call, result};
  const std::string qwen = read_template("Qwen-Qwen2.5-7B-Instruct.jinja");
  EXPECT_EQ(json::parse(tool_messages(same, t, qwen)), t.tools);
  EXPECT_EQ(same.size(), 4u);
  EXPECT_EQ(same[0].content, "S");
  EXPECT_EQ(same[2].tool_calls.size(), 1u);
  // tool_choice none: no tools shown.
  t.choice = ToolChoice::None;
  std::vector<ChatMessage> none = {{"system", "S"}, {"user", "Weather?"}};
  EXPECT_EQ(tool_messages(none, t, qwen), "");
  EXPECT_EQ(tool_messages(none, t, chatml), "");
  EXPECT_EQ(none[0].content, "S");
}

bool grammar_takes(const std::shared_ptr<const Grammar>& g, std::string_view text) {
  GrammarMatcher m(g, TokenTrie::single_bytes());
  return m.accept_bytes(text) && m.complete();
}

TEST(ToolGrammar, ForcedCallFollowsTheFormatAndTheSchema) {
  ToolsRequest t;
  t.tools = weather_tools();
  t.choice = ToolChoice::Required;
  const auto h = tool_call_grammar(kHermes, t);
  const std::string ok =
      "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", "
      "\"unit\": \"celsius\"}}\n</tool_call>";
  EXPECT_TRUE(grammar_takes(h, ok));
  EXPECT_EQ(parse_tool_calls(kHermes, ok, kNames).calls.size(), 1u);
  EXPECT_TRUE(grammar_takes(h, "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": "
                               "\"x\", \"limit\": 2}}\n</tool_call>"));
  for (const char* bad : {
           "{\"name\": \"search\", \"arguments\": {\"query\": \"x\", \"limit\": 2}}",  // no tags
           "<tool_call>\n{\"name\": \"launch\", \"arguments\": {}}\n</tool_call>",
           "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"x\"}}\n</tool_call>",
           "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"limit\": 2, \"query\": \"x\"}}"
           "\n</tool_call>",  // the schema's order
           "<tool_call>\n{\"arguments\": {}, \"name\": \"search\"}\n</tool_call>",
           "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"P\", "
           "\"unit\": \"kelvin\"}}\n</tool_call>"})
    EXPECT_FALSE(grammar_takes(h, bad)) << bad;

  t.choice = ToolChoice::Named;
  t.named = "search";
  const auto named = tool_call_grammar(kHermes, t);
  EXPECT_FALSE(grammar_takes(named, ok));
  EXPECT_TRUE(grammar_takes(named, "<tool_call>\n{\"name\": \"search\", \"arguments\": "
                                   "{\"query\": \"x\", \"limit\": 2}}\n</tool_call>"));
  const auto llama = tool_call_grammar(kLlama, t);
  const std::string lcall = "{\"name\": \"search\", \"parameters\": {\"query\": \"x\", \"limit\": 2}}";
  EXPECT_TRUE(grammar_takes(llama, lcall));
  EXPECT_EQ(parse_tool_calls(kLlama, lcall, kNames).calls.size(), 1u);
  EXPECT_FALSE(grammar_takes(llama, "<tool_call>\n" + lcall + "\n</tool_call>"));
}

TEST(ToolGrammar, DefsMoveToTheRootAndToolsWithoutParameters) {
  ToolsRequest t;
  t.tools = json::parse(R"([{"type": "function", "function": {"name": "f", "parameters": {
      "type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "required": ["p"],
      "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}},
      "required": ["x"]}}}}}, {"type": "function", "function": {"name": "ping"}}])");
  t.choice = ToolChoice::Required;
  const auto g = tool_call_grammar(kHermes, t);
  EXPECT_TRUE(grammar_takes(g, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"p\": {\"x\": "
                               "1}}}\n</tool_call>"));
  EXPECT_FALSE(grammar_takes(g, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"p\": {\"y\": "
                                "1}}}\n</tool_call>"));
  EXPECT_TRUE(grammar_takes(g, "<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>"));
  EXPECT_FALSE(grammar_takes(g, "<tool_call>\n{\"name\": \"ping\", \"arguments\": {\"a\": 1}}\n"
                                "</tool_call>"));
}

}  // namespace
}  // namespace kvlm::server
