// The JSON-schema compiler and the grammar matcher: which strings a schema's grammar takes, the
// errors for what is not supported, and token masks against a brute-force check of every token.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "base/error.h"
#include "grammar/json_schema.h"
#include "grammar/matcher.h"

namespace kvlm {
namespace {

using json = nlohmann::ordered_json;

bool takes(const std::shared_ptr<const Grammar>& g, std::string_view text) {
  GrammarMatcher m(g, TokenTrie::single_bytes());
  return m.accept_bytes(text) && m.complete();
}

std::shared_ptr<const Grammar> schema(const char* text) {
  return compile_json_schema(json::parse(text));
}

TEST(JsonGrammar, JsonObjectTakesObjectsOnly) {
  const auto g = json_object_grammar();
  for (const char* ok : {"{}", "{ }", R"({"a":1})", R"({"a": [1, 2.5e3, -0.5E-2, "x\"y\u00e9", null, true, false, {}], "b": {"c": []}})",
                         "\n{\"k\" :\t\"v\"}", R"({"a":"é ü ✓"})"})
    EXPECT_TRUE(takes(g, ok)) << ok;
  for (const char* bad : {"[]", "\"abc\"", "1", "{", R"({"a":})", R"({"a" 1})", "{}x", "{} ",
                          R"({"a":01})", R"({"a":1.})", R"({"a":"\x"})", "{\"a\":\"\x01\"}",
                          R"({a:1})", R"({"a":1,})", R"({"a":tru})"})
    EXPECT_FALSE(takes(g, bad)) << bad;
}

TEST(JsonGrammar, ObjectPropertiesRequiredAndOptional) {
  // Properties come in the schema's order (an ordered_json keeps it): name, age, tags.
  const auto g = schema(R"({"type":"object","properties":{"name":{"type":"string"},
      "age":{"type":"integer"},"tags":{"type":"array","items":{"type":"string"}}},
      "required":["name"],"additionalProperties":false})");
  for (const char* ok : {R"({"name":"x"})", R"({"name":"x","age":3})", R"({"name":"x","tags":[]})",
                         R"({"name": "", "age": -12, "tags": ["a", "b"]})"})
    EXPECT_TRUE(takes(g, ok)) << ok;
  for (const char* bad : {"{}", R"({"age":3})", R"({"name":1})", R"({"name":"x","age":3.5})",
                          R"({"name":"x","extra":1})", R"({"name":"x","tags":[1]})",
                          R"({"age":3,"name":"x"})", R"({"name":"x","tags":[],"age":3})"})
    EXPECT_FALSE(takes(g, bad)) << bad;
}

TEST(JsonGrammar, EnumConstAnyOfTypeLists) {
  const auto e = schema(R"({"enum":["red","green",3,null,{"a":[1]}]})");
  for (const char* ok : {R"("red")", R"("green")", "3", "null", R"({"a":[1]})"}) EXPECT_TRUE(takes(e, ok)) << ok;
  for (const char* bad : {R"("blue")", R"("re")", "4", "33"}) EXPECT_FALSE(takes(e, bad)) << bad;
  EXPECT_TRUE(takes(schema(R"({"const":"on"})"), R"("on")"));
  EXPECT_FALSE(takes(schema(R"({"const":"on"})"), R"("off")"));
  const auto any = schema(R"({"anyOf":[{"type":"integer"},{"type":"object","properties":{"x":{"type":"boolean"}},"required":["x"]}]})");
  for (const char* ok : {"42", R"({"x":true})"}) EXPECT_TRUE(takes(any, ok)) << ok;
  for (const char* bad : {"4.2", R"({"x":1})", R"("s")"}) EXPECT_FALSE(takes(any, bad)) << bad;
  const auto opt = schema(R"({"type":["string","null"]})");
  EXPECT_TRUE(takes(opt, "null"));
  EXPECT_TRUE(takes(opt, R"("a")"));
  EXPECT_FALSE(takes(opt, "1"));
  EXPECT_TRUE(takes(schema(R"({"type":"boolean"})"), "false"));
  EXPECT_FALSE(takes(schema(R"({"type":"boolean"})"), "null"));
}

