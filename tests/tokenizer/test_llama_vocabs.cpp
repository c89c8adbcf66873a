// kvlm's tokenizer against llama.cpp's own tokenizer tests: every vocab-only GGUF that llama.cpp
// ships in vendor/llama.cpp/models (ggml-vocab-*.gguf, unpacked by scripts/fetch-refdata.sh), with
// its .inp/.out pairs where it has them. The pairs are llama.cpp's goldens (made by Hugging Face
// tokenizers); the call is test-tokenizer-0's: common_tokenize(text, add_special=false,
// parse_special=false). Each vocabulary must be in exactly one of the lists below.
//
// tests/data/llama_vocab_goldens.json (tools/gen_vocab_goldens.py, llama.cpp through
// llama-cpp-python) widens this to a larger corpus, with BOS/special-token parsing and
// llama_detokenize's output for every supported vocabulary.

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "base/error.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace kvlm {
namespace {

// Vocabularies kvlm tokenizes; has_pairs says whether the sdist ships .inp/.out for them.
struct Supported {
  std::string_view name;
  bool has_pairs;
};
constexpr Supported kSupported[] = {
    {"command-r", true}, {"deepseek-coder", true}, {"deepseek-llm", true}, {"falcon", true},
    {"gemma-4", true},   {"gpt-2", true},          {"llama-bpe", true},    {"llama-spm", true},
    {"mpt", true},       {"phi-3", true},          {"qwen2", true},        {"qwen35", true},
    {"refact", true},    {"starcoder", true},      {"aquila", false},      {"baichuan", false},
    {"gpt-neox", false},
};
// Vocabularies kvlm refuses at load, with the reason; the error must name the key and value.
struct Refused {
  std::string_view name;
  std::string_view value;  // tokenizer.ggml.model
  std::string_view reason;
};
constexpr Refused kRefused[] = {
    {"bert-bge", "bert", "WordPiece (BERT embeddings): no embedding models in kvlm"},
    {"nomic-bert-moe", "t5", "Unigram (T5-style) with a precompiled normalizer: not implemented"},
};

std::string vocab_path(std::string_view name) {
  return fmt::format("{}/ggml-vocab-{}.gguf", test::refdata_dir(), name);
}

// The vocabulary names present in the refdata directory.
std::set<std::string> vocab_files() {
  std::set<std::string> names;
  const std::string dir = test::refdata_dir();
  if (!std::filesystem::is_directory(dir)) return names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    const std::string prefix = "ggml-vocab-", suffix = ".gguf";
    if (f.size() > prefix.size() + suffix.size() && f.starts_with(prefix) && f.ends_with(suffix))
      names.insert(f.substr(prefix.size(), f.size() - prefix.size() - suffix.size()));
  }
  return names;
}

struct Pair {
  std::string text;
  std::vector<int32_t> ids;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The .inp texts are separated by "\n__ggml_vocab_test__\n"; line i of .out holds the ids of
// text i, separated by spaces (test-tokenizer-0.cpp's format).
std::vector<Pair> read_pairs(std::string_view name) {
  const std::string inp = read_file(vocab_path(name) + ".inp");
  const std::string out = read_file(vocab_path(name) + ".out");
  std::vector<Pair> pairs;
  const std::string sep = "\n__ggml_vocab_test__\n";
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    pairs.push_back(
        {inp.substr(pos, next == std::string::npos ? std::string::npos : next - pos), {}});
    if (next == std::string::npos) break;
    pos = next + sep.size();
  }
  std::istringstream lines(out);
  size_t i = 0;
  for (std::string line; std::getline(lines, line); ++i) {
    if (i >= pairs.size()) {
      ADD_FAILURE() << name << ": more .out lines than .inp texts";
      break;
    }
    std::istringstream ids(line);
    for (int32_t id; ids >> id;) pairs[i].ids.push_back(id);
  }
  EXPECT_EQ(i, pairs.size()) << name << ": .inp and .out disagree on the number of tests";
  return pairs;
}

std::string show_ids(const std::vector<int32_t>& ids) {
  return fmt::format("[{}]", fmt::join(ids, " "));
}

std::unique_ptr<Tokenizer> load(std::string_view name, std::unique_ptr<GgufFile>* keep) {
  *keep = GgufFile::open(vocab_path(name));
  return Tokenizer::from_gguf(**keep);
}

