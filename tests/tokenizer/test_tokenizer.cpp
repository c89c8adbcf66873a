// Tokenizer tests. The goldens (tests/data/tokenizer_goldens.json) come from llama.cpp through
// llama-cpp-python and from jinja2, produced by tools/gen_tokenizer_goldens.py; the small
// vocabularies built here check behaviour the default model cannot show (rank order, fallbacks,
// user-defined tokens, metadata errors).

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "base/error.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

using nlohmann::json;

// ---- helpers -----------------------------------------------------------------------------------

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::string to_hex(std::string_view s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

// The input bytes of a golden case.
std::string case_input(const json& c) {
  return c.contains("text") ? c["text"].get<std::string>() : from_hex(c["hex"].get<std::string>());
}

std::string case_name(const json& c) {
  return fmt::format("{} (add_bos={}, special={})", c["name"].get<std::string>(),
                     c["add_bos"].get<bool>(), c["special"].get<bool>());
}

// Strict UTF-8 check, independent of the tokenizer's own helpers.
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<uint8_t>(s[i]);
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b < 0x80) {
      ++i;
      continue;
    }
    if (b >= 0xC2 && b <= 0xDF)
      len = 2;
    else if (b == 0xE0) {
      len = 3;
      lo = 0xA0;
    } else if (b == 0xED) {
      len = 3;
      hi = 0x9F;
    } else if (b >= 0xE1 && b <= 0xEF)
      len = 3;
    else if (b == 0xF0) {
      len = 4;
      lo = 0x90;
    } else if (b >= 0xF1 && b <= 0xF3)
      len = 4;
    else if (b == 0xF4) {
      len = 4;
      hi = 0x8F;
    } else
      return false;
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto c = static_cast<uint8_t>(s[i + k]);
      if (k == 1 ? (c < lo || c > hi) : (c & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ull;
uint64_t fnv1a64(std::string_view data, uint64_t h = kFnvOffset) {
  for (unsigned char c : data) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}
std::string le32(uint32_t v) {
  std::string s(4, '\0');
  std::memcpy(s.data(), &v, 4);
  return s;
}

const json& goldens() {
  static const json j = [] {
    std::ifstream in(test::data_path("tokenizer_goldens.json"));
    EXPECT_TRUE(in.good()) << "missing " << test::data_path("tokenizer_goldens.json");
    return json::parse(in);
  }();
  return j;
}

// Minimal GGUF v3 writer for in-memory vocabularies (no tensors).
class GgufBuilder {
 public:
  GgufBuilder& str(const std::string& key, const std::string& v) {
    header(key, 8);
    put_str(v);
    return *this;
  }
  GgufBuilder& u32(const std::string& key, uint32_t v) {
    header(key, 4);
    put(v);
    return *this;
  }
  GgufBuilder& boolean(const std::string& key, bool v) {
    header(key, 7);
    put(static_cast<uint8_t>(v));
    return *this;
  }
  GgufBuilder& strs(const std::string& key, const std::vector<std::string>& v) {
    header(key, 9);
    put(uint32_t{8});
    put(uint64_t{v.size()});
    for (const auto& s : v) put_str(s);
    return *this;
  }
  GgufBuilder& i32s(const std::string& key, const std::vector<int32_t>& v) {
    header(key, 9);
    put(uint32_t{5});
    put(uint64_t{v.size()});
    for (int32_t x : v) put(x);
    return *this;
  }
  std::unique_ptr<GgufFile> open(const std::string& label) {
    image_.clear();
    image_ += "GGUF";
    append(uint32_t{3});
    append(uint64_t{0});  // tensors
    append(n_kv_);
    image_ += kv_;
    image_.resize((image_.size() + 31) / 32 * 32, '\0');  // empty, aligned data section
    return GgufFile::from_memory(reinterpret_cast<const uint8_t*>(image_.data()), image_.size(),
                                 label);
  }

 private:
  template <class T>
  void append(T v) {
    image_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  template <class T>
  void put(T v) {
    kv_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void put_str(const std::string& s) {
    put(uint64_t{s.size()});
    kv_ += s;
  }
  void header(const std::string& key, uint32_t type) {
    put_str(key);
    put(type);
    ++n_kv_;
  }
  std::string kv_;
  std::string image_;  // must outlive the GgufFile opened over it
  uint64_t n_kv_ = 0;
};

// The default model's tokenizer, loaded once.
struct Model {
  std::unique_ptr<GgufFile> file;
  std::unique_ptr<Tokenizer> tok;
};
const Model& model() {
  static const Model m = [] {
    Model m;
    m.file = GgufFile::open(test::model_path());
    m.tok = Tokenizer::from_gguf(*m.file);
    return m;
  }();
  return m;
}

// The model's vocabulary and merges rewritten with other tokenizer settings, as the goldens
// script does for llama.cpp. Builders are kept alive with their images.
std::unique_ptr<Tokenizer> model_variant(const std::string& pre, bool add_bos,
                                         std::vector<std::unique_ptr<GgufBuilder>>* keep) {
  const GgufFile& f = *model().file;
  auto b = std::make_unique<GgufBuilder>();
  b->str("tokenizer.ggml.model", "gpt2");
  if (!pre.empty()) b->str("tokenizer.ggml.pre", pre);
  b->strs("tokenizer.ggml.tokens", *f.get_string_array("tokenizer.ggml.tokens"));
  std::vector<int32_t> types;
  for (double t : *f.get_number_array("tokenizer.ggml.token_type"))
    types.push_back(static_cast<int32_t>(t));
  b->i32s("tokenizer.ggml.token_type", types);
  b->strs("tokenizer.ggml.merges", *f.get_string_array("tokenizer.ggml.merges"));
  b->u32("tokenizer.ggml.bos_token_id",
         static_cast<uint32_t>(*f.get_int("tokenizer.ggml.bos_token_id")));
  b->u32("tokenizer.ggml.eos_token_id",
         static_cast<uint32_t>(*f.get_int("tokenizer.ggml.eos_token_id")));
  b->boolean("tokenizer.ggml.add_bos_token", add_bos);
  auto file = b->open("variant-" + pre);
  auto tok = Tokenizer::from_gguf(*file);
  keep->push_back(std::move(b));
  return tok;
}

// A small byte-level vocabulary: the 256 byte characters (ids 0..255 in byte order), then
// `extra` tokens, with the given merges.
struct TinyVocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;
  GgufBuilder builder;
  std::unique_ptr<GgufFile> file;
};
std::string byte_char(uint8_t b) {
  // GPT-2's mapping, written out independently of the tokenizer's implementation.
  int n = 0;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
    if (x == b) {
      const uint32_t cp = printable ? x : 256 + n;
      std::string s;
      if (cp < 0x80) {
        s += static_cast<char>(cp);
      } else {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
      }
      return s;
    }
    if (!printable) ++n;
  }
  return {};
}
std::unique_ptr<TinyVocab> tiny_vocab(const std::vector<std::pair<std::string, int32_t>>& extra,
                                      const std::vector<std::string>& merges) {
  auto v = std::make_unique<TinyVocab>();
  for (int b = 0; b < 256; ++b) {
    v->tokens.push_back(byte_char(static_cast<uint8_t>(b)));
    v->types.push_back(1);
  }
  for (const auto& [text, type] : extra) {
    v->tokens.push_back(text);
    v->types.push_back(type);
  }
  v->merges = merges;
  return v;
}
std::unique_ptr<Tokenizer> open_tiny(TinyVocab& v, const std::string& model = "gpt2",
                                     const std::string& pre = "gpt2") {
  v.builder.str("tokenizer.ggml.model", model).str("tokenizer.ggml.pre", pre);
  v.builder.strs("tokenizer.ggml.tokens", v.tokens).i32s("tokenizer.ggml.token_type", v.types);
  v.builder.strs("tokenizer.ggml.merges", v.merges);
  v.file = v.builder.open("tiny.gguf");
  return Tokenizer::from_gguf(*v.file);
}

int32_t byte_id(uint8_t b) {
  return b;
}  // in tiny vocabularies

// ---- goldens from llama.cpp --------------------------------------------------------------------

TEST(TokenizerGoldens, VocabularyMatchesLlamaCpp) {
  const Tokenizer& tok = *model().tok;
  const json& v = goldens()["vocab"];
  EXPECT_EQ(tok.n_vocab(), v["n_vocab"].get<int>());
  EXPECT_EQ(tok.bos_id(), v["bos"].get<int>());
  EXPECT_EQ(tok.eos_id(), v["eos"].get<int>());
  EXPECT_FALSE(tok.add_bos_default());
  EXPECT_EQ(tok.pre(), "smollm");

  std::set<int> eog_expected;
  for (int id : v["eog_ids"]) eog_expected.insert(id);
  std::set<int> eog;
  for (int id = 0; id < tok.n_vocab(); ++id)
    if (tok.is_eog(id)) eog.insert(id);
  EXPECT_EQ(eog, eog_expected);
  EXPECT_FALSE(tok.is_eog(-1));
  EXPECT_FALSE(tok.is_eog(tok.n_vocab()));

  // llama_token_attr bits: 4 NORMAL, 8 CONTROL, 16 USER_DEFINED.
  const std::map<int, TokenType> attr_type = {
      {4, TokenType::Normal}, {8, TokenType::Control}, {16, TokenType::UserDefined}};
  for (const auto& [id, attr] : v["attrs"].items())
    EXPECT_EQ(tok.token_type(std::stoi(id)), attr_type.at(attr.get<int>())) << "token " << id;

  uint64_t h_special = kFnvOffset, h_plain = kFnvOffset;
  for (int id = 0; id < tok.n_vocab(); ++id) {
    const std::string ps = tok.token_bytes(id, true), pp = tok.token_bytes(id, false);
    h_special = fnv1a64(le32(static_cast<uint32_t>(ps.size())) + ps, h_special);
    h_plain = fnv1a64(le32(static_cast<uint32_t>(pp.size())) + pp, h_plain);
  }
  EXPECT_EQ(fmt::format("{:016x}", h_special), v["pieces_fnv_special"].get<std::string>());
  EXPECT_EQ(fmt::format("{:016x}", h_plain), v["pieces_fnv_plain"].get<std::string>());
}

TEST(TokenizerGoldens, EncodeMatchesLlamaCpp) {
  const Tokenizer& tok = *model().tok;
  size_t n = 0;
  for (const json& c : goldens()["cases"]) {
    const auto ids = tok.encode(case_input(c), c["add_bos"], c["special"]);
    EXPECT_EQ(ids, c["ids"].get<std::vector<int32_t>>()) << case_name(c);
    ++n;
  }
  EXPECT_GT(n, 250u);
}

TEST(TokenizerGoldens, DecodeMatchesLlamaCppPieces) {
  const Tokenizer& tok = *model().tok;
  for (const json& c : goldens()["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const std::string detok =
        c.contains("detok_hex") ? from_hex(c["detok_hex"].get<std::string>()) : case_input(c);
    const std::string detok_plain =
        c.contains("detok_plain_hex") ? from_hex(c["detok_plain_hex"].get<std::string>()) : detok;
    EXPECT_EQ(to_hex(tok.decode(ids, true)), to_hex(detok)) << case_name(c);
    EXPECT_EQ(to_hex(tok.decode(ids, false)), to_hex(detok_plain)) << case_name(c);
  }
}

TEST(TokenizerGoldens, VariantsMatchLlamaCpp) {
  std::vector<std::unique_ptr<GgufBuilder>> keep;
  size_t n = 0;
  for (const json& v : goldens()["variants"]) {
    const std::string pre = v["pre"].is_null() ? "" : v["pre"].get<std::string>();
    auto tok = model_variant(pre, v["add_bos_token"], &keep);
    EXPECT_EQ(tok->pre(), pre.empty() ? "default" : pre);
    for (const json& c : v["cases"]) {
      EXPECT_EQ(tok->encode(case_input(c), c["add_bos"], c["special"]),
                c["ids"].get<std::vector<int32_t>>())
          << "variant " << v["name"] << ": " << case_name(c);
      ++n;
    }
  }
  EXPECT_GT(n, 300u);
}

// ---- round trips and streaming -----------------------------------------------------------------

TEST(Tokenizer, DecodeInvertsEncodeForValidUtf8) {
  const Tokenizer& tok = *model().tok;
  for (const json& c : goldens()["cases"]) {
    if (!c.contains("text")) continue;
    const std::string text = c["text"];
    // Special-token text is kept as text without parse_special and rendered back with it.
    EXPECT_EQ(tok.decode(tok.encode(text, false, false)), text) << case_name(c);
    EXPECT_EQ(tok.decode(tok.encode(text, false, true), true), text) << case_name(c);
  }
}

// Feeds ids one at a time; every chunk must be whole UTF-8 characters.
std::string stream(const Tokenizer& tok, const std::vector<int32_t>& ids, bool render_special,
                   const std::string& what) {
  StreamDecoder dec(tok, render_special);
  std::string all;
  for (int32_t id : ids) {
    const std::string chunk = dec.push(id);
    EXPECT_TRUE(valid_utf8(chunk)) << what << ": chunk " << to_hex(chunk);
    all += chunk;
  }
  const std::string rest = dec.flush();
  EXPECT_TRUE(valid_utf8(rest)) << what;
  return all + rest;
}

TEST(StreamDecoder, ConcatenatesToTheDecodedText) {
  const Tokenizer& tok = *model().tok;
  size_t n_checked = 0;
  for (const json& c : goldens()["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    for (bool render_special : {false, true}) {
      const std::string full = tok.decode(ids, render_special);
      const std::string streamed = stream(tok, ids, render_special, case_name(c));
      // Decoded bytes that are not UTF-8 (a surrogate in the input) come out as U+FFFD.
      if (valid_utf8(full)) {
        EXPECT_EQ(streamed, full) << case_name(c);
        ++n_checked;
      }
    }
  }
  EXPECT_GT(n_checked, 500u);
}

TEST(StreamDecoder, HoldsBackSplitCharacters) {
  const Tokenizer& tok = *model().tok;
  // A skin-toned emoji is several tokens that each carry part of a character.
  const std::string text = "ok \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD!";
  const auto ids = tok.encode(text, false, false);
  bool saw_partial_token = false;
  for (int32_t id : ids) saw_partial_token |= !valid_utf8(tok.token_bytes(id));
  ASSERT_TRUE(saw_partial_token) << "the example no longer splits a character across tokens";

  StreamDecoder dec(tok);
  std::string out;
  for (int32_t id : ids) {
    const std::string chunk = dec.push(id);
    EXPECT_TRUE(valid_utf8(chunk));
    out += chunk;
  }
  EXPECT_EQ(out + dec.flush(), text);
}

TEST(StreamDecoder, FlushReplacesIncompleteTail) {
  const Tokenizer& tok = *model().tok;
  // The tokens for the single bytes F0 and 9F: the start of a 4-byte character.
  int32_t f0 = -1, x9f = -1, a = -1;
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    const std::string b = tok.token_bytes(id);
    if (b == "\xF0") f0 = id;
    if (b == "\x9F") x9f = id;
    if (b == "a") a = id;
  }
  ASSERT_GE(f0, 0);
  ASSERT_GE(x9f, 0);
  ASSERT_GE(a, 0);
  {
    StreamDecoder dec(tok);
    EXPECT_EQ(dec.push(f0), "");
    EXPECT_EQ(dec.push(x9f), "");
    EXPECT_EQ(dec.flush(), "\xEF\xBF\xBD");  // one U+FFFD for the incomplete character
    EXPECT_EQ(dec.flush(), "");
  }
  {
    // An incomplete character followed by ASCII is invalid at once, not held back.
    StreamDecoder dec(tok);
    EXPECT_EQ(dec.push(f0), "");
    EXPECT_EQ(dec.push(a),
              "\xEF\xBF\xBD"
              "a");
  }
  {
    // A lone continuation byte is never the start of anything.
    StreamDecoder dec(tok);
    EXPECT_EQ(dec.push(x9f), "\xEF\xBF\xBD");
  }
}

TEST(StreamDecoder, SpecialTokensRenderOnlyWhenAsked) {
  const Tokenizer& tok = *model().tok;
  const auto ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>", false, true);
  EXPECT_EQ(stream(tok, ids, false, "plain"), "assistant\nHi");
  EXPECT_EQ(stream(tok, ids, true, "special"), "<|im_start|>assistant\nHi<|im_end|>");
}

// ---- performance -------------------------------------------------------------------------------

// Speed is measured by benchmarks (kvlm_tokenize_bench, docs/bench-log), not by wall-clock bounds
// here, which fail on a loaded machine: this test checks the ids of a large text and prints the
// time; only the scaling check below guards against quadratic behaviour.

TEST(Tokenizer, LargeTextAndLongRunsMatchLlamaCpp) {
  const Tokenizer& tok = *model().tok;
  const json& big = goldens()["big"];
  // Rebuilt exactly as the goldens script builds it: the valid-UTF-8 inputs of the main cases,
  // each once (cases repeat per flag), joined and repeated.
  const std::string sep = big["separator"];
  std::string unit;
  std::set<std::string> seen;
  for (const json& c : goldens()["cases"]) {
    if (!c.contains("text") || !seen.insert(c["name"]).second) continue;
    unit += c["text"].get<std::string>() + sep;
  }
  std::string text;
  for (int i = 0; i < big["repeat"].get<int>(); ++i) text += unit;
  ASSERT_EQ(text.size(), big["n_bytes"].get<size_t>());
  ASSERT_GE(big["n_words"].get<int>(), 20000);

  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text, false, false);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  uint64_t h = kFnvOffset;
  for (int32_t id : ids) h = fnv1a64(le32(static_cast<uint32_t>(id)), h);
  EXPECT_EQ(ids.size(), big["n_ids"].get<size_t>());
  EXPECT_EQ(fmt::format("{:016x}", h), big["ids_fnv"].get<std::string>());
  std::printf("encode: %zu bytes, %d words -> %zu ids in %.1f ms\n", text.size(),
              big["n_words"].get<int>(), ids.size(), ms);

  // Long runs of one character (whitespace, a repeated letter) round-trip. Whether they stay
  // linear is a speed question, measured by bench/tokenize_bench.cpp (its header says how), not
  // timed here: a timed test fails on a loaded machine.
  for (const char c : {' ', 'a'}) {
    const std::string run(200000, c);
    EXPECT_EQ(tok.decode(tok.encode(run, false, false)), run);
  }
}

// ---- small vocabularies ------------------------------------------------------------------------

TEST(TinyVocab, MergesApplyByRankNotPosition) {
  // "b c" outranks "a b", so "abc" becomes a + bc even though "ab" is on the left.
  auto v = tiny_vocab({{"ab", 1}, {"bc", 1}, {"abc", 1}}, {"b c", "a b", "ab c"});
  auto tok = open_tiny(*v);
  EXPECT_EQ(tok->encode("abc", false, false), (std::vector<int32_t>{'a', 257}));
  EXPECT_EQ(tok->encode("abx", false, false), (std::vector<int32_t>{256, 'x'}));
  // Merges stay within words: the space starts a new word.
  EXPECT_EQ(tok->encode("ab ab", false, false), (std::vector<int32_t>{256, byte_id(' '), 256}));
}

TEST(TinyVocab, MergeResultMissingFromVocabularyFallsBackToBytes) {
  // "x y" merges into "xy", which is not a token: llama.cpp emits the single-byte tokens of the
  // merged text instead.
  auto v = tiny_vocab({}, {"x y"});
  auto tok = open_tiny(*v);
  EXPECT_EQ(tok->encode("xy", false, false), (std::vector<int32_t>{'x', 'y'}));
}

TEST(TinyVocab, SpecialTokens) {
  // 256 <ctl> (control), 257 <ud> (user-defined), 258 "<|im_end|>" typed normal in the file.
  auto v = tiny_vocab({{"<ctl>", 3}, {"<ud>", 4}, {"<|im_end|>", 1}}, {});
  auto tok = open_tiny(*v);
  EXPECT_EQ(tok->token_type(256), TokenType::Control);
  EXPECT_EQ(tok->token_type(257), TokenType::UserDefined);
  // llama.cpp forces end-of-turn texts to CONTROL and end of generation.
  EXPECT_EQ(tok->token_type(258), TokenType::Control);
  EXPECT_TRUE(tok->is_eog(258));
  EXPECT_FALSE(tok->is_eog(256));

  EXPECT_EQ(tok->encode("a<ctl>b<ud>", false, true), (std::vector<int32_t>{'a', 256, 'b', 257}));
  // Without parse_special, control tokens are text but user-defined ones are still matched.
  const auto plain = tok->encode("a<ctl>b<ud>", false, false);
  EXPECT_EQ(plain.back(), 257);
  EXPECT_EQ(plain.size(), 1 + 5 + 1 + 1u);
  // Control text renders only when asked; user-defined text always.
  EXPECT_EQ(tok->decode({256, 257}, true), "<ctl><ud>");
  EXPECT_EQ(tok->decode({256, 257}, false), "<ud>");
}

TEST(TinyVocab, AddBosFollowsTheVocabulary) {
  for (bool add_bos : {false, true}) {
    auto v = tiny_vocab({{"<s>", 3}}, {});
    v->builder.u32("tokenizer.ggml.bos_token_id", 256);
    v->builder.boolean("tokenizer.ggml.add_bos_token", add_bos);
    auto tok = open_tiny(*v);
    EXPECT_EQ(tok->add_bos_default(), add_bos);
    const auto ids = tok->encode("a", true, false);
    const std::vector<int32_t> expected =
        add_bos ? std::vector<int32_t>{256, 'a'} : std::vector<int32_t>{'a'};
    EXPECT_EQ(ids, expected);
    EXPECT_EQ(tok->encode("a", false, false), std::vector<int32_t>{'a'});
    EXPECT_EQ(tok->encode("", true, false).size(), add_bos ? 1u : 0u);
  }
}

// Error message of loading a tiny vocabulary, "" if it loads.
template <class Setup>
std::string load_error(Setup setup, const std::string& model = "gpt2",
                       const std::string& pre = "gpt2") {
  auto v = tiny_vocab({}, {"a b"});
  setup(*v);
  try {
    open_tiny(*v, model, pre);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TinyVocab, MetadataErrorsNameTheKey) {
  auto nothing = [](TinyVocab&) {};
  EXPECT_EQ(load_error(nothing), "");
  EXPECT_NE(load_error(nothing, "rwkv").find("tokenizer.ggml.model"), std::string::npos);
  EXPECT_NE(load_error(nothing, "bert").find("'bert'"), std::string::npos);
  EXPECT_NE(load_error(nothing, "gpt2", "no-such-pre").find("tokenizer.ggml.pre"),
            std::string::npos);
  EXPECT_NE(load_error(nothing, "gpt2", "no-such-pre").find("'no-such-pre'"), std::string::npos);
  EXPECT_NE(load_error([](TinyVocab& v) {
              v.merges.push_back("nospace");
            }).find("tokenizer.ggml.merges[1]"),
            std::string::npos);
  EXPECT_NE(load_error([](TinyVocab& v) { v.types.resize(10); }).find("tokenizer.ggml.token_type"),
            std::string::npos);
  EXPECT_NE(
      load_error([](TinyVocab& v) { v.tokens[5] = v.tokens[6]; }).find("tokenizer.ggml.tokens"),
      std::string::npos);
  EXPECT_NE(load_error([](TinyVocab& v) {
              v.builder.u32("tokenizer.ggml.bos_token_id", 9999);
            }).find("tokenizer.ggml.bos_token_id"),
            std::string::npos);
  EXPECT_NE(load_error([](TinyVocab& v) {
              v.builder.boolean("tokenizer.ggml.add_bos_token", true);
            }).find("tokenizer.ggml.bos_token_id"),
            std::string::npos);
  // A file without any tokenizer.
  GgufBuilder empty;
  auto f = empty.str("general.architecture", "llama").open("empty.gguf");
  try {
    Tokenizer::from_gguf(*f);
    ADD_FAILURE() << "loaded a tokenizer from a file without one";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.ggml.model"), std::string::npos);
  }
}

TEST(TinyVocab, OutOfRangeIdsThrow) {
  auto v = tiny_vocab({}, {});
  auto tok = open_tiny(*v);
  EXPECT_THROW(tok->token_bytes(-1), Error);
  EXPECT_THROW(tok->decode({0, 256}), Error);
  EXPECT_THROW(tok->token_text(1000), Error);
}

}  // namespace
}  // namespace kvlm