TEST(JsonGrammar, LargeEnumIsATrie) {
  json names = json::array();
  for (int i = 0; i < 3000; ++i) names.push_back("name" + std::to_string(i * 7));
  const auto g = compile_json_schema({{"enum", names}});
  EXPECT_TRUE(takes(g, R"("name0")"));
  EXPECT_TRUE(takes(g, R"("name20993")"));
  EXPECT_FALSE(takes(g, R"("name1")"));
  EXPECT_FALSE(takes(g, R"("name")"));
  // Past the prefix all values share, the digits may follow.
  GrammarMatcher m(g, TokenTrie::single_bytes());
  ASSERT_TRUE(m.accept_bytes("\"name"));
  std::vector<uint32_t> mask(8);
  m.fill_mask(mask);
  int n_allowed = 0;
  for (uint32_t w : mask) n_allowed += __builtin_popcount(w);
  EXPECT_EQ(n_allowed, 10);  // the digits
}

TEST(JsonGrammar, ArrayBounds) {
  const auto g = schema(R"({"type":"array","items":{"type":"integer"},"minItems":2,"maxItems":3})");
  for (const char* ok : {"[1,2]", "[1, 2, 3]"}) EXPECT_TRUE(takes(g, ok)) << ok;
  for (const char* bad : {"[]", "[1]", "[1,2,3,4]", "[1,\"a\"]"}) EXPECT_FALSE(takes(g, bad)) << bad;
  const auto open = schema(R"({"type":"array","minItems":1})");
  EXPECT_TRUE(takes(open, R"([1,"a",[],{}])"));
  EXPECT_FALSE(takes(open, "[]"));
  EXPECT_TRUE(takes(schema(R"({"type":"array","maxItems":0})"), "[]"));
  EXPECT_FALSE(takes(schema(R"({"type":"array","maxItems":0})"), "[1]"));
}

TEST(JsonGrammar, RefsAndRecursion) {
  const auto g = schema(R"({"$ref":"#/$defs/node","$defs":{"node":{"type":"object",
      "properties":{"v":{"type":"integer"},"kids":{"type":"array","items":{"$ref":"#/$defs/node"}}},
      "required":["v"]}}})");
  EXPECT_TRUE(takes(g, R"({"v":1,"kids":[{"v":2},{"v":3,"kids":[{"v":4}]}]})"));
  EXPECT_FALSE(takes(g, R"({"v":1,"kids":[{"w":2}]})"));
  // Nesting past the matcher's stack bound dies instead of growing without end.
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += R"({"v":0,"kids":[)";
  GrammarMatcher m(g, TokenTrie::single_bytes());
  EXPECT_FALSE(m.accept_bytes(deep));
  EXPECT_TRUE(GrammarMatcher(g, TokenTrie::single_bytes()).accept_bytes(deep.substr(0, 10 * 15)));
}

TEST(JsonGrammar, NumbersAreBounded) {
  const auto g = schema(R"({"type":"number"})");
  EXPECT_TRUE(takes(g, "1234567890123456"));
  EXPECT_FALSE(takes(g, "12345678901234567"));
  EXPECT_TRUE(takes(g, "-1.5e+10"));
  EXPECT_FALSE(takes(g, "1e1234"));
}