// Supported vocabularies, each loaded once for all the tests (Gemma 4's takes a while).
const Tokenizer& vocab(std::string_view name) {
  static std::map<std::string, std::unique_ptr<Tokenizer>, std::less<>> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end()) {
    std::unique_ptr<GgufFile> file;
    it = loaded.emplace(std::string(name), load(name, &file)).first;
  }
  return *it->second;
}

TEST(LlamaVocabs, EveryFileIsListed) {
  const auto files = vocab_files();
  ASSERT_FALSE(files.empty()) << "no ggml-vocab-*.gguf in " << test::refdata_dir()
                              << "; run scripts/fetch-refdata.sh";
  std::set<std::string> listed;
  for (const auto& s : kSupported) listed.insert(std::string(s.name));
  for (const auto& r : kRefused) EXPECT_TRUE(listed.insert(std::string(r.name)).second) << r.name;
  for (const std::string& f : files)
    EXPECT_TRUE(listed.count(f)) << "ggml-vocab-" << f
                                 << ".gguf is in neither kSupported nor kRefused";
  for (const std::string& l : listed)
    EXPECT_TRUE(files.count(l)) << "listed vocabulary " << l << " has no file";
}

TEST(LlamaVocabs, PairsMatch) {
  size_t total = 0;
  for (const Supported& v : kSupported) {
    SCOPED_TRACE(std::string(v.name));
    const Tokenizer* tok = &vocab(v.name);
    const bool has_pairs = std::filesystem::exists(vocab_path(v.name) + ".inp");
    EXPECT_EQ(has_pairs, v.has_pairs);
    if (!has_pairs) continue;
    size_t n_ok = 0;
    const auto pairs = read_pairs(v.name);
    for (const Pair& p : pairs) {
      const auto ids = tok->encode(p.text, /*add_bos=*/false, /*parse_special=*/false);
      if (ids == p.ids)
        ++n_ok;
      else
        ADD_FAILURE() << v.name << ": '" << p.text << "'\n  expected " << show_ids(p.ids)
                      << "\n  got      " << show_ids(ids);
    }
    std::printf("%-15s %2zu / %2zu pairs match\n", std::string(v.name).c_str(), n_ok, pairs.size());
    total += n_ok;
  }
  std::printf("all vocabularies: %zu pairs match\n", total);
}