void expect_error(const char* text, const std::string& needle) {
  try {
    compile_json_schema(json::parse(text));
    ADD_FAILURE() << "no error for " << text;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(JsonGrammar, UnsupportedKeywordsAreNamed) {
  expect_error(R"({"type":"string","pattern":"^a"})", "'pattern'");
  expect_error(R"({"type":"object","properties":{"n":{"type":"integer","minimum":0}}})",
               "'minimum' is not supported (at /properties/n)");
  expect_error(R"({"oneOf":[{"type":"string"}]})", "'oneOf'");
  expect_error(R"({"type":"date"})", "'date'");
  expect_error(R"({"$ref":"http://example.com/s.json"})", "'$ref'");
  expect_error(R"({"$ref":"#/$defs/missing"})", "points at nothing");
  expect_error(R"({"type":"object","properties":{},"required":["a"]})", "'required'");
  expect_error(R"({"type":"array","maxItems":100000})", "'maxItems'");
  expect_error(R"({"type":"array","minItems":3,"maxItems":2})", "'minItems'");
  expect_error(R"({"anyOf":[{"type":"string"}],"type":"string"})", "'anyOf'");
  expect_error("false", "admits no value");
  json any = {{"anyOf", json::array()}};
  for (int i = 0; i < 65; ++i) any["anyOf"].push_back({{"const", i}});
  expect_error(any.dump().c_str(), "'anyOf' lists 65");
  expect_error(json({{"const", std::string(2000, 'x')}}).dump().c_str(), "'const'");
  std::string deep = R"({"type":"array","items":)";
  std::string text;
  for (int i = 0; i < 40; ++i) text += deep;
  text += "{}";
  text += std::string(40, '}');
  expect_error(text.c_str(), "nests deeper");
}

// ---- masks ----

// A small vocabulary of JSON-ish pieces and random strings over JSON's characters.
std::vector<std::string> test_vocab() {
  std::vector<std::string> v = {"{", "}", "\"", "a", "\"a", "a\"", ":", "1", " ", "{\"",
                                "\":", "\",", ",\"", "true", "tr", "ue", "null", "[", "]",
                                "\\", "\\n", "\\u", "00e9", "é", "\xC3", "\xA9", "", "12", ".5"};
  std::mt19937 rng(7);
  const std::string alphabet = "{}[]\":,. -0123456789abcenlrstu\\\n";
  for (int i = 0; i < 400; ++i) {
    std::string s;
    const int n = 1 + static_cast<int>(rng() % 6);
    for (int k = 0; k < n; ++k) s += alphabet[rng() % alphabet.size()];
    v.push_back(s);
  }
  return v;
}

// The mask against accepting each token on a copy of the matcher, along a random walk of
// allowed tokens.
void check_masks(const std::shared_ptr<const Grammar>& g, uint32_t seed) {
  const std::vector<std::string> vocab = test_vocab();
  const int32_t eos = static_cast<int32_t>(vocab.size());
  std::vector<std::string> with_eos = vocab;
  with_eos.emplace_back();  // the end token: no bytes
  const TokenTrie trie(with_eos, {eos});
  GrammarMatcher m(g, trie);
  std::mt19937 rng(seed);
  std::vector<uint32_t> mask((with_eos.size() + 31) / 32);
  for (int step = 0; step < 60; ++step) {
    m.fill_mask(mask);
    std::vector<int32_t> allowed;
    for (int32_t id = 0; id <= eos; ++id) {
      const bool bit = (mask[static_cast<size_t>(id) / 32] >> (id % 32)) & 1;
      GrammarMatcher copy = m;
      const bool want = id == eos ? m.complete() : copy.accept_token(id);
      ASSERT_EQ(bit, want) << "step " << step << " token '" << with_eos[static_cast<size_t>(id)] << "'";
      if (bit) allowed.push_back(id);
    }
    ASSERT_FALSE(allowed.empty());
    const int32_t pick = allowed[rng() % allowed.size()];
    if (pick == eos) break;
    ASSERT_TRUE(m.accept_token(pick));
  }
}

TEST(GrammarMask, MatchesBruteForce) {
  for (uint32_t seed = 0; seed < 8; ++seed) {
    check_masks(json_object_grammar(), seed);
    check_masks(schema(R"({"type":"object","properties":{"a":{"type":"string"},
        "e":{"enum":["true","tru",1]},"n":{"type":"number"},"l":{"type":"array","items":{"type":"null"}}},
        "required":["a","n"]})"), seed);
  }
}

TEST(GrammarMask, TinyVocabulary) {
  // ids: 0 "{", 1 "}", 2 "\"", 3 "a", 4 "\"a", 5 "a\"", 6 ":", 7 " ", 8 end
  const TokenTrie trie({"{", "}", "\"", "a", "\"a", "a\"", ":", " ", ""}, {8});
  GrammarMatcher m(json_object_grammar(), trie);
  std::vector<uint32_t> mask(1);
  m.fill_mask(mask);
  EXPECT_EQ(mask[0], 0b010000001u);  // "{" or whitespace
  ASSERT_TRUE(m.accept_token(0));
  m.fill_mask(mask);
  EXPECT_EQ(mask[0], 0b010010110u);  // "}", "\"", "\"a", " "
  ASSERT_TRUE(m.accept_token(4));   // {"a
  m.fill_mask(mask);
  // Inside the key every token but "\"a" (the key would end and 'a' follow it) and the end.
  EXPECT_EQ(mask[0], 0b011101111u);
  ASSERT_TRUE(m.accept_token(5));   // {"aa"
  EXPECT_FALSE(m.accept_token(3));
  ASSERT_TRUE(m.accept_token(6));
  ASSERT_TRUE(m.accept_token(2));
  ASSERT_TRUE(m.accept_token(2));   // {"aa":""
  EXPECT_FALSE(m.complete());
  ASSERT_TRUE(m.accept_token(1));
  EXPECT_TRUE(m.complete());
  EXPECT_TRUE(m.finished());
  m.fill_mask(mask);
  EXPECT_EQ(mask[0], 0b100000000u);  // only the end
}

}  // namespace
}  // namespace kvlm