TEST(LlamaVocabs, UnsupportedAreRefusedNamingTheKey) {
  for (const Refused& r : kRefused) {
    SCOPED_TRACE(std::string(r.name));
    std::unique_ptr<GgufFile> file;
    try {
      load(r.name, &file);
      ADD_FAILURE() << r.name << " loaded; it is listed as refused (" << r.reason << ")";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("tokenizer.ggml.model"), std::string::npos) << msg;
      EXPECT_NE(msg.find(fmt::format("'{}'", r.value)), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    }
  }
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

TEST(LlamaVocabs, CorpusMatchesLlamaCpp) {
  using nlohmann::json;
  std::ifstream in(test::data_path("llama_vocab_goldens.json"));
  ASSERT_TRUE(in.good()) << "missing " << test::data_path("llama_vocab_goldens.json");
  const json goldens = json::parse(in);
  std::vector<std::string> corpus;
  for (const json& c : goldens["corpus"])
    corpus.push_back(c.contains("text") ? c["text"].get<std::string>()
                                        : from_hex(c["hex"].get<std::string>()));
  for (const Supported& v : kSupported) {
    SCOPED_TRACE(std::string(v.name));
    const json& per_vocab = goldens["vocabs"][std::string(v.name)];
    ASSERT_FALSE(per_vocab.empty())
        << "no goldens for " << v.name << "; rerun tools/gen_vocab_goldens.py";
    const Tokenizer* tok = &vocab(v.name);
    size_t n_cases = 0, n_enc = 0, n_dec = 0, n_failed = 0;
    // "off": add_special and parse_special false; "on": both true. One case per corpus text.
    for (const bool on : {false, true}) {
      const json& cases = per_vocab[on ? "on" : "off"];
      ASSERT_EQ(cases.size(), corpus.size());
      for (size_t i = 0; i < cases.size(); ++i) {
        const json& c = cases[i];
        const std::string& text = corpus[i];
        const auto expected = c["ids"].get<std::vector<int32_t>>();
        const auto ids = tok->encode(text, on, on);
        // Decoded texts: "detok"/"plain" as text, or "..._hex" when not valid UTF-8; absent when
        // equal to the input / to detok.
        auto field = [&](const std::string& key, const std::string& fallback) -> std::string {
          if (c.contains(key)) return c[key].get<std::string>();
          if (c.contains(key + "_hex")) return from_hex(c[key + "_hex"]);
          return fallback;
        };
        const std::string detok = field("detok", text);
        const std::string plain = field("plain", detok);
        const bool enc_ok = ids == expected;
        const bool dec_ok =
            tok->decode(expected, true) == detok && tok->decode(expected, false) == plain;
        ++n_cases;
        n_enc += enc_ok;
        n_dec += dec_ok;
        if ((!enc_ok || !dec_ok) && n_failed++ < 3)
          ADD_FAILURE() << v.name << ", corpus entry " << goldens["corpus"][i]["name"]
                        << (on ? " (add_special, parse_special)" : "") << ":\n  expected "
                        << show_ids(expected) << "\n  got      " << show_ids(ids) << "\n  decode "
                        << (dec_ok ? "ok" : "differs: '" + tok->decode(expected, true) + "'");
      }
    }
    std::printf("%-15s encode %3zu / %3zu, decode %3zu / %3zu\n", std::string(v.name).c_str(),
                n_enc, n_cases, n_dec, n_cases);
  }
}

TEST(LlamaVocabs, LongTextMatchesLlamaCpp) {
  using nlohmann::json;
  std::ifstream in(test::data_path("llama_vocab_goldens.json"));
  ASSERT_TRUE(in.good());
  const json goldens = json::parse(in);
  const json& big = goldens["big"];
  std::string unit;
  for (const json& c : goldens["corpus"])
    if (c.contains("text"))
      unit += c["text"].get<std::string>() + big["separator"].get<std::string>();
  std::string text;
  for (int i = 0; i < big["repeat"].get<int>(); ++i) text += unit;
  ASSERT_EQ(text.size(), big["n_bytes"].get<size_t>());
  for (const Supported& v : kSupported) {
    SCOPED_TRACE(std::string(v.name));
    const auto ids = vocab(v.name).encode(text, false, false);
    uint64_t h = 0xCBF29CE484222325ull;
    for (int32_t id : ids)
      for (int k = 0; k < 4; ++k) {
        h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xFF;
        h *= 0x100000001B3ull;
      }
    const json& want = big["vocabs"][std::string(v.name)];
    EXPECT_EQ(ids.size(), want["n_ids"].get<size_t>());
    EXPECT_EQ(fmt::format("{:016x}", h), want["ids_fnv"].get<std::string>());
  }
}

// test-tokenizer-1-spm's round trips, which llama.cpp runs for llama-spm: every token's text
// (special tokens included) tokenizes back to the same text, and so does every codepoint except
// U+2581 (the space mark itself decodes to a space).
TEST(LlamaVocabs, SentencePieceRoundTrips) {
  const Tokenizer* tok = &vocab("llama-spm");
  for (int32_t id = 0; id < tok->n_vocab(); ++id) {
    const std::string text = tok->decode({id}, /*render_special=*/true);
    const std::string back = tok->decode(tok->encode(text, false, /*parse_special=*/true));
    if (back != text) {
      ADD_FAILURE() << "token " << id << " decodes to '" << text << "' but that comes back as '"
                    << back << "'";
      break;
    }
  }
  size_t n_failed = 0;
  for (uint32_t cp = 0; cp < 0x110000; ++cp) {
    if ((cp >= 0xD800 && cp <= 0xDFFF) || (cp >= 0x40000 && cp <= 0xE0000) || cp == 0x2581)
      continue;
    std::string text;
    tok::append_utf8(cp, &text);
    const std::string back = tok->decode(tok->encode(text, false, true));
    if (back != text && n_failed++ < 5)
      ADD_FAILURE() << fmt::format("U+{:04X} comes back as '{}'", cp, back);
  }
  EXPECT_EQ(n_failed, 0u);
}

}  // namespace
}  // namespace kvlm
